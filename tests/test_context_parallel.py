"""Context-parallel attention (CP=2 under torchrun with gloo) equals attention over the whole
sequence computed in one process, outputs and gradients, for each mask the recipe uses:
causal (the AR stage), a random annealing mask, and none (bidirectional)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.context_parallel import chunk_order, local_query_positions

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def test_chunks_are_megatrons_load_balanced_split():
    assert chunk_order(2) == [0, 3, 1, 2]
    assert local_query_positions(4, cp_rank=1, cp_size=2).tolist() == [2, 3, 4, 5]
    covered = torch.cat([local_query_positions(4, r, 2) for r in range(2)]).sort().values
    assert torch.equal(covered, torch.arange(8))


def test_cp2_attention_equals_whole_sequence_attention():
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)],
        cwd=WORKER.parents[1], env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for mask in ("causal", "annealing", "none"):
        assert result.stdout.count(f"{mask}: outputs and gradients match") == 2, result.stdout
