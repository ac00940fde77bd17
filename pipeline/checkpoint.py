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
import time
import warnings
import zlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

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
    return {
        p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


def verify_checkpoint(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete, undamaged checkpoint, or None when it is."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (an interrupted save)"
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, record in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
        if _crc32(file) != record["crc32"]:
            return f"{name} fails its CRC-32 check (corrupted)"
    return None


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete and undamaged checkpoint under ``root``, or None.

    Starts from the ``latest`` pointer (or the newest ``iter_*`` when the pointer is gone)
    and walks back past damaged checkpoints, warning about each.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if _ITERATION.match(p.name)), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = pointer.read_text().strip()
        candidates = [p for p in candidates if p.name <= named]
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({problem}); trying the previous one")
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


def save_checkpoint(
    root: str | Path, step: int, model, optimizer, scheduler, manifest: dict,
    keep_last: int = 0, keep_every: int = 0,
) -> Path:
    """Save model, optimizer and LR schedule at ``step``; every rank calls this."""
    root = Path(root)
    final = root / f"iter_{step:07d}"
    staging = root / f"iter_{step:07d}.tmp"
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
    }
    dist_checkpointing.save(state, str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        record = {"step": step, "saved_at": time.time(), **manifest, "files": _file_records(staging)}
        _write_atomic(staging / "manifest.json", json.dumps(record, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _write_atomic(root / "latest", final.name)
        _prune(root, keep_last, keep_every)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None) -> int:
    """Load ``path`` into this layout's model (and optimizer, schedule); returns its step."""
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
    return int(state["step"])


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())
