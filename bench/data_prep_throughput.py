"""data_prep's tokenization throughput against Megatron-LM's preprocess_data.py approach.

The same corpus (the Jargon File's paragraphs as JSONL, repeated to a few MB) and the same
tokenizer, through `python -m data_prep build` and through the baseline script
(bench/megatron_preprocess_baseline.py), each in a fresh process with 1 and 2 workers;
then data_prep on a corpus 10x larger, for its peak memory. Prints one JSON line with
tokens/s, the ratios against the baseline measured in this run, and peak RSS.

    python bench/data_prep_throughput.py [--repeat 4] [--out DIR]
"""

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets" / "corpus" / "jargon-4.4.7.txt.gz"


def write_jsonl(path: Path, repeat: int) -> None:
    paragraphs = [p.strip("\n") for p in gzip.open(CORPUS, "rt", encoding="utf-8").read().split("\n\n")]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(repeat):
            for paragraph in paragraphs:
                if paragraph.strip():
                    f.write(json.dumps({"text": paragraph}) + "\n")


# Runs a command and prints its peak RSS (KiB): getrusage of a process whose only child it is.
_PEAK_RSS = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of ``command`` in a fresh process."""
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], check=True, cwd=REPO,
                         capture_output=True, text=True).stdout
    return time.perf_counter() - began, int(out.split()[-1]) / 1024


def tokens_in(prefix: str) -> int:
    out = subprocess.run([sys.executable, "-m", "data_prep", "verify", prefix], check=True, cwd=REPO,
                         capture_output=True, text=True).stdout
    return json.loads(out)["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus in the timed input")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    tokenizer = work / "tokenizer"
    subprocess.run([sys.executable, "-m", "data_prep", "train-tokenizer", "--input", str(CORPUS),
                    "--vocab-size", "4096", "--out", str(tokenizer)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    corpus = work / "corpus.jsonl"
    write_jsonl(corpus, args.repeat)
    result = {"bench": "data_prep_throughput", "corpus_mb": round(corpus.stat().st_size / 2**20, 1)}
    for workers in (1, 2):
        ours = str(work / f"ours{workers}")
        seconds, _ = timed([sys.executable, "-m", "data_prep", "build", "--input", str(corpus),
                            "--tokenizer", str(tokenizer), "--output-prefix", ours,
                            "--workers", str(workers)])
        tokens = tokens_in(ours)
        base = str(work / f"baseline{workers}")
        base_seconds, _ = timed([sys.executable, "bench/megatron_preprocess_baseline.py", str(corpus),
                                 str(tokenizer), base, str(workers)])
        assert tokens_in(base) == tokens, "the two pipelines must produce the same tokens"
        result[f"workers{workers}_tokens_per_s"] = round(tokens / seconds)
        result[f"workers{workers}_baseline_tokens_per_s"] = round(tokens / base_seconds)
        result[f"workers{workers}_vs_baseline"] = round(base_seconds / seconds, 3)
    small_peak = timed([sys.executable, "-m", "data_prep", "build", "--input", str(corpus),
                        "--tokenizer", str(tokenizer), "--output-prefix", str(work / "small")])[1]
    large = work / "large.jsonl"
    write_jsonl(large, 10 * args.repeat)
    large_peak = timed([sys.executable, "-m", "data_prep", "build", "--input", str(large),
                        "--tokenizer", str(tokenizer), "--output-prefix", str(work / "large")])[1]
    result.update(peak_rss_mb=round(small_peak), peak_rss_10x_mb=round(large_peak),
                  note="seconds include process start-up and imports for both pipelines")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
