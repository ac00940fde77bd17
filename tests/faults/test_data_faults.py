"""Corrupted training data: bytes flipped in a dataset's .idx are caught before training
starts, out-of-vocabulary token ids in its .bin at the batch that holds them, each with one
line naming what is wrong, and the checkpoints already written stay intact."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, torchrun_train, write_tiny_recipe
from pipeline.checkpoint import latest_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow

# Megatron's .idx header: magic (9), version (8), dtype code (1), sequence and document counts (8 each).
_IDX_HEADER = 34


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("data-faults"), 520, train={"steps": 4, "save_interval": 2})


def copy_dataset(recipe: Path, to: Path) -> Path:
    to.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(recipe.parent / "data" / f"corpus{suffix}", to / f"corpus{suffix}")
    return to / "corpus"


def train(recipe: Path, out: Path, prefix: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(out), "parallel.nproc_per_node=1",
               f"data.prefixes=[{prefix}]", f"data.cache_dir={prefix.parent / 'cache'}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("field, offset, message", [
    ("a sequence length", _IDX_HEADER + 4 * 10, r"{bin}: \d+ bytes but {idx} describes \d+ \(truncated or mismatched\)"),
    ("a sequence offset", None, r"{idx}: sequence offsets disagree with the sequence lengths \(corrupted\)"),
])
def test_corrupted_index_is_refused_before_training(recipe, tmp_path, field, offset, message):
    prefix = copy_dataset(recipe, tmp_path / "data")
    index = bytearray((tmp_path / "data" / "corpus.idx").read_bytes())
    if offset is None:  # past the int32 lengths, into the int64 offsets
        sequences = int(np.frombuffer(bytes(index[18:26]), dtype=np.int64)[0])
        offset = _IDX_HEADER + 4 * sequences + 8 * 10
    index[offset] ^= 0x5A
    (tmp_path / "data" / "corpus.idx").write_bytes(bytes(index))
    result = train(recipe, tmp_path / "run", prefix)
    assert result.returncode != 0
    expected = "data.prefixes: " + message.format(bin=re.escape(f"{prefix}.bin"), idx=re.escape(f"{prefix}.idx"))
    assert re.search(expected, result.stderr), field
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the first step


def test_out_of_vocabulary_tokens_stop_the_run_at_their_batch_and_keep_its_checkpoints(recipe, tmp_path):
    out = tmp_path / "run"
    torchrun_train(recipe, out, 1, "train.exit_interval=2")  # iter_0000002 written from good data
    prefix = copy_dataset(recipe, tmp_path / "data")
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[::40] = 60_000  # every sample of a batch meets one
    tokens.flush()
    result = train(recipe, out, prefix, "train.save_interval=1")
    assert result.returncode != 0
    assert "data: sample " in result.stderr and (
        "holds token id 60000, outside the tokenizer's 520 ids (a corrupted .bin, or data prepared "
        "with another tokenizer: python -m data_prep verify)") in result.stderr
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000002"
    assert verify_checkpoint(out / "checkpoints" / "iter_0000002") is None
