"""Shared parts for tests that run the real training loop: a small real corpus, tokenizer and
Megatron dataset, a tiny recipe, and `pipeline.train` under torchrun."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets" / "corpus" / "jargon-4.4.7.txt.gz"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tiny_recipe(root: Path, vocab: int, **sections) -> Path:
    """Tokenizer + dataset from the first 200 KB of the corpus, and a 2-layer GQA recipe."""
    from data_prep.build import build_indexed_dataset
    from data_prep.tokenizer import train_bpe_tokenizer

    text = root / "corpus.txt"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text.write_text(f.read(200_000), encoding="utf-8")
    tokenizer = train_bpe_tokenizer([str(text)], vocab, str(root / "tokenizer"))
    build_indexed_dataset([str(text)], tokenizer, str(root / "data" / "corpus"))
    recipe = {
        "name": "tiny-test",
        "output_dir": str(root / "runs"),
        "wandb_mode": "disabled",
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 172, "max_position_embeddings": 64, "rotary_base": 500.0},
        "data": {"tokenizer": str(root / "tokenizer"), "prefixes": [str(root / "data" / "corpus")],
                 "seq_length": 64, "cache_dir": str(root / "cache")},
        "diffusion": {"objective": "diffusion", "anneal_steps": 0},
        "train": {"steps": 3, "micro_batch_size": 4, "global_batch_size": 8, "lr": 1e-2,
                  "log_interval": 1, "eval_interval": 100, "eval_iters": 1, "save_interval": 3},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun_train(recipe: Path, out: Path, nproc: int, *overrides: str) -> Path:
    """Run pipeline.train under torchrun; returns the checkpoints root."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pipeline.train", "--config", str(recipe), "--out", str(out),
               f"parallel.nproc_per_node={nproc}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoints"
