"""TP=2, PP=2, CP=2 and DP=2 train exactly like one process: same batch, noise and annealing mask,
same loss and gradient norm, step after step (the loss of later steps checks the updates)."""

import json

import pytest

from conftest import torchrun_train, write_tiny_recipe

pytestmark = pytest.mark.slow

# 1024 rows are a multiple of 64 x TP for TP = 1 and 2: both layouts pad the vocab alike.
VOCAB = 1024
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "cp2": ["parallel.cp=2"], "dp2": []}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    # Three steps with annealing over four: r = 0.25, 0.5, 0.75 (random masks in every step).
    recipe = write_tiny_recipe(root, VOCAB, diffusion={"anneal_steps": 4},
                               train={"save_interval": 100, "lr": 3e-3})
    # Every layout starts from the same weights: one step at lr = 0 saves the initialisation.
    start = torchrun_train(recipe, root / "start", 1, "train.steps=1", "train.save_interval=1", "train.lr=0")
    results = {}
    for name, overrides in {"single": [], **LAYOUTS}.items():
        nproc = 1 if name == "single" else 2
        out = root / name
        torchrun_train(recipe, out, nproc, f"train.init_checkpoint={start}", *overrides)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[name] = [r for r in rows if "loss" in r]
    return results


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(runs, layout):
    single, parallel = runs["single"], runs[layout]
    assert len(single) == len(parallel) == 3
    for a, b in zip(single, parallel):
        assert 0 < a["anneal_ratio"] < 1
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (layout, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (layout, a["step"])
