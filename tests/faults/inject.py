"""``pipeline.train`` with a fault injected, for the fault tests; run it under torchrun in place
of ``-m pipeline.train``:

    torchrun ... tests/faults/inject.py nan-batches=3,4,5 -- --config recipe.yaml --out run
    torchrun ... tests/faults/inject.py hang=step:3,rank:1 -- --config ...

``nan-batches``: after the backward pass on those data batches, one gradient is set to NaN on
every rank (as a bad batch would); ``hang``: that rank stops responding at that step.
"""

import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline import train  # noqa: E402


def inject_nan_gradients(batches: set[int]) -> None:
    run_batch = train.run_batch

    def faulty(cfg, model, objective, dataset, batch_index, step, forward_only):
        loss = run_batch(cfg, model, objective, dataset, batch_index, step, forward_only)
        if not forward_only and batch_index in batches:
            param = next(model.parameters())
            getattr(param, "main_grad", param.grad).fill_(float("nan"))
        return loss

    train.run_batch = faulty


def inject_hang(step: int, rank: int) -> None:
    run_batch = train.run_batch

    def faulty(cfg, model, objective, dataset, batch_index, at_step, forward_only):
        if not forward_only and at_step == step and dist.get_rank() == rank:
            time.sleep(3600)
        return run_batch(cfg, model, objective, dataset, batch_index, at_step, forward_only)

    train.run_batch = faulty


if __name__ == "__main__":
    fault, separator, *train_args = sys.argv[1:]
    assert separator == "--", __doc__
    kind, _, value = fault.partition("=")
    if kind == "nan-batches":
        inject_nan_gradients({int(b) for b in value.split(",")})
    elif kind == "hang":
        where = dict(item.split(":") for item in value.split(","))
        inject_hang(int(where["step"]), int(where["rank"]))
    else:
        raise SystemExit(f"unknown fault {fault!r}\n{__doc__}")
    train.main(train_args)
