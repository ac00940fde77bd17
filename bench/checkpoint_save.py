"""What a checkpoint save costs the training loop: synchronous vs ``train.async_save``.

One process, a Megatron-Core GPTModel with Megatron's DDP, optimizer (Adam moments filled by
one step) and LR schedule, saved through ``pipeline.checkpoint.CheckpointSaver`` as training
does, then ``--steps`` training steps. For each mode: the seconds spent in ``save()`` and the
polls (async: publishing, i.e. manifest CRCs, rename, ``latest``, runs there), the whole
cost (wall time minus the steps' own time: an async write slows the steps it overlaps), and
when the checkpoint was published. Both checkpoints are verified. Prints one JSON line with
the async/sync cost ratio measured in this run.

    python bench/checkpoint_save.py [--out /tmp/difftron-checkpoint-bench] [--steps 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_ext.model import build_gpt_model
from pipeline.checkpoint import CheckpointSaver, verify_checkpoint
from pipeline.config import ParallelConfig, load_config
from pipeline.export import init_single_process
from pipeline.train import build_optimizer

# About 100M parameters: a checkpoint (weights and Adam's two moments) of about 1.2 GB.
DEFAULTS = ["model.num_layers=8", "model.hidden_size=768", "model.num_attention_heads=12",
            "model.ffn_hidden_size=2048", "data.seq_length=128"]
VOCAB = 32000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="/tmp/difftron-checkpoint-bench")
    parser.add_argument("--steps", type=int, default=8, help="training steps after the save")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, DEFAULTS + args.overrides)
    init_single_process(cfg)
    model = build_gpt_model(cfg.model, ParallelConfig(), "fp32", VOCAB, cfg.data.seq_length)
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer, scheduler = build_optimizer(cfg, model)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (2, cfg.data.seq_length))
    positions = torch.arange(cfg.data.seq_length).expand_as(tokens)

    def train_step() -> None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(tokens, positions, None, labels=tokens).float().mean().backward()
        model.finish_grad_sync()
        optimizer.step()

    train_step()  # Adam's moments exist from here on
    step_s = min(_timed(train_step) for _ in range(3))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    result = {}
    for mode in ("sync", "async"):
        saver = CheckpointSaver(out / mode, async_save=mode == "async")
        start = time.perf_counter()
        path = saver.save(1, model, optimizer, scheduler, {"bench": True})
        blocked = time.perf_counter() - start
        published = blocked if saver.poll() else None  # a synchronous save is published on return
        for _ in range(args.steps):  # training goes on while an async save writes
            train_step()
            began = time.perf_counter()
            if saver.poll() and published is None:  # publishing (CRCs, rename) runs on the loop
                published = time.perf_counter() - start
            blocked += time.perf_counter() - began
        saver.wait()
        total = time.perf_counter() - start
        problem = verify_checkpoint(path)
        assert problem is None, f"{mode}: {problem}"
        result[mode] = {
            "save_call_and_polls_s": round(blocked, 3),
            # What the save cost the loop, all told: the steps ran slower while a background
            # process wrote (on CPU, copy-on-write of the pages the steps update).
            "cost_s": round(total - args.steps * step_s, 3),
            "published_after_s": round(published if published is not None else total, 3),
        }
    size = sum(p.stat().st_size for p in (out / "sync" / "iter_0000001").iterdir())
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({
        "bench": "checkpoint_save",
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "params": params,
        "checkpoint_mb": round(size / 1e6),
        "train_step_s": round(step_s, 3),
        **{f"{mode}_{key}": value for mode, values in result.items() for key, value in values.items()},
        "async_vs_sync_cost": round(result["async"]["cost_s"] / result["sync"]["cost_s"], 3),
    }))


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
