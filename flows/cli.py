"""`dinov2-pipeline`: the project's one command-line entry point.

`stage NAME` runs one stage's plain function (what DVC stage `cmd`s call), `run` runs the Prefect flow that
chains the DVC stages, `params` validates a params/profile file, `fetch` gets any stage's artifact for a git
revision or flow run from the DVC remote, `export` converts a trained backbone for transformers, timm or ONNX,
`push` uploads the stage outputs to the DVC remote, `init` points the pipeline at your own images, `dvc-yaml` renders dvc.yaml from the stage registry, `stack` starts/stops the local Prefect + S3 stack, `deploy`
registers the deployments. Errors users can act on are printed as one
line (set DINOV2_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from dinov2_core.atomic import atomic_write_text
from flows import submit
from flows.fetch import fetch
from flows.remote import (
    CredentialsRejected,
    RemoteError,
    credentials_from_block,
    push_outputs,
    resolve_remote,
)
from flows.results import results_report
from tasks.dvc_yaml import DVC_YAML, render_dvc_yaml
from tasks.loop import ROUND_STAGES, dvc_stage, round_params, write_round_report
from tasks.params import ParamsError, load_params
from tasks.stages import STAGES
from tasks.storage import CredentialsError, StorageError, scheme_of

_STAGE_LIST = "\n".join(f"  {name:<14} {stage.summary}" for name, stage in STAGES.items())
_HELP = (
    "Meta's DINOv2 recipe as a pipeline: raw crawl -> curated data -> self-supervised ViT -> evaluation.\n\n"
    f"Stages (in DAG order):\n\n\b\n{_STAGE_LIST}"
)

app = typer.Typer(help=_HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a param, e.g. --set ingest.workers=4 (repeatable)."),
]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file to read.")]


EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_CREDENTIALS = 77  # sysexits.h EX_NOPERM: the keys are missing or wrong (a retry cannot help)
# The flow names a file here; `stage` appends "<name> start" when its command really runs and "<name> exit <code>"
# when it ends, so the flow learns which stage commands ran inside one `dvc repro`, and how each ended, without
# reading DVC's printed messages.
STAGE_RUN_LOG_ENV = "DINOV2_STAGE_RUN_LOG"


def _log_stage_run(name: str, event: str) -> None:
    path = os.environ.get(STAGE_RUN_LOG_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{name} {event}\n")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn, *args, **kwargs):
    """Run `fn`; known, user-actionable failures become one line on stderr and a non-zero exit."""
    from tasks.validation import DataQualityError

    if os.environ.get("DINOV2_DEBUG"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except ParamsError as exc:
        _fail(str(exc), 2)
    except DataQualityError as exc:
        _fail(str(exc), 3)
    except CredentialsError as exc:
        _fail(str(exc).splitlines()[0], EXIT_CREDENTIALS)
    except (ConnectionError, TimeoutError) as exc:  # a network fault no storage layer translated: worth a retry
        _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'network error'}", EXIT_TRANSIENT)
    except (StorageError, FileNotFoundError, ValueError, RuntimeError) as exc:
        name = type(exc).__name__
        # A transient fault (network, S3 outage) exits EX_TEMPFAIL so the flow knows a retry may succeed.
        code = EXIT_TRANSIENT if getattr(exc, "transient", False) else 1
        _fail(f"{name}: {str(exc).splitlines()[0] if str(exc) else name}", code)


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}")],
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    round_: Annotated[str | None, typer.Option("--round", help="Run it as part of a later curation-loop round "
                                               "(a name in loop.rounds, e.g. round-2): tasks/loop.py.")] = None,
) -> None:
    """Run one stage outside DVC (e.g. on your own data with --set ingest.manifest=crawl.csv)."""
    if name not in STAGES:
        _fail(f"unknown stage '{name}'; stages: {', '.join(STAGES)}", 2)
    if round_ is not None and name not in ROUND_STAGES:
        _fail(f"stage '{name}' is not redone in later rounds; those are: {', '.join(ROUND_STAGES)}", 2)
    logged = dvc_stage(name, round_) if round_ else name
    _log_stage_run(logged, "start")
    code: int | str = 1  # an exception that is neither an Exit nor a SystemExit ends the process with 1
    try:
        if round_:
            _run_round_stage(name, round_, params_file, set_)
        else:
            _run_stage(name, params_file, set_)
        code = 0
    except typer.Exit as exc:
        code = exc.exit_code
        raise
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        raise
    finally:
        _log_stage_run(logged, f"exit {code}")


def _run_round_stage(name: str, round_: str, params_file: Path, set_: list[str] | None) -> None:
    base = _guarded(load_params, params_file, list(set_ or []))
    params = _guarded(round_params, params_file, round_, list(set_ or []))
    _guarded(STAGES[name].load(), params)
    if name == ROUND_STAGES[-1]:  # the round's last stage: its table against the earlier rounds
        write_round_report(base, round_)


def _run_stage(name: str, params_file: Path, set_: list[str] | None) -> None:
    sets = list(set_ or [])
    section = name.replace("-", "_")
    moved = next((v.split("=", 1)[1] for v in sets if v.startswith(f"{section}.out=")), None)
    if moved and not any(v.startswith("reports=") for v in sets):
        # An ad-hoc run on other outputs keeps its metrics and validation results beside them: the workspace's
        # reports/ describe the pipeline's outputs, and one stage run elsewhere must not overwrite them.
        sets.append(f"reports={_adhoc_reports(moved, name)}")
    params = _guarded(load_params, params_file, sets)
    _guarded(STAGES[name].load(), params)
    if moved:
        typer.echo(f"{name}: outputs in {moved}, reports in {params.reports}", err=True)


def _adhoc_reports(out: str, stage: str) -> str:
    return str(Path(out) / "reports") if scheme_of(out) == "local" else str(Path("reports") / "adhoc" / stage)


@app.command("params")
def params_cmd(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Validate a params/profile file and print the resolved values."""

    params = _guarded(load_params, params_file, set_ or [])
    typer.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


@app.command("init")
def init_cmd(
    data: Annotated[str, typer.Argument(help="Your images: a folder, a glob ('photos/**/*.jpg') or an s3:// prefix.")],
    labels: Annotated[str | None, typer.Option(help="A labelled folder, class_name/*.jpg, for k-NN and linear "
                                                    "evaluation (without it: a label-free report).")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the inputs folder and profile (default: DATA's name).")]
    = None,
    test_fraction: Annotated[float, typer.Option(help="Share of each class held out for testing.")] = 0.2,
) -> None:
    """Point the pipeline at your own images: writes inputs/<name>/ and the profile params.<name>.yaml."""
    from tasks.user_data import init_project

    result = _guarded(init_project, data, labels, name, ".", test_fraction)
    evaluation = (f"{len(result.classes)} classes, {result.n_eval_train} train / {result.n_eval_test} test images"
                  if result.classes else f"no labels: feature statistics and neighbours on {result.n_eval_test} "
                                         f"held-out images")
    typer.echo(f"{result.n_images} images -> {result.manifest}; eval: {evaluation}; no seed set (balanced "
               f"curation)\nnext: dinov2-pipeline run --profile {result.profile.name}")


@app.command("dvc-yaml")
def dvc_yaml_cmd(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if dvc.yaml differs from the rendering.")] = False,
) -> None:
    """Render dvc.yaml from the stage registry (tasks/stages.py) and each stage's imports and params reads."""
    text = render_dvc_yaml()
    if check:
        if DVC_YAML.read_text() != text:
            _fail("dvc.yaml is out of date with tasks/stages.py or the stages' imports: run `dinov2-pipeline dvc-yaml`")
        return
    atomic_write_text(DVC_YAML, text)
    typer.echo(f"wrote {DVC_YAML}")


@app.command("cost")
def cost_cmd(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    gpu_tflops: Annotated[float, typer.Option(help="Assumed peak TFLOP/s per GPU (A100 bf16 dense: 312).")] = 312.0,
    mfu: Annotated[float, typer.Option(help="Assumed share of that peak sustained.")] = 0.40,
) -> None:
    """Parameters, FLOPs per iteration and estimated GPU-hours of a profile's training stages (meta device)."""
    from tasks.train_cost import format_cost, train_cost

    params = _guarded(load_params, params_file, set_ or [])
    typer.echo(format_cost(_guarded(train_cost, params, gpu_tflops, mfu)))


@app.command("run")
def run_cmd(
    stages: Annotated[list[str] | None, typer.Option("--stage", help="Run only these stages (repeatable).")] = None,
    set_: SetOpt = None,
    profile: Annotated[str, typer.Option("--profile", help="Params file the run starts from "
                                         "(params.yaml or params.paper.yaml).")] = "params.yaml",
    project: Annotated[Path, typer.Option(help="Project folder holding dvc.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option(help="Rerun stages even if DVC says they are up to date.")] = False,
    push: Annotated[bool, typer.Option(help="`dvc push` to the remote at the end (if one is configured).")] = True,
    remote: Annotated[str | None, typer.Option(help="DVC remote (default: the project's default).")] = None,
    credentials_block: Annotated[str | None, typer.Option(help="Prefect Secret block with S3 keys.")] = None,
    retries: Annotated[int, typer.Option(help="Retries for transient faults (network, S3).")] = 3,
    retry_delay: Annotated[float, typer.Option(help="First back-off delay in seconds (doubles).")] = 10.0,
    experiment: Annotated[bool, typer.Option(help="Save the run as a DVC experiment (`dvc exp show`) when the "
                                             "project is a git repository with a commit.")] = True,
    rounds: Annotated[int | None, typer.Option(help="Curation-loop rounds: 2 re-curates with round 1's teacher, "
                                               "then trains and evaluates again (sets loop.rounds).")] = None,
) -> None:
    """Run the pipeline as a Prefect flow (one task per DVC stage, then `dvc push`; ephemeral Prefect when no
    server is configured), then print where the results are and the evaluation summary."""
    # before Prefect loads its settings: the ephemeral server's telemetry service is the one thing that writes to
    # its SQLite database at start-up, and on a busy 2-core machine it lost races ("database is locked") with a
    # traceback in the middle of the run's output; these machines are offline anyway
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    profile_path = project / profile if not Path(profile).is_absolute() else Path(profile)
    _guarded(load_params, profile_path, set_ or [])  # the flow checks too; here a typo fails before Prefect starts
    from flows.pipeline import StageFailed, TransientStageError, dinov2_pipeline

    try:
        result = dinov2_pipeline(stages=stages, overrides=set_ or [], profile=profile, project_dir=str(project),
                                 force=force, push=push, remote=remote, credentials_block=credentials_block,
                                 retries=retries, retry_delay_s=retry_delay, experiment=experiment,
                                 rounds=rounds)
    except (StageFailed, TransientStageError, RemoteError) as exc:
        _fail(_one_line(exc))
    typer.echo(result["summary"])

    try:
        reports = load_params(project / "params.yaml").reports
    except Exception:
        reports = "reports"
    typer.echo(results_report(project, reports, result))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@app.command("results")
def results_cmd(project: Annotated[Path, typer.Option(help="Project folder holding dvc.yaml.")] = Path(".")) -> None:
    """Print where the last run's results are and the evaluation summary."""

    try:
        reports = load_params(project / "params.yaml").reports
    except Exception:
        reports = "reports"
    typer.echo(results_report(project, reports))


@app.command("fetch")
def fetch_cmd(
    target: Annotated[str, typer.Argument(help="A stage name, a stage output path, or a path inside one "
                                          "(e.g. ingest, data/ingest, data/ingest/manifest.parquet).")],
    rev: Annotated[str | None, typer.Option(help="Git revision whose dvc.lock says which bytes.")] = None,
    run: Annotated[str | None, typer.Option(help="Flow run id whose run record says which bytes.")] = None,
    out: Annotated[Path, typer.Option(help="Folder to write into (keeps the project-relative path).")] = Path("fetched"),
    project: Annotated[Path, typer.Option(help="Project folder (its DVC remote config is used).")] = Path("."),
    remote: Annotated[str | None, typer.Option(help="DVC remote (default: the project's default).")] = None,
    credentials_block: Annotated[str | None, typer.Option(help="Prefect Secret block with S3 keys.")] = None,
) -> None:
    """Fetch a stage's artifact as of a git revision (--rev) or a flow run (--run) from the DVC remote;
    every file is MD5-verified against the dvc.lock of that revision/run."""

    try:
        creds = credentials_from_block(credentials_block)
        fetched = fetch(target, out, project=project, rev=rev, run=run, remote=remote, credentials=creds)
    except RemoteError as exc:
        _fail(_one_line(exc))
    for item in fetched:
        typer.echo(f"{item.path}: {item.files} file(s), {item.bytes} bytes ({item.source}) -> {item.dest}")


@app.command("push")
def push_cmd(
    remote: Annotated[str | None, typer.Option(help="DVC remote (default: the project's default).")] = None,
    project: Annotated[Path, typer.Option(help="Project folder holding dvc.yaml.")] = Path("."),
    result: Annotated[Path | None, typer.Option(help="Write {\"pushed\": N} here (JSON) when it succeeds.")] = None,
) -> None:
    """Upload every DVC-cached stage output to the DVC remote (`dvc push` through DVC's Python API). Exits 75 when
    a retry may help (network, throttling; it uploads only what is missing), 77 when the credentials are wrong,
    1 otherwise."""

    try:
        spec = resolve_remote(project, remote)
        if spec is None:
            _fail(f"{project.resolve()}: no DVC remote configured (pass --remote or `dvc remote add -d`)")
        pushed = push_outputs(project, spec)
    except CredentialsRejected as exc:
        _fail(_one_line(exc), EXIT_CREDENTIALS)
    except RemoteError as exc:
        _fail(_one_line(exc), EXIT_TRANSIENT if exc.transient else 1)
    if result is not None:
        atomic_write_text(result, json.dumps({"pushed": pushed}) + "\n")
    typer.echo(f"{pushed} object(s) pushed to remote '{spec.name}' ({spec.url})")


stack_app = typer.Typer(help="The local stack: Prefect server + process worker + S3-compatible store on loopback.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("start")
def stack_start(deploy: Annotated[bool, typer.Option(help="Register prefect.yaml's deployments.")] = True) -> None:
    """Start the stack (idempotent) and wire the DVC remote 'stack' to it."""
    from flows.stack import main as stack_main

    raise typer.Exit(stack_main(["start"] + ([] if deploy else ["--no-deploy"])))


@stack_app.command("stop")
def stack_stop() -> None:
    """Stop everything the stack started."""
    from flows.stack import main as stack_main

    raise typer.Exit(stack_main(["stop"]))


@stack_app.command("status")
def stack_status() -> None:
    """Health of each component (exit 3 if one is down)."""
    from flows.stack import main as stack_main

    raise typer.Exit(stack_main(["status"]))


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the converted model into.")],
    to: Annotated[str, typer.Option("--to", help="hf (transformers Dinov2Model / Dinov2WithRegistersModel), "
                                    "timm (vit_*_patch14_dinov2), or onnx.")] = "hf",
    model_json: Annotated[Path, typer.Option(help="model.json of a training export.")] = Path(
        "data/distill/export/model.json"),
    name: Annotated[str | None, typer.Option(help="Weight file in that export (default: its backbone).")] = None,
) -> None:
    """Convert an exported backbone for another library, load it back there and check its features match ours
    (max abs difference <= 1e-4 at the model's resolution)."""

    from dinov2_core.hub import load_export
    from dinov2_core.interop import FORMATS, export

    if to not in FORMATS:
        _fail(f"--to {to}: one of {', '.join(FORMATS)}", 2)
    if not model_json.exists():
        _fail(f"{model_json}: no such export (run the training stages, or pass --model-json)", 2)
    files = json.loads(model_json.read_text()).get("files", {})
    name = name or next((f for f in files if f.endswith("_backbone.pth")), None)
    result = _guarded(lambda: export(load_export(model_json, name), to, out))
    typer.echo(f"{to}: {result['path']} (features match ours: max abs diff {result['max_abs_diff']:.1e})")


@app.command("submit")
def submit_cmd(
    stage: Annotated[str, typer.Argument(help="A training stage: pretrain, adapt or distill.")],
    params_file: ParamsOpt = Path("params.paper.yaml"),
    nnodes: Annotated[int | None, typer.Option(help="Nodes (pods); default: the profile's launch.nnodes.")] = None,
    gpus: Annotated[int | None, typer.Option(help="Processes (GPUs) per node; default launch.nproc_per_node.")] = None,
    image: Annotated[str, typer.Option(help="Container image (infra/docker/Dockerfile.gpu).")] = "",
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "dinov2",
    name: Annotated[str | None, typer.Option(help="Job name (default dinov2-<stage>).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the manifests here.")] = None,
    apply: Annotated[bool, typer.Option(help="Create them in the current kubeconfig's cluster.")] = False,
) -> None:
    """Render a training stage as a multi-node Kubernetes Indexed Job + headless Service (each pod runs this
    stage for its node under one torchrun), check it against the Kubernetes API models, print or apply it."""
    request = _guarded(submit.job_request, stage, params_file, nnodes, gpus, image=image or submit.IMAGE,
                       namespace=namespace, name=name)
    try:
        docs = submit.render(request)
    except submit.ManifestError as exc:
        _fail(str(exc), 2)
    text = yaml.safe_dump_all(docs, sort_keys=False)
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}: Service + Indexed Job '{request.job}', {request.nnodes} node(s) x "
                   f"{request.gpus} process(es)")
    elif not apply:
        typer.echo(text, nl=False)
    if apply:
        for created in _guarded(submit.apply, docs):
            typer.echo(f"created {created}")


@app.command("deploy")
def deploy_cmd(
    api_url: Annotated[str | None, typer.Option(help="Prefect API (default: PREFECT_API_URL).")] = None,
    gpu: Annotated[bool, typer.Option(help="Also create the Kubernetes GPU pool (paused) and its deployments.")] = False,
) -> None:
    """Create the work pools and register every deployment (`prefect deploy --all`)."""
    from flows.deploy import DeployError, deploy_all

    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        _fail("no Prefect server: pass --api-url or set PREFECT_API_URL (e.g. `. infra/.state/env`)")
    try:
        for line in deploy_all(url, Path.cwd(), gpu=gpu):
            typer.echo(line)
    except DeployError as exc:
        _fail(_one_line(exc))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
