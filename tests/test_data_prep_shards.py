"""data_prep sharded builds: same output as one build, resume after kill -9, damaged shards rebuilt."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.__main__ import main
from data_prep.build import build_indexed_dataset
from data_prep.corpus import DataPrepError
from data_prep.shards import build_sharded, merge_shards, shard_prefix
from test_data_prep import read_documents, tokenizer, tokenizer_dir  # noqa: F401 (fixtures)

PARAGRAPHS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café №{i * 7}.\nAgain." for i in range(230)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path, paragraphs):
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", PARAGRAPHS)


def file_states(prefixes):
    return {p + ext: (os.stat(p + ext).st_mtime_ns, open(p + ext, "rb").read()) for p in prefixes for ext in (".bin", ".idx")}


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_and_merged_equals_one_build(corpus, tokenizer, tmp_path, workers):
    whole = str(tmp_path / "whole")
    build_indexed_dataset([corpus], tokenizer, whole)
    summary = build_sharded([corpus], tokenizer, str(tmp_path / "data"), documents_per_shard=50, workers=workers)
    assert summary["shards"] == [shard_prefix(str(tmp_path / "data"), k) for k in range(5)]  # 230 docs: 4 x 50 + 30
    assert summary["built"] == summary["shards"] and summary["kept"] == []
    assert [len(IndexedDataset(p).document_indices) - 1 for p in summary["shards"]] == [50, 50, 50, 50, 30]

    merged = merge_shards(summary["shards"], str(tmp_path / "merged"))
    assert merged["documents"] == len(PARAGRAPHS)
    assert read_documents(str(tmp_path / "merged")) == read_documents(whole)
    for ext in (".bin", ".idx"):
        assert open(whole + ext, "rb").read() == open(str(tmp_path / "merged") + ext, "rb").read()
    assert not glob.glob(str(tmp_path / "*.tmp-*"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_shard_is_rebuilt_and_others_kept(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "data")
    shards = build_sharded([corpus], tokenizer, prefix, documents_per_shard=100)["shards"]
    damaged = shards[1]
    with open(damaged + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(damaged + ".bin") - 2)
    intact = file_states([shards[0], shards[2]])

    summary = build_sharded([corpus], tokenizer, prefix, documents_per_shard=100)
    assert summary["built"] == [damaged] and summary["kept"] == [shards[0], shards[2]]
    assert file_states([shards[0], shards[2]]) == intact
    merge_shards(shards, str(tmp_path / "merged"))
    build_indexed_dataset([corpus], tokenizer, str(tmp_path / "whole"))
    assert read_documents(str(tmp_path / "merged")) == read_documents(str(tmp_path / "whole"))


def test_killed_run_resumes_and_keeps_finished_shards(tokenizer_dir, tokenizer, tmp_path):
    # Enough one-document shards that the run is still going when the first shard lands.
    corpus = write_corpus(tmp_path / "big.txt", PARAGRAPHS * 20)
    prefix = str(tmp_path / "out" / "data")
    command = [sys.executable, "-m", "data_prep", "build-sharded", "--input", corpus, "--tokenizer", tokenizer_dir,
               "--output-prefix", prefix, "--documents-per-shard", "5"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(shard_prefix(prefix, 0) + ".idx"):
            assert process.poll() is None and time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    total = len(PARAGRAPHS) * 20 // 5
    finished = [p for p in (shard_prefix(prefix, k) for k in range(total)) if os.path.exists(p + ".idx")]
    assert 1 <= len(finished) < total
    before = file_states(finished)

    assert main(["build-sharded", "--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", prefix,
                 "--documents-per-shard", "5"]) == 0  # fmt: skip
    summary = build_sharded([corpus], tokenizer, prefix, documents_per_shard=5)
    assert len(summary["shards"]) == total and summary["built"] == []
    assert file_states(finished) == before
    assert not glob.glob(prefix + "*.tmp-*")

    assert main(["merge", "--shards", *summary["shards"], "--output-prefix", prefix]) == 0
    build_indexed_dataset([corpus], tokenizer, str(tmp_path / "whole"))
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(str(tmp_path / "whole") + ext, "rb").read()


def test_shards_of_another_layout_are_an_error(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "data")
    build_sharded([corpus], tokenizer, prefix, documents_per_shard=100)
    with pytest.raises(DataPrepError, match=r"data\.shard-00000: holds 100 documents where the corpus has 50"):
        build_sharded([corpus], tokenizer, prefix, documents_per_shard=50)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_merge_refuses_a_damaged_shard(corpus, tokenizer, tmp_path):
    shards = build_sharded([corpus], tokenizer, str(tmp_path / "data"), documents_per_shard=100)["shards"]
    with open(shards[2] + ".bin", "r+b") as f:
        f.truncate(1)
    with pytest.raises(DataPrepError, match=r"data\.shard-00002\.bin: .*truncated"):
        merge_shards(shards, str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) + ext for p in shards for ext in (".bin", ".idx"))
    assert main(["merge", "--shards", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "merged")]) == 2
