"""data_prep across nodes: one SLURM array task per input file, then a merge job, on the local
cluster (the ``cluster`` fixture in conftest.py), through submitit like a user's submission."""

import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import CORPUS, REPO
from data_prep.build import build_indexed_dataset
from data_prep.corpus import DataPrepError
from data_prep.slurm_array import SubmittedBuild, part_prefix, submit_build, wait_for_build
from data_prep.tokenizer import load_tokenizer, train_bpe_tokenizer

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 200 KB of the Jargon File as three JSONL files, and a BPE tokenizer trained on them."""
    root = tmp_path_factory.mktemp("array-corpus")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        paragraphs = [p.strip("\n") for p in f.read(200_000).split("\n\n") if p.strip()]
    third = len(paragraphs) // 3
    files = []
    for k, chunk in enumerate([paragraphs[:third], paragraphs[third : 2 * third], paragraphs[2 * third :]]):
        path = root / f"jargon-{k}.jsonl"
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in chunk), encoding="utf-8")
        files.append(str(path))
    train_bpe_tokenizer(files, 512, str(root / "tokenizer"))
    return files, str(root / "tokenizer")


def finish(build: SubmittedBuild, seconds: float = 300) -> None:
    """Wait for every job of the build, cancelling them all if it takes too long."""
    deadline = time.time() + seconds
    while not all(job.done() for job in [*build.part_jobs, build.merge_job]):
        if time.time() > deadline:
            subprocess.run(["scancel", build.array_job_id, build.merge_job.job_id], capture_output=True)
            pytest.fail(f"build not done after {seconds} s; logs under {build.log_folder}")
        time.sleep(0.5)


def same_bytes(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def test_array_build_equals_a_local_build(cluster, corpus, tmp_path):
    files, tokenizer = corpus
    prefix = str(tmp_path / "array" / "jargon")
    build = submit_build([os.path.join(os.path.dirname(files[0]), "jargon-*.jsonl")], tokenizer, prefix)
    assert build.inputs == files
    assert [job.job_id for job in build.part_jobs] == [f"{build.array_job_id}_{k}" for k in range(3)]
    finish(build)
    summary = wait_for_build(build)

    local = str(tmp_path / "local")
    expected = build_indexed_dataset(files, load_tokenizer(tokenizer), local)
    assert summary["shards"] == 3 and summary["documents"] == expected["documents"]
    assert build.parts == [part_prefix(prefix, k) for k in range(3)]
    assert same_bytes(prefix, local)


def files_of(prefixes):
    return [prefix + ext for prefix in prefixes for ext in (".bin", ".idx")]


def state(path):
    return os.stat(path).st_mtime_ns, open(path, "rb").read()


def submit_with_cli(files, tokenizer, prefix):
    command = [sys.executable, "-m", "data_prep", "submit-build", "--input", *files, "--tokenizer", tokenizer,
               "--output-prefix", prefix, "--wait"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs, summary = (json.loads(line) for line in result.stdout.splitlines())
    return jobs, summary


def test_resubmission_rebuilds_only_a_missing_part(cluster, corpus, tmp_path):
    files, tokenizer = corpus
    prefix = str(tmp_path / "jargon")
    first_jobs, first = submit_with_cli(files, tokenizer, prefix)
    assert first["shards"] == 3
    parts = first_jobs["parts"]
    before = {path: state(path) for path in files_of(parts)}
    merged = {path: state(path)[1] for path in files_of([prefix])}
    for path in files_of([parts[1]]):
        os.remove(path)

    second_jobs, second = submit_with_cli(files, tokenizer, prefix)
    assert second_jobs["array_job"] != first_jobs["array_job"] and second == first
    for path, (mtime, content) in before.items():
        if path.startswith(parts[1]):
            assert state(path)[0] > mtime and state(path)[1] == content, path  # rebuilt, the same bytes
        else:
            assert state(path) == (mtime, content), path  # kept as it was
    assert {path: state(path)[1] for path in files_of([prefix])} == merged


def test_a_failing_task_names_its_input_and_cancels_the_merge(cluster, corpus, tmp_path):
    files, tokenizer = corpus
    bad = tmp_path / "other-field.jsonl"
    bad.write_text('{"body": "no text field here"}\n')
    build = submit_build([files[0], str(bad)], tokenizer, str(tmp_path / "out"))
    finish(build)
    with pytest.raises(DataPrepError, match=rf"other-field\.jsonl: array task {build.array_job_id}_1 failed: "
                                            r".*DataPrepError: .*other-field\.jsonl: no field 'text'"):  # fmt: skip
        wait_for_build(build)
    assert build.merge_job.state.startswith("CANCELLED")
    assert not os.path.exists(str(tmp_path / "out") + ".bin")


@pytest.mark.parametrize("options, message", [
    ({"partition": "nosuch"}, r"partition: unknown partition 'nosuch' \(this cluster has debug\)"),
    ({"cpus_per_task": 8}, r"cpus_per_task: 8, but the nodes of partition 'debug' have at most 2 CPUs"),
    ({"workers": 2, "cpus_per_task": 1}, r"workers: 2 tokenizer processes on cpus_per_task=1 CPUs"),
], ids=["unknown partition", "too many CPUs", "more workers than CPUs"])  # fmt: skip
def test_what_the_cluster_cannot_run_is_refused_before_submission(cluster, corpus, tmp_path, options, message):
    files, tokenizer = corpus
    with pytest.raises(DataPrepError, match=message):
        submit_build(files, tokenizer, str(tmp_path / "out"), **options)
    assert os.listdir(tmp_path) == []  # no log folder: nothing was submitted
