"""Megatron distributed checkpoints, written atomically and verified on load.

Layout: ``<root>/iter_0000300/`` (a Megatron-Core dist_checkpointing directory plus
``manifest.json``) and ``<root>/latest`` naming the newest complete one. A checkpoint is
saved under ``iter_XXXXXXX.tmp`` and renamed only once every rank has finished writing and
the manifest (step, config fingerprint, tokens seen, size and CRC-32 of every file) is in
place; the ``latest`` pointer is replaced last. An interrupted save therefore leaves the
previous checkpoint as ``latest``, and a checkpoint damaged later (a truncated or corrupted
file) fails its manifest check on load, so the previous good one is used with a warning.
Because the format is Megatron's sharded one, a checkpoint saved at one TP/PP layout loads
at any other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from pipeline.distributed import on_rank0

_ITERATION = re.compile(r"^iter_(\d{7})$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _file_records(directory: Path) -> dict[str, dict]:
    """Size and CRC-32 of every file of a checkpoint (a collective).

    Each rank checksums the shard files it wrote (torch's ``__<rank>_<n>.distcp``), so a
    large checkpoint is read back in parallel rather than by rank 0 alone; rank 0 takes
    what no rank claimed (metadata, common state).
    """
    rank = dist.get_rank()
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != "manifest.json")
    mine = {p.name: _record(p) for p in files if p.name.startswith(f"__{rank}_")}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return {}
    records = {name: record for part in gathered for name, record in part.items()}
    records.update({p.name: _record(p) for p in files if p.name not in records})
    return dict(sorted(records.items()))


def _record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


def verify_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """Why ``path`` is not a complete, undamaged checkpoint, or None when it is.

    ``share=(i, n)`` checks only the i-th of every n files (by name) against the manifest:
    n processes, one share each, check all of it in parallel.
    """
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (an interrupted save)"
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    index, count = share
    for name in sorted(expected)[index::count]:
        record, file = expected[name], path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
        if _crc32(file) != record["crc32"]:
            return f"{name} fails its CRC-32 check (corrupted)"
    return None


def _candidates(root: Path, at_most_step: Optional[int]) -> list[Path]:
    """The checkpoints to try, newest first: from the ``latest`` pointer (or the newest
    ``iter_*`` when the pointer is gone) back, none after ``at_most_step`` when given."""
    if not root.is_dir():
        return []
    candidates = sorted((p for p in root.iterdir() if _ITERATION.match(p.name)), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = pointer.read_text().strip()
        candidates = [p for p in candidates if p.name <= named]
    if at_most_step is not None:
        candidates = [p for p in candidates if p.name <= f"iter_{at_most_step:07d}"]
    return candidates


def latest_checkpoint(root: str | Path, at_most_step: Optional[int] = None) -> Optional[Path]:
    """The newest complete and undamaged checkpoint under ``root`` (saved at ``at_most_step``
    or before, when given), or None; walks back past damaged checkpoints, warning about each."""
    for path in _candidates(Path(root), at_most_step):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({problem}); trying the previous one")
    return None


def latest_checkpoint_all_ranks(root: str | Path, at_most_step: Optional[int] = None) -> Optional[Path]:
    """``latest_checkpoint`` as a collective: each rank checks its share of every candidate's
    files, so a large checkpoint is read back in parallel rather than by one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in on_rank0(lambda: _candidates(Path(root), at_most_step)):
        problems = [None] * world
        dist.all_gather_object(problems, verify_checkpoint(path, share=(rank, world)))
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            return path
        if rank == 0:  # printed: the training log must show it whatever PYTHONWARNINGS says
            print(f"warning: checkpoint {path} is unusable ({problem}); trying the previous one",
                  file=sys.stderr, flush=True)
    return None


def _unwrap(model):
    """The GPTModel inside a DDP wrapper: checkpoints hold its keys, with no 'module.' prefix."""
    return getattr(model, "module", model)


def _prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and every ``keep_every``-th step."""
    complete = sorted(p for p in root.iterdir() if _ITERATION.match(p.name))
    for path in complete[:-keep_last] if keep_last > 0 else []:
        step = int(_ITERATION.match(path.name).group(1))
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


class CheckpointSaver:
    """Saves checkpoints under ``root``; every rank calls :meth:`save`.

    With ``async_save`` the files are written by a background process (Megatron-Core's async
    dist_checkpointing) while training goes on; the manifest, the rename and the ``latest``
    pointer follow once every rank's files are on disk, in :meth:`poll` or :meth:`wait`. One
    save is in flight at a time. A save that would not fit on the disk is refused before a
    byte is written; one that fails anyway (disk full) is removed, and the previous
    checkpoint stays ``latest``.
    """

    def __init__(self, root: str | Path, keep_last: int = 0, keep_every: int = 0,
                 async_save: bool = False):
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self._queue = AsyncCallsQueue() if async_save else None
        self._in_flight: Optional[Path] = None  # the staging directory of an async save

    def save(self, step: int, model, optimizer, scheduler, manifest: dict,
             progress: Optional[dict] = None) -> Path:
        self.wait()
        final = self.root / f"iter_{step:07d}"
        staging = self.root / f"iter_{step:07d}.tmp"
        problem = on_rank0(lambda: self._space_problem(final))
        if problem is not None:
            raise OSError(problem)
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        model_sd = _unwrap(model).sharded_state_dict()
        state = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "progress": dict(progress or {}),
        }
        publish = partial(self._publish, step, staging, final, dict(manifest))
        with self._cleanup_on_failure(staging, final):
            if self._queue is None:
                dist_checkpointing.save(state, str(staging))
                publish()
            else:
                request = dist_checkpointing.save(state, str(staging), async_sharded_save=True)
                request.add_finalize_fn(publish)
                self._queue.schedule_async_request(request)
                self._in_flight = staging
        return final

    def poll(self) -> bool:
        """Publish an async save whose files every rank has written (a collective); True once
        no save is in flight."""
        if self._queue is not None and self._in_flight is not None:
            with self._cleanup_on_failure(self._in_flight, None):
                if self._queue.maybe_finalize_async_calls(blocking=False):
                    self._in_flight = None
        return self._in_flight is None

    def wait(self) -> None:
        """Block until an async save in flight is published (a collective)."""
        if self._queue is not None and self._in_flight is not None:
            with self._cleanup_on_failure(self._in_flight, None):
                self._queue.maybe_finalize_async_calls(blocking=True)
                self._in_flight = None

    def _publish(self, step: int, staging: Path, final: Path, manifest: dict) -> None:
        files = _file_records(staging)  # every rank's files are complete once all get here
        if dist.get_rank() == 0:
            record = {"step": step, "saved_at": time.time(), **manifest, "files": files}
            _write_atomic(staging / "manifest.json", json.dumps(record, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _write_atomic(self.root / "latest", final.name)
            _prune(self.root, self.keep_last, self.keep_every)
        dist.barrier()

    def _space_problem(self, final: Path) -> Optional[str]:
        """Why the next checkpoint would not fit (sized like the newest one), or None."""
        newest = self.root / _latest_name(self.root)
        if not newest.is_dir():
            return None  # train() checked the first one against an estimate
        needed = sum(p.stat().st_size for p in newest.iterdir() if p.is_file())
        free = shutil.disk_usage(self.root).free
        if free >= needed:
            return None
        return (f"checkpoint {final.name} not written: {self.root} has {free / 1e6:.1f} MB free "
                f"and the last checkpoint took {needed / 1e6:.1f} MB; free space (or lower "
                f"train.keep_last) and run again to resume from {newest.name}")

    @contextmanager
    def _cleanup_on_failure(self, staging: Path, final: Optional[Path]):
        try:
            yield
        except (Exception, CheckpointException) as err:  # torch's is a BaseException
            # A full disk (or any write error) mid-save: drop the partial files, keep the rest.
            shutil.rmtree(staging, ignore_errors=True)
            self._in_flight = None
            name = final.name if final is not None else staging.name.removesuffix(".tmp")
            raise OSError(
                f"checkpoint {name}: saving under {self.root} failed ({_reason(err)}); the "
                f"partial save was removed and {_latest_name(self.root)} is still the latest"
            ) from err


def _reason(err: BaseException) -> str:
    """A failed save's root cause in a few words ("No space left on device")."""
    failures = getattr(err, "failures", None)  # torch's CheckpointException: {rank: (error, stack)}
    if failures:
        err = next(iter(failures.values()))[0]
    while not (isinstance(err, OSError) and err.strerror) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    # Megatron's writer re-raises a worker's OSError as text: "Worker failure: [Errno 28] ...".
    found = re.search(r"\[Errno \d+\] ([^:']+)", str(err))
    return found.group(1) if found else f"{type(err).__name__}: {err}"


def _latest_name(root: Path) -> str:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else "no checkpoint"


def check_room_for_first_checkpoint(root: str | Path, model, precision: str) -> None:
    """Refuse a run whose first checkpoint cannot fit, before any training (a collective).

    At least the fp32 master weights and Adam's two moments (and the bf16 weights) per
    parameter; Megatron's metadata comes on top.
    """
    root = Path(root)
    count = torch.tensor([float(sum(p.numel() for p in model.parameters()))],
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
    needed = count.item() * (14 if precision in ("bf16", "fp8") else 12)

    def problem() -> Optional[str]:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if (root / "latest").is_file() or free >= needed:
            return None
        return (f"--out {root.parent}: {free / 1e6:.1f} MB free, but a checkpoint of this model "
                f"needs at least {needed / 1e6:.1f} MB")

    message = on_rank0(problem)
    if message is not None:
        raise OSError(message)


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, manifest: dict) -> Path:
    """One synchronous save (a collective)."""
    return CheckpointSaver(root).save(step, model, optimizer, scheduler, manifest)


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None) -> dict:
    """Load ``path`` into this layout's model (and optimizer, schedule); returns the training
    progress it holds: ``step`` and what train() keeps beside it (``data_offset``, ...)."""
    model_sd = _unwrap(model).sharded_state_dict()
    request = {"model": model_sd}
    if optimizer is not None:
        # is_loading: creates the (empty) Adam moments so the request asks for them.
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    state = dist_checkpointing.load(request, str(path))
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {**state.get("progress", {}), "step": int(state["step"])}


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())
