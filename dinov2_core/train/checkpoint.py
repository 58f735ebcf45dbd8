"""Resumable, atomic training checkpoints (torch.distributed.checkpoint) and official-format exports.

Layout under ``root``::

    step_00000300/            one complete checkpoint (never partially written: see below)
        .metadata, *.distcp   model (student, teacher, heads, loss centres) + optimizer, sharded per rank (DCP)
        rng_rank<r>.pt        torch / CUDA / numpy / python RNG states of rank r
        meta.json             step, data position, config digest, world size, anything the caller adds
    latest                    name of the newest complete checkpoint (a convenience; discovery does not need it)

Atomicity: every rank writes into ``.tmp-step_<n>/``; after a barrier rank 0 adds ``meta.json`` and renames the
folder to ``step_<n>`` (a directory rename is atomic on POSIX). A process killed at any moment (even ``kill -9``)
leaves either the previous complete checkpoints or a ``.tmp-*`` folder that the next run deletes. DCP reshards on
load, so a run saved by N processes resumes with M. Files we read with ``torch.load`` use ``weights_only=True``.

``root`` may also be a URL (``s3://bucket/prefix``, any fsspec filesystem; options such as the endpoint are passed
in by the caller, this module names no object-store client). Object stores have no rename, so there every rank
writes straight into ``step_<n>/`` and rank 0 writes ``meta.json`` last: it is the commit marker. A checkpoint
without it is incomplete, ignored by discovery and deleted by :meth:`Checkpointer.clean_partial`.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_path, atomic_write_text

CKPT_RE = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _distributed() -> bool:
    """More than one rank. A one-process group skips collectives: on CPU a gloo collective runs tensor work on
    gloo's own threads, which gives libgomp more threads than cores; from then on OpenMP threads sleep at every
    parallel region instead of spinning, and each later training step ran ~40% slower (0.65 -> 0.93 s, quality
    profile, 2 cores)."""
    return dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _quiet_single_process():
    """``no_dist=True`` is deliberate here; DCP's warning about it would only be noise in the stage log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, fsync and a rename: readers never see half a file."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors / plain Python (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpointer
@torch.no_grad()
def fill_missing_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter an optimizer state (a zero-lr step on zero gradients, for those without one only).

    AdamW creates a parameter's state at its first gradient. A checkpoint saved while some parameter never had one
    (e.g. a token that no batch has used yet) would lack entries that a fresh optimizer, initialised for loading,
    expects ("Missing key in checkpoint state_dict"). Parameters that already have a state are untouched.
    """
    missing = {id(p) for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)}
    if not missing:
        return 0
    saved = []
    for g in optimizer.param_groups:
        saved.append((g, g["lr"], [p.grad for p in g["params"]]))
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
    try:
        optimizer.step()
    finally:
        for g, lr, grads in saved:
            g["lr"] = lr
            for p, grad in zip(g["params"], grads):
                p.grad = grad
    return len(missing)


def _filtered(sd: dict[str, Any], exclude_prefixes: Iterable[str]) -> dict[str, Any]:
    prefixes = tuple(exclude_prefixes)
    return {k: v for k, v in sd.items() if not (prefixes and k.startswith(prefixes))}


class Checkpointer:
    """Periodic, atomic, resumable checkpoints of a (possibly FSDP2-sharded) model and its optimizer.

    ``exclude_prefixes`` leaves state-dict entries out of checkpoints (e.g. a frozen distillation teacher that is
    reloaded from its own file).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2, exclude_prefixes: Iterable[str] = (),
                 storage_options: dict[str, Any] | None = None) -> None:
        self.keep = max(1, int(keep))
        self.exclude_prefixes = tuple(exclude_prefixes)
        self.storage_options = dict(storage_options or {})
        self.is_url = "://" in str(root)
        if self.is_url:
            import fsspec

            self.root: Any = str(root).rstrip("/")
            self._fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)
        else:
            self.root = Path(root)

    def read_meta(self, path: str | os.PathLike) -> dict[str, Any]:
        """meta.json of a checkpoint that :meth:`list` / :meth:`latest` returned."""
        if self.is_url:
            return json.loads(self._fs.cat_file(f"{path}/meta.json"))
        return json.loads((Path(path) / "meta.json").read_text())

    # -- discovery ------------------------------------------------------------------------------------------
    def _url_steps(self) -> builtins.list[tuple[int, str, bool]]:
        """(step, url, committed) of every ``step_*`` prefix under a URL root, listed fresh (no cached listing)."""
        self._fs.invalidate_cache()
        try:
            names = self._fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = CKPT_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
            if m:
                url = f"{self.root}/{m.group(0)}"
                done = self._fs.exists(f"{url}/meta.json") and self._fs.exists(f"{url}/.metadata")
                out.append((int(m.group(1)), url, done))
        return sorted(out)

    def list(self) -> builtins.list[tuple[int, Any]]:
        if self.is_url:
            return [(step, url) for step, url, done in self._url_steps() if done]
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file() and (p / ".metadata").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Any:
        """The newest complete checkpoint (a Path, or a URL string for URL roots), or None."""
        found = self.list()
        return found[-1][1] if found else None

    def clean_partial(self) -> builtins.list[str]:
        """Remove what a run killed while saving left behind (rank 0 only): ``.tmp-*`` folders, or uncommitted
        ``step_*`` prefixes under a URL root."""
        removed = []
        if _rank() == 0 and self.is_url:
            for _, url, done in self._url_steps():
                if not done:
                    self._fs.rm(url, recursive=True)
                    removed.append(url.rsplit("/", 1)[-1])
        elif _rank() == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-step_*"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        _barrier()
        return removed

    def clear(self) -> None:
        """Delete every checkpoint (rank 0), e.g. when they belong to a different configuration."""
        if _rank() == 0 and self.is_url:
            for _, url, _ in self._url_steps():
                self._fs.rm(url, recursive=True)
            if self._fs.exists(f"{self.root}/latest"):
                self._fs.rm(f"{self.root}/latest")
        elif _rank() == 0 and self.root.is_dir():
            for _, p in self.list():
                shutil.rmtree(p, ignore_errors=True)
            (self.root / "latest").unlink(missing_ok=True)
        _barrier()

    # -- save / load ----------------------------------------------------------------------------------------
    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": _filtered(get_model_state_dict(model), self.exclude_prefixes)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        return state

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        if self.is_url:
            return self._save_url(step, model, optimizer, meta)
        import torch.distributed.checkpoint as dcp

        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        rank = _rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if optimizer is not None:
            fill_missing_optimizer_state(optimizer)
        with _quiet_single_process():
            dcp.save(self._state(model, optimizer), checkpoint_id=str(tmp), no_dist=not _distributed())
        atomic_save(capture_rng_state(), tmp / f"rng_rank{rank}.pt")
        _barrier()
        if rank == 0:
            full_meta = dict(meta, step=int(step), world_size=dist.get_world_size() if dist.is_initialized() else 1,
                             saved_at=time.time())
            atomic_write_text(tmp / "meta.json", json.dumps(full_meta, indent=2, sort_keys=True) + "\n", fsync=True)
            _fsync_dir(tmp)
            old = None
            if final.exists():  # the same step saved again (a rerun of a finished run): swap, then drop the old one
                old = self.root / f".old-{name}-{os.getpid()}"
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            atomic_write_text(self.root / "latest", name + "\n", fsync=True)
            for _, p in self.list()[: -self.keep]:
                shutil.rmtree(p, ignore_errors=True)
        _barrier()
        return final

    def _save_url(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  meta: dict[str, Any]) -> str:
        """Object-store variant of :meth:`save`: write in place, then commit with meta.json (rank 0, last)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        name = f"step_{step:08d}"
        final = f"{self.root}/{name}"
        rank = _rank()
        if rank == 0 and self._fs.exists(final):  # the same step saved again (a rerun): uncommit, then rewrite
            self._fs.rm(final, recursive=True)
        _barrier()
        if optimizer is not None:
            fill_missing_optimizer_state(optimizer)
        with _quiet_single_process(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fsync not supported")  # object stores have no fsync
            dcp.save(self._state(model, optimizer), storage_writer=FsspecWriter(final, **self.storage_options),
                     no_dist=not _distributed())
        buf = io.BytesIO()
        torch.save(capture_rng_state(), buf)
        self._fs.pipe_file(f"{final}/rng_rank{rank}.pt", buf.getvalue())
        _barrier()
        if rank == 0:
            full_meta = dict(meta, step=int(step), world_size=dist.get_world_size() if dist.is_initialized() else 1,
                             saved_at=time.time())
            text = json.dumps(full_meta, indent=2, sort_keys=True) + "\n"
            self._fs.pipe_file(f"{final}/meta.json", text.encode())
            self._fs.pipe_file(f"{self.root}/latest", (name + "\n").encode())
            for _, old in self.list()[: -self.keep]:
                self._fs.rm(old, recursive=True)
        _barrier()
        return final

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load model + optimizer (resharded to the current world) and this rank's RNG states; returns meta.json
        with ``rng_restored`` telling whether this rank's RNG file existed (it does not after a world-size change)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._state(model, optimizer)
        with _quiet_single_process():
            if self.is_url:
                from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

                dcp.load(state, storage_reader=FsspecReader(str(path), **self.storage_options),
                         no_dist=not _distributed())
            else:
                dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not self.exclude_prefixes))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])
        meta = self.read_meta(path)
        meta["rng_restored"] = False
        rng_state = self._read_rng(path) if restore_rng else None
        if rng_state is not None:
            restore_rng_state(rng_state)
            meta["rng_restored"] = True
        return meta

    def _read_rng(self, path: str | os.PathLike) -> dict[str, Any] | None:
        """This rank's RNG file, or None (it does not exist after a change of world size)."""
        name = f"rng_rank{_rank()}.pt"
        if self.is_url:
            url = f"{path}/{name}"
            if not self._fs.exists(url):
                return None
            return torch.load(io.BytesIO(self._fs.cat_file(url)), weights_only=True)
        rng_file = Path(path) / name
        return torch.load(rng_file, weights_only=True) if rng_file.is_file() else None


def checkpoint_failure(exc: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (a BaseException whose text is every failing rank's traceback):
    the lowest failing rank's; any other exception as it is."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return exc
    first = failures[min(failures)]  # (exception, traceback)
    return first[0] if isinstance(first, tuple) else first


__all__ = ["CKPT_RE", "Checkpointer", "atomic_save", "capture_rng_state", "checkpoint_failure",
           "fill_missing_optimizer_state", "restore_rng_state"]
