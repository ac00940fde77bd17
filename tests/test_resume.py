"""A run stopped part way and resumed ends exactly where an uninterrupted run ends: same
losses step for step and bit-identical weights (data order, noise, annealing mask, optimizer
and LR schedule all restored)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun_train, write_tiny_recipe
from pipeline.config import load_config
from pipeline.export import export_to_hf

pytestmark = pytest.mark.slow


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def test_stop_and_resume_is_bit_exact(tmp_path):
    recipe = write_tiny_recipe(tmp_path, 520, diffusion={"anneal_steps": 3},
                               train={"steps": 6, "save_interval": 100, "warmup_steps": 2})
    straight = torchrun_train(recipe, tmp_path / "straight", 2)
    torchrun_train(recipe, tmp_path / "resumed", 2, "train.exit_interval=3")
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "iter_0000003"
    resumed = torchrun_train(recipe, tmp_path / "resumed", 2)

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    cfg = load_config(recipe)
    a = load_file(export_to_hf(cfg, straight, tmp_path / "hf_straight") / "model.safetensors")
    b = load_file(export_to_hf(cfg, resumed, tmp_path / "hf_resumed") / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
