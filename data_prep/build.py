"""Tokenize a corpus into a Megatron indexed dataset: `<prefix>.bin` (token ids) + `<prefix>.idx`.

One document per corpus document, each ending in EOS. The corpus is streamed and the
output written as it goes, so memory stays flat however large the input. Files appear
under their final names only once complete (write to temp names, then rename).
"""

import glob
import itertools
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from transformers import PreTrainedTokenizerBase

from data_prep.corpus import DataPrepError, expand_paths, iter_documents
from data_prep.progress import ReadProgress, eta_text, format_seconds
from data_prep.verify import verify_indexed_dataset


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    """Token ids + EOS for each text; one batched call, so a fast tokenizer encodes in Rust."""
    # A document's text is only text: a literal "<|endoftext|>" or "<|mask|>" in it is encoded
    # as characters, never as the EOS (a false document end) or the diffusion mask.
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int64) for ids in encoded]


# Worker processes get the tokenizer once, through the pool initializer, not once per document.
_worker_tokenizer = None


def _init_worker(tokenizer: PreTrainedTokenizerBase) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_batch(_worker_tokenizer, texts)


def _batches(documents, size: int):
    documents = iter(documents)  # islice must advance one shared iterator, not restart a list
    while batch := list(itertools.islice(documents, size)):
        yield batch


def _encoded_documents(documents, tokenizer, workers: int, batch_size: int = 64):
    """Yield encode(tokenizer, doc) for each document, in corpus order."""
    if workers == 1:
        for batch in _batches(documents, batch_size):
            yield from encode_batch(tokenizer, batch)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        # Pool.imap drains its input as fast as it can, which would pull the whole corpus
        # into memory; feeding it a bounded window of batches keeps memory flat. imap keeps
        # order, so the output is byte-identical to workers=1.
        for window in _batches(_batches(documents, batch_size), 16 * workers):
            for encoded in pool.imap(_encode_in_worker, window):
                yield from encoded


def is_complete(prefix: str) -> bool:
    if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
        return False
    try:
        verify_indexed_dataset(prefix)
    except DataPrepError:
        return False
    return True


def remove_stale_temp_files(prefix: str) -> None:
    # A killed writer never reaches its cleanup; its temp files would pile up run after run.
    for leftover in glob.glob(glob.escape(prefix) + ".tmp-*"):
        os.remove(leftover)


def build_indexed_dataset(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    output_prefix: str,
    text_field: str = "text",
    workers: int = 1,
    overwrite: bool = False,
    log_every: float = 5.0,
) -> dict:
    """Tokenize the documents of `paths` into `<output_prefix>.bin/.idx`; return a summary dict.

    An existing valid dataset at `output_prefix` is kept as is (resume) unless `overwrite`.
    """
    if workers < 1:
        raise DataPrepError(f"workers must be at least 1, got {workers}")
    files = expand_paths(paths)  # a typo in --input should fail even when there is nothing to do
    if not overwrite and is_complete(output_prefix):
        print(f"{output_prefix}.bin/.idx exist and verify, skipping (pass overwrite to rebuild)", file=sys.stderr)
        return {**verify_indexed_dataset(output_prefix), "skipped": True}

    progress = ReadProgress(files)
    documents = iter_documents(files, text_field, progress)
    return write_indexed_dataset(documents, tokenizer, output_prefix, workers, log_every, progress.fraction)


@contextmanager
def staged_output(output_prefix: str):
    """Yield a temporary prefix to write `.bin/.idx` under; they take `output_prefix`'s names
    only once the body finished (.idx last: a crash between the renames leaves a new .bin with
    an old .idx, which fails verification and so gets rebuilt). On any failure the temporary
    files go, and a write error (a full disk) becomes one line naming the output."""
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        yield tmp_prefix
        os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
        os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    except OSError as err:
        raise DataPrepError(
            f"{output_prefix}: cannot write the dataset ({err.strerror or err}); its partial files "
            "were removed, finished outputs are intact"
        ) from err
    finally:
        for leftover in (tmp_prefix + ".bin", tmp_prefix + ".idx"):
            if os.path.exists(leftover):
                os.remove(leftover)


def write_indexed_dataset(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    output_prefix: str,
    workers: int = 1,
    log_every: float = 5.0,
    read_fraction: Callable[[], float | None] = lambda: None,
) -> dict:
    """Tokenize `texts` into `<output_prefix>.bin/.idx`, replacing what is there; return a summary dict.

    The files appear under their final names only once complete, so an interrupted write
    never leaves a dataset that verifies. Every `log_every` seconds a progress line goes to
    stderr, with an ETA when `read_fraction()` tells the part of the input read so far.
    """
    if tokenizer.eos_token_id is None:
        raise DataPrepError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end documents with")
    vocab_size = len(tokenizer)
    dtype = DType.optimal_dtype(vocab_size)
    dtype_max = np.iinfo(dtype).max
    documents = tokens = 0
    min_id, max_id = vocab_size, -1
    start = last_log = time.monotonic()
    first_fraction = read_fraction()
    with staged_output(output_prefix) as tmp_prefix:
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
        for ids in _encoded_documents(texts, tokenizer, workers):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size or hi > dtype_max:
                raise DataPrepError(
                    f"document {documents}: token id {hi if hi >= vocab_size else lo} outside the vocabulary "
                    f"(size {vocab_size}) or the {np.dtype(dtype).name} range"
                )
            builder.add_document(ids, [len(ids)])
            documents += 1
            tokens += len(ids)
            min_id, max_id = min(min_id, lo), max(max_id, hi)
            if time.monotonic() - last_log >= log_every:
                last_log = time.monotonic()
                elapsed = last_log - start
                print(
                    f"{output_prefix}: {documents:,} docs {tokens:,} tokens | {documents / elapsed:,.0f} docs/s "
                    f"{tokens / elapsed:,.0f} tok/s | {eta_text(read_fraction(), first_fraction, elapsed)}",
                    file=sys.stderr,
                    flush=True,
                )
        builder.finalize(tmp_prefix + ".idx")

    seconds = time.monotonic() - start
    print(
        f"{output_prefix}: {documents:,} docs {tokens:,} tokens in {format_seconds(seconds)} "
        f"({documents / seconds:,.0f} docs/s {tokens / seconds:,.0f} tok/s)",
        file=sys.stderr,
        flush=True,
    )
    return {
        "documents": documents,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
        "min_id": min_id,
        "max_id": max_id,
    }
