"""Megatron distributed checkpoints, written atomically.

Layout: ``<root>/iter_0000300/`` (a Megatron-Core dist_checkpointing directory plus
``manifest.json``) and ``<root>/latest`` naming the newest complete one. A checkpoint is
saved under ``iter_XXXXXXX.tmp`` and renamed only once every rank has finished writing; the
``latest`` pointer is replaced last. An interrupted save therefore leaves the previous
checkpoint as ``latest``. Because the format is Megatron's sharded one, a checkpoint saved at
one TP/PP layout loads at any other.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "manifest.json").is_file() else None


def _unwrap(model):
    """The GPTModel inside a DDP wrapper: checkpoints hold its keys, with no 'module.' prefix."""
    return getattr(model, "module", model)


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, manifest: dict) -> Path:
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
        manifest = {"step": step, "saved_at": time.time(), **manifest}
        _write_atomic(staging / "manifest.json", json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _write_atomic(root / "latest", final.name)
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
