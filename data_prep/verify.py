"""Check that `<prefix>.bin/.idx` form a complete Megatron indexed dataset and summarise it."""

import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.corpus import DataPrepError


def check_structure(prefix: str) -> IndexedDataset:
    """Open the dataset the way training will and check that the .bin holds exactly what the
    .idx describes (sizes and offsets), without reading the tokens; returns it opened."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataPrepError(f"{path}: no such file")
    try:
        dataset = IndexedDataset(prefix)
    except Exception as e:  # Megatron asserts on a bad header/counts; numpy fails on a short index
        gist = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataPrepError(f"{idx_path}: cannot open with {bin_path}: {type(e).__name__}: {gist}") from e

    lengths = dataset.sequence_lengths.astype(np.int64)
    itemsize = np.dtype(dataset.index.dtype).itemsize
    expected = int(lengths.sum()) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataPrepError(f"{bin_path}: {actual} bytes but {idx_path} describes {expected} (truncated or mismatched)")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    if not np.array_equal(dataset.index.sequence_pointers.astype(np.int64), offsets):
        raise DataPrepError(f"{idx_path}: sequence offsets disagree with the sequence lengths (corrupted)")
    documents = dataset.document_indices
    if len(documents) and (documents[0] != 0 or documents[-1] != len(lengths) or np.any(np.diff(documents) < 0)):
        raise DataPrepError(f"{idx_path}: document boundaries out of order or out of range (corrupted)")
    return dataset


def verify_indexed_dataset(prefix: str) -> dict:
    """check_structure, then a scan of every token: returns documents/tokens/min_id/max_id."""
    dataset = check_structure(prefix)
    bin_path = prefix + ".bin"
    actual = os.path.getsize(bin_path)
    # A memory map lets numpy scan a file larger than RAM for min/max.
    tokens = np.memmap(bin_path, dtype=dataset.index.dtype, mode="r") if actual else np.zeros(0, dataset.index.dtype)
    return {
        "documents": len(dataset.document_indices) - 1,
        "sequences": len(dataset.sequence_lengths),
        "tokens": len(tokens),
        "dtype": np.dtype(dataset.index.dtype).name,
        "min_id": int(tokens.min()) if len(tokens) else None,
        "max_id": int(tokens.max()) if len(tokens) else None,
    }
