"""Shared parts for tests that run the real training loop: a small real corpus, tokenizer and
Megatron dataset, a tiny recipe, `pipeline.train` under torchrun, and a local SLURM cluster."""

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
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path("/tmp/difftron-slurm-tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    """A real SLURM cluster on this machine (slurm/local_cluster.sh) for the whole session, torn down at the end."""
    env = {**os.environ, "SLURM_LOCAL_DIR": str(CLUSTER_DIR)}
    try:
        up = subprocess.run([str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        up = None
    if up is None or up.returncode == 3:
        subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True, timeout=120)
        reason = "timed out" if up is None else up.stderr.strip().splitlines()[-1]
        pytest.skip(f"no local SLURM cluster: cannot install Slurm here ({reason})")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(CLUSTER_DIR / "slurm.conf"))
        # The jobs inherit this environment (sbatch --export=ALL): keep the two cores shared.
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("PYTHONWARNINGS", "ignore")
        try:
            assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stderr[-3000:]}"
            yield CLUSTER_DIR
        finally:
            subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True, timeout=120)


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
