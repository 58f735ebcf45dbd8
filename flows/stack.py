"""The local stack: a Prefect server (SQLite), a process worker and an S3-compatible object store, on loopback.

One command each (`infra/stack.sh start|stop|status`, `make stack`, `dinov2-pipeline stack ...`); tests use the
same class with a temporary state folder and free ports.

- State folder (default `infra/.state`, git-ignored; `DINOV2_STACK_DIR`): `pids/*.pid`, `logs/*.log`,
  `prefect/` (PREFECT_HOME with the SQLite database), `stack.json` (ports, URLs), `env` (mode 0600: the
  variables to talk to the stack, including the local object store's keys), `s3-snapshot/`.
- Start is idempotent: a component whose PID file points at a live, healthy process of the right kind is left
  alone, so starting twice gives one of each. Stop ends exactly the process groups this stack started.
- Object store: moto in server mode (the S3 REST API, in memory). MinIO would be the usual choice, but no
  MinIO binary or package is obtainable on these machines (no docker, registries only); moto is a pip package.
  To make credentials matter, the stack creates an IAM user and turns moto's request authentication on, so
  wrong keys are refused like on AWS. Moto keeps objects in memory: `stop` snapshots the buckets to
  `s3-snapshot/` and `start` restores them (a crash loses what was written since the last stop).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = ROOT / "infra" / ".state"
COMPONENTS = ("s3", "server", "worker")


class StackError(RuntimeError):
    pass


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A free port for a server that starts later (a stack, a torchrun rendezvous). Drawn below the kernel's
    ephemeral range, where port-0 binds and every outgoing connection take theirs: the seconds until the server
    listens cannot lose the port to some other process's connection, as a port-0 pick can."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(10_000, max(low, 10_001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port found on {host} below {low}")


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive(pid: int, marker: str) -> bool:
    """The PID is running and is what we started (guards against a recycled PID)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    if stat.split(")")[-1].split()[0] == "Z":  # zombie
        return False
    return marker in cmdline


@dataclass
class StackConfig:
    state_dir: Path = DEFAULT_STATE
    host: str = "127.0.0.1"
    server_port: int = 4200
    s3_port: int = 9000
    worker_port: int = 8085  # the worker's health endpoint
    pool: str = "dinov2-local"
    bucket: str = "dinov2"
    query_seconds: float = 2.0  # PREFECT_WORKER_QUERY_SECONDS: how quickly a deployment run is picked up
    project: Path = ROOT
    snapshot: bool = True

    @classmethod
    def from_env(cls, **overrides: Any) -> StackConfig:
        env = os.environ
        cfg = cls(
            state_dir=Path(env.get("DINOV2_STACK_DIR", DEFAULT_STATE)),
            server_port=int(env.get("DINOV2_STACK_SERVER_PORT", 4200)),
            s3_port=int(env.get("DINOV2_STACK_S3_PORT", 9000)),
            worker_port=int(env.get("DINOV2_STACK_WORKER_PORT", 8085)),
            query_seconds=float(env.get("DINOV2_STACK_WORKER_QUERY_SECONDS", 2.0)),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.server_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.server_port}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"


@dataclass
class ComponentStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    url: str
    log: str
    detail: str = ""


@dataclass
class LocalStack:
    cfg: StackConfig = field(default_factory=StackConfig.from_env)
    _procs: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------- paths
    @property
    def state(self) -> Path:
        return Path(self.cfg.state_dir)

    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def credentials_file(self) -> Path:
        return self.state / "s3-credentials.json"

    @property
    def env_file(self) -> Path:
        return self.state / "env"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "stack.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _adopt_saved_ports(self) -> None:
        """A running stack keeps its ports: `start` again (even with other defaults) finds the same one."""
        saved = self.state / "stack.json"
        if not saved.exists():
            return
        try:
            data = json.loads(saved.read_text())
        except json.JSONDecodeError:
            return
        if any(self._pid(c) for c in COMPONENTS):
            for key in ("server_port", "s3_port", "worker_port", "pool", "bucket", "host"):
                if key in data:
                    setattr(self.cfg, key, data[key])

    # ------------------------------------------------------------------------------------------- processes
    _MARKERS: ClassVar[dict[str, str]] = {"s3": "moto_server", "server": "server start", "worker": "worker start"}

    def _pid(self, name: str) -> int | None:
        path = self.pid_file(name)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, self._MARKERS[name]) else None

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update({"PREFECT_HOME": str(self.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                    "PREFECT_CLI_PROMPT": "false"})
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
            env.pop(key, None)
        return env

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        c = self.cfg
        env = self._base_env()
        if name == "s3":
            return [_bin("moto_server"), "-H", c.host, "-p", str(c.s3_port)], env
        if name == "server":
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
            env["PREFECT_UI_API_URL"] = c.api_url
            return [_bin("prefect"), "server", "start", "--host", c.host, "--port", str(c.server_port)], env
        env.update({"PREFECT_API_URL": c.api_url, "PREFECT_WORKER_QUERY_SECONDS": str(c.query_seconds),
                    "PREFECT_WORKER_WEBSERVER_HOST": c.host, "PREFECT_WORKER_WEBSERVER_PORT": str(c.worker_port)})
        return [_bin("prefect"), "worker", "start", "--pool", c.pool, "--type", "process",
                "--name", f"{c.pool}-worker", "--with-healthcheck"], env

    def _port(self, name: str) -> int:
        return {"s3": self.cfg.s3_port, "server": self.cfg.server_port, "worker": self.cfg.worker_port}[name]

    def _spawn(self, name: str) -> int:
        port = self._port(name)
        if port_open(self.cfg.host, port):
            raise StackError(f"{name}: port {self.cfg.host}:{port} is already used by another program "
                             f"(set DINOV2_STACK_{'S3' if name == 's3' else name.upper()}_PORT)")
        cmd, env = self._command(name)
        self.log_file(name).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file(name), "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(self.cfg.project), start_new_session=True)
        self.pid_file(name).write_text(f"{proc.pid}\n")
        self._procs[name] = proc
        return proc.pid

    def _wait(self, name: str, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._healthy(name):
                return
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                tail = self.log_file(name).read_text(errors="replace").strip().splitlines()[-3:]
                raise StackError(f"{name} exited during start-up: {' | '.join(tail)} (log: {self.log_file(name)})")
            time.sleep(0.25)
        raise StackError(f"{name} not healthy after {timeout:.0f} s (log: {self.log_file(name)})")

    def _healthy(self, name: str) -> bool:
        c = self.cfg
        if name == "server":
            return _http_ok(f"{c.api_url}/health")
        if name == "worker":
            return _http_ok(f"http://{c.host}:{c.worker_port}/health")
        return _http_ok(f"{c.s3_url}/moto-api/config")

    def _stop_one(self, name: str, timeout: float = 15.0) -> bool:
        pid = self._pid(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)  # the process group we created with start_new_session
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid, self._MARKERS[name]):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    return True
                time.sleep(0.1)
        return True

    # ------------------------------------------------------------------------------------------- S3
    def credentials(self) -> dict[str, str]:
        try:
            return json.loads(self.credentials_file.read_text())
        except (OSError, json.JSONDecodeError):
            raise StackError(f"no local S3 credentials in {self.credentials_file} (is the stack started?)") from None

    def _s3(self, creds: dict[str, str] | None = None, service: str = "s3"):
        import boto3

        creds = creds or {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        return boto3.client(service, endpoint_url=self.cfg.s3_url, region_name="us-east-1",
                            aws_access_key_id=creds["aws_access_key_id"],
                            aws_secret_access_key=creds["aws_secret_access_key"])

    def _bootstrap_s3(self) -> None:
        """Fresh moto: an IAM user with full access, its keys (saved 0600), the bucket, the snapshot back in,
        then request authentication on (from now on only those keys work)."""
        iam = self._s3(service="iam")
        iam.create_user(UserName="dinov2")
        policy = iam.create_policy(PolicyName="dinov2-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="dinov2", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="dinov2")["AccessKey"]
        creds = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        s3 = self._s3()
        s3.create_bucket(Bucket=self.cfg.bucket)
        self._restore_snapshot(s3)
        request = urllib.request.Request(f"{self.cfg.s3_url}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()
        fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(creds, fh)

    def _snapshot_dir(self) -> Path:
        return self.state / "s3-snapshot"

    def _restore_snapshot(self, s3) -> int:
        root = self._snapshot_dir()
        count = 0
        if not self.cfg.snapshot or not root.is_dir():
            return 0
        for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if bucket_dir.name != self.cfg.bucket:
                s3.create_bucket(Bucket=bucket_dir.name)
            for path in sorted(bucket_dir.rglob("*")):
                if path.is_file():
                    s3.put_object(Bucket=bucket_dir.name, Key=path.relative_to(bucket_dir).as_posix(),
                                  Body=path.read_bytes())
                    count += 1
        return count

    def _save_snapshot(self) -> int:
        """Copy every object out of the in-memory store before it stops (into a fresh folder, then swap)."""
        if not self.cfg.snapshot or self._pid("s3") is None:
            return 0
        try:
            s3 = self._s3(self.credentials())
            buckets = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
        except Exception:
            return 0
        tmp = self.state / "s3-snapshot.new"

        shutil.rmtree(tmp, ignore_errors=True)
        count = 0
        for bucket in buckets:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    dest = tmp / bucket / item["Key"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
                    count += 1
            (tmp / bucket).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._snapshot_dir(), ignore_errors=True)
        if tmp.exists():
            tmp.rename(self._snapshot_dir())
        return count

    # ------------------------------------------------------------------------------------------- project wiring
    def configure_dvc_remote(self, project: Path, name: str = "stack", with_credentials: bool = True,
                             url: str | None = None, make_default: bool = False) -> None:
        """Point a project's DVC remote at the stack: URL in the repo config if missing, endpoint and keys
        only in `.dvc/config.local` (git-ignored), written through DVC's own config API (no keys on a
        command line, none printed)."""
        from dvc.config import Config

        dvc_dir = Path(project) / ".dvc"
        conf = Config(dvc_dir=str(dvc_dir))
        level = "repo" if name not in conf.get("remote", {}) else None
        if level:
            with conf.edit("repo") as repo_conf:
                repo_conf["remote"][name] = {"url": url or f"s3://{self.cfg.bucket}/dvc"}
                if make_default:
                    repo_conf["core"]["remote"] = name
        with Config(dvc_dir=str(dvc_dir)).edit("local") as local:
            section = dict(local.get("remote", {}).get(name, {}))
            section["endpointurl"] = self.cfg.s3_url
            if with_credentials:
                creds = self.credentials()
                section["access_key_id"] = creds["aws_access_key_id"]
                section["secret_access_key"] = creds["aws_secret_access_key"]
            else:
                section.pop("access_key_id", None)
                section.pop("secret_access_key", None)
            local["remote"][name] = section

    def _write_env(self) -> None:
        creds = self.credentials()
        lines = [
            "# Source this file to talk to the local stack: . infra/.state/env   (contains local S3 keys: 0600)",
            f"export PREFECT_API_URL={self.cfg.api_url}",
            f"export AWS_ENDPOINT_URL={self.cfg.s3_url}",
            f"export AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
            f"export AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}",
            "export AWS_DEFAULT_REGION=us-east-1",
        ]
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------------- public
    def start(self, deploy: bool = False, configure_project: bool = False, timeout: float = 120.0) -> dict:
        """Start what is not running (idempotent); returns what was started and the URLs."""
        from flows.deploy import ensure_local_pool, prefect_deploy, save_credentials_block

        started: list[str] = []
        with self._locked():
            self._adopt_saved_ports()
            t0 = time.monotonic()
            if self._pid("s3") is None:
                pid = self._spawn("s3")
                self._wait("s3", pid, timeout)
                self._bootstrap_s3()
                started.append("s3")
            if self._pid("server") is None:
                pid = self._spawn("server")
                self._wait("server", pid, timeout)
                started.append("server")
            server_seconds = round(time.monotonic() - t0, 1)
            ensure_local_pool(self.cfg.api_url, self.cfg.pool)
            if self._pid("worker") is None:
                pid = self._spawn("worker")
                self._wait("worker", pid, timeout)
                started.append("worker")
            self._write_env()
            (self.state / "stack.json").write_text(json.dumps(
                {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()}
                | {"api_url": self.cfg.api_url, "ui_url": self.cfg.ui_url, "s3_url": self.cfg.s3_url},
                indent=2) + "\n")
            if configure_project:
                self.configure_dvc_remote(self.cfg.project)
                save_credentials_block(self.cfg.api_url, self.credentials())
            if deploy:
                prefect_deploy(self.cfg.api_url, self.cfg.project,
                               extra_env={"PREFECT_HOME": str(self.prefect_home)})
        return {"started": started, "seconds": round(time.monotonic() - t0, 1), "server_seconds": server_seconds,
                "api_url": self.cfg.api_url, "ui_url": self.cfg.ui_url, "s3_url": self.cfg.s3_url,
                "env_file": str(self.env_file)}

    def stop(self) -> dict:
        with self._locked():
            self._adopt_saved_ports()
            saved = self._save_snapshot()
            stopped = [name for name in reversed(COMPONENTS) if self._stop_one(name)]
        return {"stopped": stopped, "snapshot_objects": saved}

    def status(self) -> list[ComponentStatus]:
        self._adopt_saved_ports()
        urls = {"s3": self.cfg.s3_url, "server": self.cfg.ui_url,
                "worker": f"http://{self.cfg.host}:{self.cfg.worker_port}/health"}
        result = []
        for name in COMPONENTS:
            pid = self._pid(name)
            healthy = pid is not None and self._healthy(name)
            result.append(ComponentStatus(name, pid, pid is not None, healthy, urls[name], str(self.log_file(name))))
        return result

    def pids(self) -> dict[str, int | None]:
        return {name: self._pid(name) for name in COMPONENTS}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.stack start|stop|status` (what infra/stack.sh runs)."""

    parser = argparse.ArgumentParser(prog="stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "restart"])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--no-deploy", action="store_true", help="start without registering deployments")
    parser.add_argument("--no-configure", action="store_true",
                        help="do not point the project's DVC remote 'stack' at the store or save the Prefect block")
    args = parser.parse_args(argv)
    stack = LocalStack(StackConfig.from_env(state_dir=args.state_dir))
    try:
        if args.command in ("stop", "restart"):
            info = stack.stop()
            print(f"stopped: {', '.join(info['stopped']) or 'nothing was running'}"
                  + (f" (S3 snapshot: {info['snapshot_objects']} objects)" if info["snapshot_objects"] else ""))
        if args.command in ("start", "restart"):
            info = stack.start(deploy=not args.no_deploy, configure_project=not args.no_configure)
            print(f"started: {', '.join(info['started']) or 'nothing (already running)'} in {info['seconds']} s")
            print(f"  Prefect UI     {info['ui_url']}")
            print(f"  Prefect API    {info['api_url']}")
            print(f"  S3 endpoint    {info['s3_url']}  (bucket {stack.cfg.bucket}; DVC remote 'stack')")
            print(f"  environment    . {info['env_file']}")
            print("  run            . infra/.state/env && prefect deployment run 'dinov2-pipeline/on-demand'")
        if args.command == "status":
            rows = stack.status()
            for row in rows:
                state = "healthy" if row.healthy else ("running, not healthy" if row.alive else "stopped")
                print(f"  {row.name:<7} {state:<21} pid {row.pid or '-':<8} {row.url}   log {row.log}")
            return 0 if all(r.healthy for r in rows) else 3
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
