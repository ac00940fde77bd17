"""Faults around checkpoints: killed jobs, corrupted and partial checkpoints, a checkpoint of
another model. Each run either recovers from the last good checkpoint or fails with one clear
line, and no finished checkpoint is lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, torchrun_train, write_tiny_recipe
from pipeline.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("faults"), 520, diffusion={"anneal_steps": 3},
                             train={"steps": 6, "save_interval": 2, "keep_last": 0})


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(recipe):
    out = recipe.parent / "uninterrupted"
    torchrun_train(recipe, out, 1)
    return out


def test_corrupted_checkpoint_falls_back_to_the_previous_one(recipe, uninterrupted, tmp_path):
    out = tmp_path / "run"
    torchrun_train(recipe, out, 1, "train.exit_interval=4")
    shard = sorted((out / "checkpoints" / "iter_0000004").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"iter_0000004 is unusable \(.*CRC-32"):
        assert latest_checkpoint(out / "checkpoints").name == "iter_0000002"
    torchrun_train(recipe, out, 1)
    assert (out / "checkpoints" / "iter_0000002").is_dir()  # the good one was kept
    final = losses(out)
    assert final[5] == losses(uninterrupted)[5]


def test_interrupted_save_is_ignored(recipe, tmp_path):
    out = tmp_path / "run"
    torchrun_train(recipe, out, 1, "train.exit_interval=2")
    staging = out / "checkpoints" / "iter_0000004.tmp"
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"half a shard")
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000002"


def test_kill_minus_9_at_any_moment_resumes_exactly(recipe, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(out),
               "train.save_interval=1", "train.steps=6"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the whole job (launcher and trainer) once it is saving checkpoints.
    deadline = time.time() + 240
    while not (out / "checkpoints" / "iter_0000002").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    torchrun_train(recipe, out, 1, "train.save_interval=1")
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000006"
    reference, resumed = losses(uninterrupted), losses(out)
    assert 5 in resumed and all(resumed[step] == reference[step] for step in resumed)


def test_checkpoint_of_another_model_is_a_clear_error(recipe, uninterrupted, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(tmp_path / "other"),
               f"train.init_checkpoint={uninterrupted / 'checkpoints'}", "model.hidden_size=128",
               "model.ffn_hidden_size=344"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "saved from a different model shape" in result.stderr


def test_diverging_run_skips_bad_steps_then_stops_clearly(recipe, tmp_path):
    # lr = 1e30: the first update blows the weights up, every later step is NaN.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(tmp_path / "nan"),
               "train.lr=1e30", "train.steps=8", "train.warmup_steps=0", "train.save_interval=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert result.stdout.count("update skipped") == 3
    assert "train.max_bad_steps: 3 steps in a row had a NaN/Inf loss or gradient" in result.stderr
    # The checkpoints written before the stop are intact.
    assert latest_checkpoint(tmp_path / "nan" / "checkpoints") is not None


def test_checkpoint_of_another_tokenizer_is_a_clear_error(recipe, uninterrupted, tmp_path):
    from data_prep.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([str(recipe.parent / "corpus.txt")], 400, str(tmp_path / "tokenizer"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(tmp_path / "other"),
               f"train.init_checkpoint={uninterrupted / 'checkpoints'}", f"data.tokenizer={tmp_path / 'tokenizer'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "saved with a tokenizer of 520 tokens, but data.tokenizer" in result.stderr


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    from pipeline.train import check_writable

    blocked = tmp_path / "file"
    blocked.write_text("a file where the run directory should go")
    with pytest.raises(OSError, match=r"--out .*file/run: cannot write there"):
        check_writable(blocked / "run")
    assert blocked.read_text().startswith("a file")


def test_every_rank_checks_its_share_of_a_checkpoint_on_resume(recipe, tmp_path):
    out = tmp_path / "run"
    torchrun_train(recipe, out, 2, "parallel.tp=2", "train.exit_interval=4")
    damaged = out / "checkpoints" / "iter_0000004"
    # The second file by name: rank 1's share (rank r checks files r, r + 2, ...).
    second = sorted(json.loads((damaged / "manifest.json").read_text())["files"])[1]
    data = bytearray((damaged / second).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / second).write_bytes(bytes(data))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(out),
               "parallel.nproc_per_node=2", "parallel.tp=2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'iter_0000002'} at step 2" in result.stdout
    assert f"iter_0000004 is unusable ({second} fails its CRC-32 check (corrupted))" in result.stderr
