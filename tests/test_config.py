"""Recipes load, overrides apply, and every bad input is one clear line naming the field."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

RECIPES = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.train.steps > 0 and cfg.data.seq_length > 0


def test_recipes_carry_the_papers_hyperparameters():
    s = load_config("configs/diffugpt-s.yaml")
    assert (s.train.steps, s.train.global_batch_size, s.data.seq_length) == (1_000_000, 256, 512)
    assert s.train.lr == 3e-4 and s.train.lr_schedule == "cosine" and s.train.warmup_steps == 2000
    llama = load_config("configs/diffullama-7b.yaml")
    assert llama.train.lr == 2e-5 and llama.train.lr_schedule == "constant"
    assert (llama.train.adam_beta1, llama.train.adam_beta2, llama.train.weight_decay) == (0.9, 0.95, 0.1)
    assert llama.data.seq_length == 2048 and llama.data.weights == [0.7, 0.3]


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-4", "parallel.nproc_per_node=4", "parallel.tp=2",
                                            "diffusion.shift=false"])
    assert cfg.train.lr == 3e-4 and cfg.parallel.tp == 2 and cfg.diffusion.shift is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("diffusion.normalization=mean", "diffusion.normalization: expected one of"),
        ("parallel.tp=3", "not divisible by tp*pp*cp"),
        ("train.global_batch_size=10", "train.global_batch_size: expected a multiple"),
        ("diffusion.eps=1.5", "diffusion.eps"),
        ("model.num_layers=3 ", "parallel.pp"),
        ("nonsense", "expected key.path=value"),
    ],
)
def test_bad_input_is_one_clear_line(override, message):
    overrides = [override]
    if override.startswith("model.num_layers"):
        overrides = ["model.num_layers=3", "parallel.pp=2"]
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_context_parallel_needs_a_sequence_that_splits_evenly():
    assert load_config("configs/tiny.yaml", ["parallel.cp=2"]).parallel.cp == 2
    with pytest.raises(ConfigError, match=r"data.seq_length: 126 must split into 2 x parallel.cp = 4 "):
        load_config("configs/tiny.yaml", ["parallel.cp=2", "data.seq_length=126"])


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
