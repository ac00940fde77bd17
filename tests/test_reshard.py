"""Resharding mid-run: a run saved at TP=2 resumes at TP=1 (and PP=2), one saved at CP=2 at
CP=1, and each continues with the loss an uninterrupted single-process run has, within float
tolerance (the layouts sum in another order)."""

import json

import pytest

from conftest import torchrun_train, write_tiny_recipe

pytestmark = pytest.mark.slow

VOCAB = 1024  # padded alike at TP = 1 and 2, so the embedding shards reassemble exactly


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The recipe and its uninterrupted single-process losses."""
    root = tmp_path_factory.mktemp("reshard")
    recipe = write_tiny_recipe(root, VOCAB, diffusion={"anneal_steps": 3},
                               train={"steps": 6, "save_interval": 100, "lr": 3e-3})
    torchrun_train(recipe, root / "reference", 1)
    return recipe, losses(root / "reference")


@pytest.mark.parametrize(
    "save_layout, resume_layout",
    [("parallel.tp=2", "parallel.tp=1"), ("parallel.tp=2", "parallel.pp=2"), ("parallel.cp=2", "parallel.cp=1")],
    ids=["tp2-tp1", "tp2-pp2", "cp2-cp1"],
)
def test_checkpoint_resumes_at_another_layout(reference, tmp_path, save_layout, resume_layout):
    recipe, expected = reference
    run = tmp_path / "run"
    torchrun_train(recipe, run, 2, save_layout, "train.exit_interval=3")
    nproc = 2 if resume_layout == "parallel.pp=2" else 1
    torchrun_train(recipe, run, nproc, resume_layout)
    got = losses(run)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
