"""Evaluate an exported diffusion LM with lm-evaluation-harness, next to the paper's numbers.

    python -m pipeline.evaluate --config configs/tiny.yaml [--tasks hellaswag piqa] [--limit 200]

Runs the paper's tasks (HellaSwag, WinoGrande, SIQA, PIQA, LAMBADA) through the harness's own
evaluator with the ``difftron`` model (``pipeline.lm_eval_model``) and writes, under
``runs/<name>/eval/``, ``results.json`` (the harness's results and what ran) and
``results.md`` (the table beside the paper's Table 1); then the run report.

The paper's tasks download their data from the Hugging Face Hub. Where it cannot be reached the
evaluation says so and runs a local smoke task instead: multiple choice and last-word
prediction built from the Jargon File shipped in ``assets/``: a check that the whole path runs,
not a measure of quality (the tiny default scores about chance on it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import socket
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, load_config

# Harness task -> the paper's column, and the paper's Table 1 (accuracy, %).
PAPER_TASKS = {
    "hellaswag": "HSwag", "winogrande": "Wino", "social_iqa": "SIQA", "piqa": "PIQA", "lambada_openai": "Lambada",
}
PAPER_RESULTS = {
    "DiffuGPT-S": [33.4, 50.8, 37.0, 57.7, 21.6],
    "DiffuGPT-M": [37.2, 52.6, 39.0, 59.6, 30.3],
    "DiffuLLaMA": [58.7, 56.4, 43.2, 63.3, 53.9],
}
SMOKE_TASKS = ("smoke_choice", "smoke_lastword")
SMOKE_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "jargon-4.4.7.txt.gz"


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """One quick connection instead of the datasets library's minute of retries per task."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def write_task(directory: Path, config: dict, rows: list[dict]) -> None:
    """A harness task over local JSONL: ``config`` without its data source, and the rows."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{config['task']}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test"}
    (directory / f"{config['task']}.yaml").write_text(yaml.safe_dump({**config, **source}, sort_keys=False))


def _corpus_sentences(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = re.sub(r"\s+", " ", f.read())
    sentences = [s.split(" ") for s in re.split(r"(?<=[a-z])\. ", text)]
    # Plain prose only: no cross-references ({...}), headwords (:...:) or brackets.
    return [s for s in sentences if 12 <= len(s) <= 30 and not re.search(r"[{}\[\]:|]", " ".join(s))]


def write_smoke_tasks(directory: Path, examples: int, seed: int = 0) -> None:
    """Multiple choice (a sentence's true last five words among four) and last-word prediction."""
    sentences = _corpus_sentences(SMOKE_CORPUS)
    rng = random.Random(seed)
    picked = rng.sample(sentences, examples * 4)
    choice_rows = []
    for i in range(examples):
        words = picked[i]
        distractors = [" ".join(s[-5:]) for s in picked[examples + 3 * i : examples + 3 * i + 3]]
        label = rng.randrange(4)
        choices = distractors[:label] + [" ".join(words[-5:])] + distractors[label:]
        choice_rows.append({"context": " ".join(words[:-5]), "choices": choices, "label": label})
    write_task(directory, {
        "task": "smoke_choice", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }, choice_rows)
    lastword_rows = [{"context": " ".join(s[:-1]), "target": s[-1].rstrip(".,;!?")} for s in picked[:examples]]
    write_task(directory, {  # scored like lambada_openai: acc is "the last word is generated"
        "task": "smoke_lastword", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}", "metric_list": [{"metric": "acc"}],
    }, lastword_rows)


def run_harness(export_dir: Path, tasks: list[str], task_manager, limit: int | None, model_args: dict) -> dict:
    import lm_eval

    import pipeline.lm_eval_model  # noqa: F401  (registers the "difftron" model)

    results = lm_eval.simple_evaluate(
        model="difftron", model_args={"pretrained": str(export_dir), **model_args}, tasks=tasks,
        task_manager=task_manager, limit=limit, log_samples=False, bootstrap_iters=0,
    )
    return {"results": results["results"], "configs": results["configs"], "n-samples": results["n-samples"]}


def markdown_table(results: dict, model_name: str) -> str:
    """The harness's accuracies (%) as one row, under the paper's rows for the same tasks."""
    names = list(results)
    columns = [PAPER_TASKS.get(name, name) for name in names]
    ours = [results[name].get("acc,none") for name in names]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines.append(f"| {model_name} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in ours) + " |")
    if all(name in PAPER_TASKS for name in names):
        for paper_model, scores in PAPER_RESULTS.items():
            by_task = dict(zip(PAPER_TASKS, scores))
            lines.append(f"| {paper_model} (paper) | " + " | ".join(f"{by_task[n]:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def evaluate(export_dir: Path, out_dir: Path, tasks: list[str], limit: int | None, model_args: dict,
             model_name: str) -> Path:
    online = hub_reachable()
    if not online:
        # Datasets already in the local cache still load; the others fail at once. The
        # libraries read these when first imported, hence before the harness.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    out_dir.mkdir(parents=True, exist_ok=True)
    unreachable = {}
    manager = TaskManager()
    runnable = []
    for task in tasks:
        try:
            manager.load([task])
            runnable.append(task)
        except Exception as err:  # the datasets library raises many kinds for "no data"
            unreachable[task] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    note = ""
    if runnable and unreachable:
        note = f"Not run, their data could not be loaded: {', '.join(unreachable)} (see results.json)."
    if not runnable:
        reason = ("their data comes from the Hugging Face Hub, which this machine cannot reach" if not online
                  else "none of them could be loaded (see results.json)")
        note = (f"The requested tasks did not run: {reason}. These are the local smoke tasks instead "
                "(`pipeline/evaluate.py`): a check that evaluation runs, not a measure of quality.")
        print(f"== {note}", file=sys.stderr)
        write_smoke_tasks(out_dir / "smoke_tasks", examples=limit or 20)
        manager = TaskManager(include_path=str(out_dir / "smoke_tasks"), include_defaults=False)
        runnable = list(SMOKE_TASKS)
    print(f"== evaluating {export_dir} on {', '.join(runnable)}", file=sys.stderr)
    harness = run_harness(export_dir, runnable, manager, limit, model_args)
    record = {"export": str(export_dir), "model_args": model_args, "limit": limit, "tasks_run": runnable,
              "tasks_unreachable": unreachable, "note": note, **harness}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=str))
    table = markdown_table(harness["results"], model_name)
    if note:
        table += f"\n{note}\n"
    (out_dir / "results.md").write_text(table)
    print(table)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the run whose export is evaluated")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--noise-levels", type=int, default=32, help="T for diffusion scoring")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    export_dir = cfg.run_dir / "export"
    if not (export_dir / "config.json").is_file():
        print(f"error: no export at {export_dir}: run `make pretrain CONFIG={args.config}` first", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = {"noise_levels": args.noise_levels, "batch_size": args.batch_size, "device": device,
                  "seed": args.seed}
    evaluate(export_dir, cfg.run_dir / "eval", args.tasks, args.limit, model_args, model_name=cfg.name)

    from pipeline.report import write_report

    print(f"== report: {write_report(cfg.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
