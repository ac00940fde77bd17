"""The run report: training curves, the evaluation table and the samples of one run.

    python -m pipeline.report runs/tiny

Reads each stage's ``metrics.jsonl`` (``ar/``, ``adapt/``), ``eval/results.md`` and
``samples.txt`` where they exist, draws ``report/{loss,lr,anneal_ratio,tokens_per_s}.png`` and
writes ``report.md`` that shows them together.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.metrics import plot_losses, read_metrics, save_figure

STAGES = {"ar": "autoregressive start", "adapt": "diffusion adaptation"}
CURVES = {"lr": "learning rate", "anneal_ratio": "attention annealing ratio", "tokens_per_s": "throughput (tokens/s)"}


def plot_curve(metrics_files: dict[str, Path], key: str, label: str, out_png: Path) -> Path:
    """One panel per stage of ``key`` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics_files), figsize=(6 * len(metrics_files), 3.5), squeeze=False)
    for axis, (stage, path) in zip(axes[0], metrics_files.items()):
        points = [(r["step"] + 1, r[key]) for r in read_metrics(path) if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), "-")
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
    return save_figure(fig, out_png)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    figures = run_dir / "report"
    figures.mkdir(parents=True, exist_ok=True)
    metrics = {label: run_dir / stage / "metrics.jsonl" for stage, label in STAGES.items()
               if (run_dir / stage / "metrics.jsonl").is_file()}
    sections = [f"# Run report: {run_dir.name}\n"]
    if metrics:
        sections.append("## Training\n")
        plot_losses(metrics, figures / "loss.png")
        sections.append("![train and validation loss](report/loss.png)\n")
        for key, label in CURVES.items():
            plot_curve(metrics, key, label, figures / f"{key}.png")
            sections.append(f"![{label}](report/{key}.png)\n")
    results = run_dir / "eval" / "results.md"
    if results.is_file():
        sections.append("## Evaluation (accuracy, %; details in `eval/results.json`)\n")
        sections.append(results.read_text())
    samples = run_dir / "samples.txt"
    if samples.is_file():
        sections.append("## Samples\n")
        sections.append("```\n" + samples.read_text().rstrip() + "\n```\n")
    report = run_dir / "report.md"
    report.write_text("\n".join(sections))
    return report


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")))
