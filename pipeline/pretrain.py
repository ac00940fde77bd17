"""The whole mission on one machine: data -> AR start -> diffusion adaptation -> HF -> samples.

    python -m pipeline pretrain --config configs/tiny.yaml [section.key=value ...]

Each stage skips what a previous run already finished (the tokenizer, the datasets, a stage
whose last checkpoint exists, which the trainer resumes from otherwise), so an interrupted
run continues where it stopped. Training stages run as torchrun jobs of ``pipeline.train``:
the same entry point that runs on a cluster, with only the config differing.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import RunConfig, save_config
from pipeline.metrics import plot_losses


def prepare_data(cfg: RunConfig) -> None:
    """Train the tokenizer and tokenize the corpus when the recipe ships raw text."""
    if not cfg.data.corpus:
        return
    from data_prep.build import build_indexed_dataset
    from data_prep.tokenizer import load_tokenizer, train_bpe_tokenizer

    if not Path(cfg.data.tokenizer).is_dir():
        print(f"== training a {cfg.data.tokenizer_vocab_size}-token BPE tokenizer on {cfg.data.corpus}")
        train_bpe_tokenizer(cfg.data.corpus, cfg.data.tokenizer_vocab_size, cfg.data.tokenizer)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(cfg.data.prefixes) != 1:
        raise ValueError("data.corpus: tokenizes into exactly one prefix; list one in data.prefixes")
    summary = build_indexed_dataset(cfg.data.corpus, tokenizer, cfg.data.prefixes[0])
    print(f"== dataset {cfg.data.prefixes[0]}: {summary['documents']} documents, {summary['tokens']} tokens")


def ar_stage_config(cfg: RunConfig) -> RunConfig:
    """The autoregressive starting point: same model and data, next-token loss, causal mask."""
    stage = copy.deepcopy(cfg)
    stage.diffusion.objective = "ar"
    stage.train.steps = cfg.init.ar_steps
    stage.train.lr = cfg.init.ar_lr
    stage.train.init_checkpoint = None
    return stage


def training_stages(cfg: RunConfig) -> list[tuple[RunConfig, Path]]:
    """The run's training stages in order, as (stage config, stage directory)."""
    stages = []
    adapt = copy.deepcopy(cfg)
    if cfg.init.source == "ar_pretrain":
        ar_dir = cfg.run_dir / "ar"
        stages.append((ar_stage_config(cfg), ar_dir))
        adapt.train.init_checkpoint = str(ar_dir / "checkpoints")
    stages.append((adapt, cfg.run_dir / "adapt"))
    return stages


def finished_checkpoint(cfg: RunConfig, out_dir: Path):
    """The stage's last checkpoint if it reached ``train.steps``, else None."""
    final = checkpoint.latest_checkpoint(out_dir / "checkpoints")
    if final is not None and checkpoint.read_manifest(final)["step"] >= cfg.train.steps:
        return final
    return None


def run_training_stage(cfg: RunConfig, out_dir: Path) -> Path:
    """Run ``pipeline.train`` under torchrun; returns the stage's final checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    save_config(cfg, config_path)
    final = finished_checkpoint(cfg, out_dir)
    if final is not None:
        print(f"== {out_dir} already finished ({final.name})")
        return final
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={cfg.parallel.nproc_per_node}",
        "-m", "pipeline.train", "--config", str(config_path), "--out", str(out_dir),
    ]
    print(f"== {cfg.diffusion.objective} training -> {out_dir}: {' '.join(command[2:])}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    subprocess.run(command, check=True, env=env)
    return checkpoint.latest_checkpoint(out_dir / "checkpoints")


def print_samples(cfg: RunConfig, export_dir: Path) -> str:
    """Generate from a prompt and infill a gap with the exported model; returns the text."""
    from pipeline.sample import generate_and_infill

    text = generate_and_infill(export_dir, cfg)
    (cfg.run_dir / "samples.txt").write_text(text)
    print(text)
    return text


def pretrain(cfg: RunConfig) -> Path:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.init.source == "hf":
        from pipeline.hf_import import start_from_hf

        cfg = start_from_hf(cfg, run_dir / "import")
    prepare_data(cfg)
    stages = training_stages(cfg)
    for stage, stage_dir in stages:
        run_training_stage(stage, stage_dir)
    return finish_run(cfg, stages)


def finish_run(cfg: RunConfig, stages: list[tuple[RunConfig, Path]]) -> Path:
    """After the training stages: the loss curves, the export of the last stage, samples."""
    labels = {"ar": "autoregressive start", "diffusion": "diffusion adaptation"}
    plot = plot_losses({labels[stage.diffusion.objective]: stage_dir / "metrics.jsonl"
                        for stage, stage_dir in stages}, cfg.run_dir / "loss.png")
    print(f"== loss curves: {plot}")

    from pipeline.export import export_to_hf

    final_stage, final_dir = stages[-1]
    final = checkpoint.latest_checkpoint(final_dir / "checkpoints")
    export_dir = export_to_hf(final_stage, final, cfg.run_dir / "export")
    print(f"== exported {final} -> {export_dir}")
    print_samples(cfg, export_dir)
    return export_dir
