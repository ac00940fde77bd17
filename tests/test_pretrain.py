"""`python -m pipeline pretrain` end to end on the tiny recipe (shortened), as `make pretrain` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def shortened(tmp: Path) -> list[str]:
    return [
        f"output_dir={tmp}",
        "name=e2e",
        f"data.tokenizer={tmp}/tokenizer",
        f"data.prefixes=[{tmp}/data/jargon]",
        f"data.cache_dir={tmp}/data/cache",
        "data.tokenizer_vocab_size=512",
        "data.seq_length=64",
        "model.max_position_embeddings=64",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.ffn_hidden_size=172",
        "model.num_layers=2",
        "init.ar_steps=60",
        "init.ar_lr=3e-3",
        "train.steps=120",
        "train.lr=3e-3",
        "train.eval_interval=60",
        "train.save_interval=60",
        "train.log_interval=20",
        "diffusion.anneal_steps=20",
        "sample.length=16",
        "sample.steps=8",
        "wandb_mode=disabled",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    command = [sys.executable, "-m", "pipeline", "pretrain", "--config", "configs/tiny.yaml", *shortened(tmp)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    return tmp / "e2e", first.stdout, again.stdout


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_adaptation_lowers_the_diffusion_validation_loss(run):
    run_dir, _, _ = run
    rows = metrics(run_dir / "adapt" / "metrics.jsonl")
    before = next(r["val_loss_before"] for r in rows if "val_loss_before" in r)
    after = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    # The validation noise is fixed, so the drop is deterministic; the 1/t-weighted loss is
    # dominated by low-t sequences, so on a 2-layer model over 120 steps it is a few percent.
    assert after < 0.985 * before, (before, after)
    logged = [r for r in rows if "loss" in r]
    assert all({"lr", "tokens_per_s", "anneal_ratio"} <= r.keys() for r in logged)
    assert logged[-1]["anneal_ratio"] == 1.0
    samples = [r["sample"] for r in rows if r.get("sample")]
    assert samples and all(s.startswith("The hacker") for s in samples)  # decoded while training


def test_adaptation_starts_from_the_autoregressive_stage(run):
    run_dir, stdout, _ = run
    assert (run_dir / "ar" / "checkpoints" / "latest").is_file()
    ar = metrics(run_dir / "ar" / "metrics.jsonl")
    assert [r["val_loss"] for r in ar if "val_loss" in r][-1] < ar[0]["val_loss_before"]
    assert "initialised weights from" in stdout or (run_dir / "adapt" / "checkpoints" / "latest").is_file()


def test_outputs_and_samples(run):
    run_dir, stdout, _ = run
    assert "--- sample" in stdout and "--- infill" in stdout
    assert (run_dir / "samples.txt").read_text().strip()
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "adapt" / "config.yaml").is_file()


def test_export_loads_in_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir = run[0] / "export"
    config = json.loads((export / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert config["mask_token_id"] == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert config["bidirectional_attention"] is True
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


def test_a_second_run_resumes_instead_of_redoing(run):
    _, _, again = run
    assert again.count("already finished") == 2
