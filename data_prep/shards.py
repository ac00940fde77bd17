"""Build a corpus as fixed-size shards that survive interruption, then merge them into one dataset.

Shard k holds documents [k*N, (k+1)*N) of the corpus order, as `<prefix>.shard-0000k.bin/.idx`.
Each shard is written atomically, so after a crash (even kill -9) a shard either verifies
and is kept, or does not and is rebuilt: a rerun redoes at most the shards in flight.
"""

import gc
import itertools

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from transformers import PreTrainedTokenizerBase

from data_prep.build import is_complete, remove_stale_temp_files, staged_output, write_indexed_dataset
from data_prep.corpus import DataPrepError, expand_paths, iter_documents
from data_prep.progress import ReadProgress
from data_prep.verify import verify_indexed_dataset


def shard_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}.shard-{index:05d}"


def build_sharded(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    output_prefix: str,
    documents_per_shard: int,
    text_field: str = "text",
    workers: int = 1,
) -> dict:
    """Tokenize `paths` into shards of `documents_per_shard` documents, keeping shards that verify.

    Returns {"shards": [prefix, ...], "built": [...], "kept": [...]} in corpus order.
    """
    if documents_per_shard < 1:
        raise DataPrepError(f"documents_per_shard must be at least 1, got {documents_per_shard}")
    if workers < 1:
        raise DataPrepError(f"workers must be at least 1, got {workers}")
    files = expand_paths(paths)
    progress = ReadProgress(files)
    documents = iter_documents(files, text_field, progress)
    shards, built, kept = [], [], []
    for index in itertools.count():
        first = next(documents, None)
        if first is None:
            break
        prefix = shard_prefix(output_prefix, index)
        shard_documents = itertools.chain([first], itertools.islice(documents, documents_per_shard - 1))
        if is_complete(prefix):
            # Counting past the shard's documents is all that streaming allows; tokenizing them is the cost we skip.
            corpus_documents = sum(1 for _ in shard_documents)
            held = verify_indexed_dataset(prefix)["documents"]
            if held != corpus_documents:
                # Kept as is, it would silently drop or repeat documents in the merged dataset.
                raise DataPrepError(
                    f"{prefix}: holds {held} documents where the corpus has {corpus_documents}; "
                    "built from another corpus or --documents-per-shard? Remove the shards to rebuild"
                )
            kept.append(prefix)
        else:
            remove_stale_temp_files(prefix)
            write_indexed_dataset(shard_documents, tokenizer, prefix, workers, read_fraction=progress.fraction)
            built.append(prefix)
        shards.append(prefix)
    return {"shards": shards, "built": built, "kept": kept}


def merge_shards(shard_prefixes: list[str], output_prefix: str) -> dict:
    """Concatenate the shards, in the order given, into `<output_prefix>.bin/.idx` (atomically)."""
    if not shard_prefixes:
        raise DataPrepError("no shards to merge")
    # Verifying first makes a damaged shard stop the merge with its name, not a Megatron assert.
    dtypes = {prefix: verify_indexed_dataset(prefix)["dtype"] for prefix in shard_prefixes}
    first = shard_prefixes[0]
    for prefix, dtype in dtypes.items():
        if dtype != dtypes[first]:
            raise DataPrepError(f"{prefix}: token dtype {dtype}, but {first} has {dtypes[first]}")
    dtype = IndexedDataset(first).index.dtype

    # add_index runs a full gc.collect() per shard, ~0.2 s with torch and megatron loaded:
    # minutes for a thousand shards. Freezing moves the objects alive now out of the collector's sight.
    gc.freeze()
    try:
        with staged_output(output_prefix) as tmp_prefix:
            builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
            for prefix in shard_prefixes:
                builder.add_index(prefix)
            builder.finalize(tmp_prefix + ".idx")
    finally:
        gc.unfreeze()
    return {**verify_indexed_dataset(output_prefix), "shards": len(shard_prefixes)}
