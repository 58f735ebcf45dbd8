"""`dinov2-pipeline submit STAGE --nnodes N`: a training stage as a Kubernetes Indexed Job + headless Service.

The manifests come from `infra/k8s/torchrun-indexed-job.yaml`, filled from the profile and the command line, and
are checked offline against the Kubernetes API models (the `kubernetes` client's: required fields, types, and no
key the API would silently drop) before they are printed or applied. Each pod runs `dinov2-pipeline stage`, which
starts one torchrun for its node, the same multi-node launch the tests run as two nodes on loopback.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.params import ParamsError, load_params
from tasks.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "k8s" / "torchrun-indexed-job.yaml"
IMAGE = "ghcr.io/example/dinov2-pipeline:gpu"  # built from infra/docker/Dockerfile.gpu; the GPU deployments' image


class ManifestError(ValueError):
    """A rendered manifest the Kubernetes API would refuse or silently change; the message names the field."""


@dataclass(frozen=True)
class JobRequest:
    stage: str
    params_file: str  # inside the image, relative to its working directory (params.paper.yaml)
    nnodes: int
    gpus: int  # processes (GPUs) per node
    image: str = IMAGE
    namespace: str = "dinov2"
    name: str | None = None  # default dinov2-<stage>

    @property
    def job(self) -> str:
        return self.name or f"dinov2-{self.stage}"


def job_request(stage: str, params_file: Path, nnodes: int | None = None, gpus: int | None = None,
                **kw: Any) -> JobRequest:
    """Validate the stage and the profile first (one line on error), and take nodes/GPUs from its `launch`."""
    if stage not in STAGES or not STAGES[stage].trains:
        trains = [name for name, s in STAGES.items() if s.trains]
        raise ParamsError(f"submit: '{stage}' is not a training stage; one of {', '.join(trains)}")
    launch = load_params(params_file).launch
    nnodes, gpus = nnodes or launch.nnodes, gpus or launch.nproc_per_node
    if nnodes < 1 or gpus < 1:
        raise ParamsError(f"submit: --nnodes ({nnodes}) and --gpus ({gpus}) must be >= 1")
    # what every pod will run with: refused here, not by N pods after scheduling
    params = load_params(params_file, [f"launch.nnodes={nnodes}", f"launch.nproc_per_node={gpus}",
                                       "launch.master_port=29500"])
    # imported here, not at the top: the module imports torch, which every other CLI call (a stage of DVC's) paid
    from tasks.train_launch import check_batch

    check_batch(stage, getattr(params, STAGES[stage].section).data, params.launch)
    name = kw.get("name")
    if name is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", name):
        raise ParamsError(f"submit: job name '{name}' must be a DNS label (lowercase letters, digits, '-')")
    inside_image = params_file.name if params_file.is_absolute() else params_file.as_posix()
    return JobRequest(stage, inside_image, nnodes, gpus, **kw)


def render(request: JobRequest, template: Path = TEMPLATE) -> list[dict[str, Any]]:
    """The Service and the Job, checked (`check_manifest`)."""
    values = {"JOB": request.job, "NAMESPACE": request.namespace, "NNODES": request.nnodes, "GPUS": request.gpus,
              "IMAGE": request.image, "STAGE": request.stage, "PARAMS": request.params_file}
    # safe_substitute: `$(JOB_COMPLETION_INDEX)` is Kubernetes' own expansion and must stay as written
    text = string.Template(template.read_text()).safe_substitute(values)
    left = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
    if left:
        raise ManifestError(f"{template.name}: no value for {', '.join(left)}")
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        check_manifest(doc)
    return docs


class _Response:  # what ApiClient.deserialize reads: an HTTP response's body
    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc)


def check_manifest(doc: dict[str, Any]) -> None:
    """Deserialize into the API model of its kind (required fields and types are checked there) and back: a key the
    model does not know disappears in the round trip, which is what the API server would do with it."""
    from kubernetes.client import ApiClient

    kind = doc.get("kind")
    version = str(doc.get("apiVersion", "")).split("/")[-1]
    model = f"{version.capitalize()}{kind}"
    client = ApiClient()
    try:
        obj = client.deserialize(_Response(doc), model)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{kind}: {exc}") from None
    except AttributeError:
        raise ManifestError(f"unknown kind {kind!r} (apiVersion {doc.get('apiVersion')!r})") from None
    dropped = _dropped(doc, client.sanitize_for_serialization(obj))
    if dropped:
        raise ManifestError(f"{kind}: unknown field(s) {', '.join(dropped)}")


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        return [p for key, value in given.items()
                for p in ([f"{path}{key}"] if key not in kept else _dropped(value, kept[key], f"{path}{key}."))]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept)) for p in _dropped(a, b, f"{path}{i}.")]
    return []


def apply(docs: list[dict[str, Any]]) -> list[str]:
    """Create the manifests in the cluster of the current kubeconfig (or the in-cluster service account)."""
    from kubernetes import config, utils
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

    try:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    except (config.ConfigException, OSError) as exc:
        raise RuntimeError(f"no Kubernetes cluster to submit to ({exc}); write the manifests with -o instead") \
            from None
    client = ApiClient()
    created = []
    for doc in docs:
        try:
            utils.create_from_dict(client, doc)
        except (ApiException, utils.FailToCreateError) as exc:
            raise RuntimeError(f"{doc['kind']}/{doc['metadata']['name']}: the cluster refused it: "
                               f"{str(exc).splitlines()[0]}") from None
        created.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return created
