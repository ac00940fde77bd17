"""data_prep: corpus reading, tokenizer training, indexed-dataset build/verify, CLI errors."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.__main__ import main
from data_prep.build import build_indexed_dataset
from data_prep.corpus import DataPrepError, iter_documents
from data_prep.tokenizer import EOS_TOKEN, MASK_TOKEN, load_tokenizer, train_bpe_tokenizer
from data_prep.verify import verify_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARAGRAPHS = [
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café №{i * 7}.\nA second line."
    for i in range(200)
]


def write_text(path, paragraphs=PARAGRAPHS):
    # Uneven gaps on purpose: a run of 3 newlines must not glue a newline onto a paragraph.
    path.write_text("\n\n\n".join(paragraphs[:10]) + "\n\n" + "\n\n".join(paragraphs[10:]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_bpe_tokenizer([corpus], vocab_size=400, out_dir=str(out))
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def read_documents(prefix):
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    return [np.concatenate([dataset[s] for s in range(bounds[d], bounds[d + 1])]).tolist() for d in range(len(bounds) - 1)]


def expected_documents(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def test_text_paragraphs_are_documents(corpus, tmp_path):
    assert list(iter_documents([corpus])) == PARAGRAPHS
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(open(corpus, "rb").read()))
    assert list(iter_documents([str(gz)])) == PARAGRAPHS


def test_tokenizer_has_special_tokens_and_is_deterministic(corpus, tokenizer, tokenizer_dir, tmp_path):
    assert len(tokenizer) == 400
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN and tokenizer.unk_token is None
    assert tokenizer.convert_ids_to_tokens(tokenizer(f"a{MASK_TOKEN}b")["input_ids"]).count(MASK_TOKEN) == 1
    text = "Unseen bytes round-trip: ünïcödé 漢字 \t!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    train_bpe_tokenizer([corpus], vocab_size=400, out_dir=str(tmp_path / "again"))
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as a, open(tmp_path / "again" / "tokenizer.json", "rb") as b:
        assert a.read() == b.read()


def test_round_trip(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "out" / "data")
    summary = build_indexed_dataset([corpus], tokenizer, prefix)
    expected = expected_documents(tokenizer, PARAGRAPHS)
    assert read_documents(prefix) == expected
    assert summary["documents"] == len(PARAGRAPHS)
    assert summary["tokens"] == sum(map(len, expected))
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]

    report = verify_indexed_dataset(prefix)
    assert (report["documents"], report["tokens"]) == (summary["documents"], summary["tokens"])
    assert (report["min_id"], report["max_id"]) == (summary["min_id"], summary["max_id"])
    assert report["dtype"] == "uint16"


def test_workers_give_identical_output(corpus, tokenizer, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    build_indexed_dataset([corpus], tokenizer, one, workers=1)
    build_indexed_dataset([corpus], tokenizer, two, workers=2)
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()


def test_existing_valid_output_is_kept_unless_overwrite(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "data")
    build_indexed_dataset([corpus], tokenizer, prefix)
    other = write_text(tmp_path / "other.txt", PARAGRAPHS[:3])
    assert build_indexed_dataset([other], tokenizer, prefix)["skipped"]
    assert verify_indexed_dataset(prefix)["documents"] == len(PARAGRAPHS)
    assert build_indexed_dataset([other], tokenizer, prefix, overwrite=True)["documents"] == 3


@pytest.mark.parametrize("kind", ["jsonl", "json.gz", "parquet"])
def test_structured_files_with_custom_text_field(kind, tokenizer, tmp_path):
    records = [{"id": i, "body": text} for i, text in enumerate(PARAGRAPHS[:20])] + [{"id": 99, "body": "  \n"}]
    path = tmp_path / f"docs.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        lines = "".join(json.dumps(r) + "\n" for r in records).encode()
        path.write_bytes(gzip.compress(lines) if kind.endswith(".gz") else lines)

    assert list(iter_documents([str(path)], text_field="body")) == PARAGRAPHS[:20]
    prefix = str(tmp_path / "data")
    build_indexed_dataset([str(path)], tokenizer, prefix, text_field="body")
    assert read_documents(prefix) == expected_documents(tokenizer, PARAGRAPHS[:20])


def test_globs_expand_in_sorted_order(tmp_path):
    write_text(tmp_path / "b.txt", ["second"])
    write_text(tmp_path / "a.txt", ["first"])
    assert list(iter_documents([str(tmp_path / "*.txt")])) == ["first", "second"]


def _bad_inputs(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").write_text("\n\n   \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "fields.jsonl").write_text('{"content": "x", "id": 1}\n')
    return {
        "missing file": ("missing.txt", r"missing\.txt: no such file"),
        "empty glob": ("nothing-*.txt", r"nothing-\*\.txt: glob matched no files"),
        "unknown extension": ("data.csv", r"data\.csv: unknown extension"),
        "empty input": ("empty.txt", r"empty\.txt: no documents"),
        "not utf-8": ("latin1.txt", r"latin1\.txt: not valid UTF-8"),
        "missing field": ("fields.jsonl", r"fields\.jsonl: no field 'text' \(fields present: content, id\)"),
    }


@pytest.mark.parametrize(
    "case", ["missing file", "empty glob", "unknown extension", "empty input", "not utf-8", "missing field"]
)
def test_bad_input_names_the_file(case, tmp_path):
    name, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(DataPrepError, match=message):
        list(iter_documents([str(tmp_path / name)]))


def test_failed_build_leaves_previous_output_intact(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "data")
    build_indexed_dataset([corpus], tokenizer, prefix)
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine paragraph\n\n\xff\xfe broken\n")
    with pytest.raises(DataPrepError, match="bad.txt"):
        build_indexed_dataset([str(bad)], tokenizer, prefix, overwrite=True)

    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "data.bin", "data.idx"]


# Megatron's IndexedDataset.__del__ trips over its own failed __init__ on the garbage index.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_verify_catches_truncated_and_missing_files(corpus, tokenizer, tmp_path):
    prefix = str(tmp_path / "data")
    build_indexed_dataset([corpus], tokenizer, prefix)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataPrepError, match=r"data\.bin: .*truncated"):
        verify_indexed_dataset(prefix)
    # A damaged dataset is not "already built": the next build replaces it.
    assert not build_indexed_dataset([corpus], tokenizer, prefix).get("skipped")
    assert os.path.getsize(prefix + ".bin") == size

    with open(prefix + ".idx", "r+b") as f:
        f.write(b"garbage!!")
    with pytest.raises(DataPrepError, match=r"data\.idx"):
        verify_indexed_dataset(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(DataPrepError, match=r"data\.idx: no such file"):
        verify_indexed_dataset(prefix)


def test_cli(corpus, tokenizer_dir, tmp_path, capsys):
    prefix = str(tmp_path / "cli")
    assert main(["build", "--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", prefix]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == len(PARAGRAPHS)
    assert main(["verify", prefix]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == len(PARAGRAPHS)

    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["build", "--input", str(tmp_path / "x.csv"), "--tokenizer", tokenizer_dir, "--output-prefix", prefix]) == 2
    assert main(["build", "--input", corpus, "--tokenizer", str(tmp_path / "no-tokenizer"), "--output-prefix", prefix]) == 2
    assert "no-tokenizer" in capsys.readouterr().err


def write_records(path, records):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=50)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hub_input_of_a_local_folder_streams_the_same_documents(kind, tokenizer, tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    # Names whose order as strings is not their numeric order: both readings must sort alike.
    for part, start in [(1, 0), (2, 70), (10, 140)]:
        write_records(folder / f"part-{part}.{kind}", [{"body": t} for t in PARAGRAPHS[start : start + 70]])
    direct = list(iter_documents([str(folder / f"*.{kind}")], text_field="body"))
    assert direct == PARAGRAPHS[:70] + PARAGRAPHS[140:] + PARAGRAPHS[70:140]
    assert list(iter_documents([f"hf:{folder}"], text_field="body")) == direct

    build_indexed_dataset([str(folder / f"*.{kind}")], tokenizer, str(tmp_path / "direct"), text_field="body")
    build_indexed_dataset([f"hf:{folder}@train"], tokenizer, str(tmp_path / "hub"), text_field="body")
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"direct{ext}", "rb").read() == open(tmp_path / f"hub{ext}", "rb").read()


def test_hub_input_picks_its_split(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_records(folder / "train.jsonl", [{"text": "a training document"}])
    write_records(folder / "test.jsonl", [{"text": "a test document"}])
    assert list(iter_documents([f"hf:{folder}"])) == ["a training document"]
    assert list(iter_documents([f"hf:{folder}@test"])) == ["a test document"]
    with pytest.raises(DataPrepError, match=rf"hf:{folder}@dev: cannot stream dataset .*Bad split: dev"):
        list(iter_documents([f"hf:{folder}@dev"]))
    with pytest.raises(DataPrepError, match=r"hf:x@: expected hf:<dataset name or folder>\[:<config>\]\[@<split>\]"):
        list(iter_documents(["hf:x@"]))
    with pytest.raises(DataPrepError, match=rf"hf:{tmp_path}/nothing: dataset .* could not be reached or found"):
        list(iter_documents([f"hf:{tmp_path}/nothing"]))


def test_unreachable_hub_dataset_is_a_one_line_error(tokenizer_dir, tmp_path, monkeypatch):
    # datasets reads the offline switches when imported: a fresh process sees them.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    command = [sys.executable, "-m", "data_prep", "build", "--input", "hf:difftron-tests/no-such-dataset:en@train",
               "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "data")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "error: hf:difftron-tests/no-such-dataset:en@train: dataset 'difftron-tests/no-such-dataset' "
        "could not be reached or found"
    ), result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_progress_lines_say_how_much_is_read_and_when_it_ends(kind, tokenizer, tmp_path, capsys):
    # About 4 MB of near equal-sized documents, so the share of documents done is the share of input read.
    records = [{"text": f"{i:05d} " + " ".join(PARAGRAPHS[i % 20 : i % 20 + 20])} for i in range(2000)]
    path = write_records(tmp_path / f"docs.{kind}", records)
    build_indexed_dataset([path], tokenizer, str(tmp_path / "data"), log_every=0)
    lines = capsys.readouterr().err.splitlines()
    pattern = r".*: ([\d,]+) docs .* tok/s \| (\d+)% read, ETA \d+:\d\d:\d\d"
    progress = [re.fullmatch(pattern, line) for line in lines[:-1]]
    assert all(progress), lines[:3]
    done = [int(m.group(1).replace(",", "")) / len(records) for m in progress]
    read = [int(m.group(2)) / 100 for m in progress]
    assert read == sorted(read) and read[-1] == 1.0
    # The reader is ahead of the documents written by at most what it reads at once:
    # 1 MB of a JSONL file, a row group of 50 rows (plus the tokenizer's batch) of Parquet.
    ahead = (1 << 20) / os.path.getsize(path) + 0.02 if kind == "jsonl" else 0.1
    assert all(d - 0.01 <= r <= d + ahead for d, r in zip(done, read)), list(zip(done, read))[::100]
    assert re.fullmatch(r".*data: 2,000 docs [\d,]+ tokens in \d+:\d\d:\d\d \([\d,]+ docs/s [\d,]+ tok/s\)", lines[-1])


def test_progress_of_a_hub_stream_has_no_eta(tokenizer, tmp_path, capsys):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_records(folder / "train.jsonl", [{"text": t} for t in PARAGRAPHS])
    build_indexed_dataset([f"hf:{folder}"], tokenizer, str(tmp_path / "data"), log_every=0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(PARAGRAPHS) + 1 and all(line.endswith("| ETA unknown") for line in lines[:-1])
