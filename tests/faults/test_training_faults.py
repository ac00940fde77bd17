"""Faults during training: NaN gradients (skipped, or rolled back past), a rank that hangs,
checkpoints saved in the background, and a disk that fills up. Each run recovers or ends
with one clear line, and no finished checkpoint is lost."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import REPO, torchrun_train, write_tiny_recipe
from pipeline.checkpoint import latest_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow

INJECT = Path(__file__).with_name("inject.py")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("training-faults"), 520,
                             diffusion={"anneal_steps": 3},
                             train={"steps": 8, "save_interval": 2, "keep_last": 0})


def run(recipe: Path, out: Path, *overrides: str, fault: str | None = None, nproc: int = 1,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """pipeline.train under torchrun (with ``fault`` injected by inject.py); does not assert."""
    target = [str(INJECT), fault, "--"] if fault else ["-m", "pipeline.train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *target, "--config", str(recipe), "--out", str(out), f"parallel.nproc_per_node={nproc}",
               *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def progress_saved(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "common.pt", weights_only=False)["progress"]


def test_a_nan_gradient_skips_that_update_and_training_goes_on(recipe, tmp_path):
    out = tmp_path / "run"
    result = run(recipe, out, fault="nan-batches=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: NaN/Inf loss or gradient, update skipped (1 in a row)" in result.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows if "skipped_update" in r] == [3]
    assert all(r["loss"] == r["loss"] for r in rows if r.get("loss") is not None)  # no NaN logged
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000008"


def test_rollback_reloads_the_last_checkpoint_and_skips_the_bad_batches(recipe, tmp_path):
    out = tmp_path / "run"
    result = run(recipe, out, "train.on_bad_steps=rollback", fault="nan-batches=3,4,5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rolled back to iter_0000002 (rollback 1 of at most 2); data skips ahead to batch 6" in result.stdout
    assert [r for r in metrics(out) if "rollback_to" in r] == [
        {"step": 2, "rollback_to": 2, "data_offset": 4}]
    final = latest_checkpoint(out / "checkpoints")
    assert final.name == "iter_0000008"
    assert progress_saved(final) == {"step": 8, "data_offset": 4, "rollbacks": 1}

    # Resumed after the rollback, a run goes on exactly as the uninterrupted one did.
    resumed = tmp_path / "resumed"
    # Five steps, the rollback, then one more step: the job stops after step 2 again.
    first = run(recipe, resumed, "train.on_bad_steps=rollback", "train.exit_interval=6", fault="nan-batches=3,4,5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "rolled back to iter_0000002" in first.stdout
    assert progress_saved(latest_checkpoint(resumed / "checkpoints")) == {"step": 3, "data_offset": 4, "rollbacks": 1}
    second = run(recipe, resumed, "train.on_bad_steps=rollback")
    assert second.returncode == 0, second.stderr[-3000:]
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert losses(metrics(resumed)) == losses(metrics(out))


def test_rollbacks_are_bounded(recipe, tmp_path):
    out = tmp_path / "run"
    # Every batch from 3 on is bad: each rollback meets NaNs again.
    result = run(recipe, out, "train.on_bad_steps=rollback", "train.max_rollbacks=1", "train.max_bad_steps=2",
                 fault="nan-batches=" + ",".join(map(str, range(3, 40))))
    assert result.returncode != 0
    assert result.stdout.count("rolled back to iter_0000002") == 1
    assert "train.max_bad_steps: 2 steps in a row had a NaN/Inf loss or gradient (last: step 3, after 1 rollbacks)" \
        in result.stderr
    assert verify_checkpoint(out / "checkpoints" / "iter_0000002") is None


def test_a_hung_rank_ends_the_job_with_a_clear_message(recipe, tmp_path):
    out = tmp_path / "run"
    began = time.time()
    result = run(recipe, out, "train.hang_timeout_minutes=0.25", fault="hang=step:3,rank:1", nproc=2,
                 timeout=240)
    assert result.returncode != 0
    assert time.time() - began < 180  # not the hour the rank sleeps
    assert "rank 1: train.hang_timeout_minutes: no progress for" in result.stderr
    assert "in step 3 (a stalled collective or data read)" in result.stderr
    assert "inject.py" in result.stderr  # the stalled thread's stack names where it is stuck
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000002"


def test_async_save_writes_the_same_checkpoints(recipe, tmp_path):
    sync_root = torchrun_train(recipe, tmp_path / "sync", 2)
    async_root = torchrun_train(recipe, tmp_path / "async", 2, "train.async_save=true")
    assert sorted(p.name for p in async_root.iterdir()) == sorted(p.name for p in sync_root.iterdir())
    for step in ("iter_0000004", "iter_0000008"):
        assert verify_checkpoint(async_root / step) is None
        tensors = lambda root: FileSystemReader(str(root / step)).read_metadata().state_dict_metadata  # noqa: E731
        assert tensors(async_root).keys() == tensors(sync_root).keys()
    losses = lambda out: [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    # And a run resumes from an async checkpoint.
    resumed = tmp_path / "async-resumed"
    torchrun_train(recipe, resumed, 2, "train.async_save=true", "train.exit_interval=4")
    torchrun_train(recipe, resumed, 2, "train.async_save=true")
    assert losses(resumed) == losses(tmp_path / "sync")
