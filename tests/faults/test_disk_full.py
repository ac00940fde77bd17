"""A disk that fills up: the run directory on a small tmpfs. A checkpoint that cannot fit is
refused before a byte is written; one that fails mid-write (no space left) is removed; the
error is one line naming the checkpoint, and the checkpoints already saved stay intact."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_tiny_recipe
from pipeline.checkpoint import latest_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("disk-full"), 520,
                             train={"steps": 8, "save_interval": 2, "keep_last": 0})


@pytest.fixture
def small_disk(tmp_path):
    """Mounts tmpfs file systems (``small_disk(size="5m", nr_inodes=...)``) under tmp_path."""
    mounts = []

    def mount(**options) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        spec = ",".join(f"{key}={value}" for key, value in options.items())
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", spec, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def train(recipe: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(out),
               "parallel.nproc_per_node=1", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(recipe, small_disk):
    out = small_disk(size="256k") / "run"
    result = train(recipe, out)
    assert result.returncode != 0
    assert "MB free, but a checkpoint of this model needs at least" in result.stderr
    assert not (out / "metrics.jsonl").exists()  # refused before the first step


def test_a_checkpoint_that_would_not_fit_is_refused_and_the_run_resumes_once_there_is_room(recipe, small_disk, tmp_path):
    out = small_disk(size="5m") / "run"  # two checkpoints of ~2.1 MB fit, a third does not
    result = train(recipe, out)
    assert result.returncode != 0
    assert ("checkpoint iter_0000006 not written" in result.stderr
            and "free space (or lower train.keep_last) and run again to resume from iter_0000004" in result.stderr)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert verify_checkpoint(checkpoints / "iter_0000002") is None
    assert verify_checkpoint(checkpoints / "iter_0000004") is None

    # Room made (and fewer checkpoints kept), the run resumes and matches one that had room.
    shutil.rmtree(checkpoints / "iter_0000002")
    resumed = train(recipe, out, "train.keep_last=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "iter_0000004" in resumed.stdout
    roomy = train(recipe, tmp_path / "roomy")
    assert roomy.returncode == 0, roomy.stderr[-3000:]
    losses = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                          if "loss" in r}
    assert losses(out) == losses(tmp_path / "roomy")


def test_no_space_left_in_the_middle_of_a_save_removes_it_and_keeps_the_previous_one(recipe, small_disk):
    # Bytes to spare, but few inodes: measure what a run with one checkpoint uses, then give the
    # next run three more than that, so its second save runs out of them part-way.
    probe = small_disk(size="64m", nr_inodes=1000)
    first = train(recipe, probe / "run", "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    stats = os.statvfs(probe)
    used = stats.f_files - stats.f_ffree

    out = small_disk(size="64m", nr_inodes=used + 3) / "run"
    result = train(recipe, out, "train.steps=4")
    assert result.returncode != 0
    assert ("checkpoint iter_0000004: saving under" in result.stderr
            and "failed (No space left on device); the partial save was removed and iter_0000002 is still the latest"
            in result.stderr), result.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert not (checkpoints / "iter_0000004.tmp").exists()
    assert latest_checkpoint(checkpoints).name == "iter_0000002"
    assert verify_checkpoint(checkpoints / "iter_0000002") is None


def test_data_prep_on_a_full_disk_fails_in_one_line_and_resumes_once_there_is_room(recipe, small_disk):
    disk = small_disk(size="256k")  # shard 0 takes ~110 KB, the next ones ~18 KB
    prefix = disk / "corpus"
    command = [sys.executable, "-m", "data_prep", "build-sharded", "--input", str(recipe.parent / "corpus.txt"),
               "--tokenizer", str(recipe.parent / "tokenizer"), "--output-prefix", str(prefix),
               "--documents-per-shard", "500"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {prefix}.shard-") and error.endswith(
        ": cannot write the dataset (No space left on device); its partial files were removed, "
        "finished outputs are intact")
    finished = {p.name: p.stat().st_mtime_ns for p in disk.iterdir()}
    assert finished and not [name for name in finished if ".tmp-" in name]

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    kept = json.loads(resumed.stdout)["kept"]
    assert len(kept) == len(finished) // 2  # a .bin and an .idx per finished shard
    assert all((disk / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
