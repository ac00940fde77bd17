"""Check that `<prefix>.bin/.idx` form a complete Megatron indexed dataset and summarise it."""

import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.corpus import DataPrepError


def verify_indexed_dataset(prefix: str) -> dict:
    """Open the dataset the way training will, check the .bin holds exactly what the .idx
    describes, and return documents/tokens/min_id/max_id."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataPrepError(f"{path}: no such file")
    try:
        dataset = IndexedDataset(prefix)
    except Exception as e:  # Megatron asserts on a bad header/counts; numpy fails on a short index
        gist = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataPrepError(f"{idx_path}: cannot open with {bin_path}: {type(e).__name__}: {gist}") from e

    lengths = dataset.sequence_lengths
    itemsize = np.dtype(dataset.index.dtype).itemsize
    expected = int(lengths.sum(dtype=np.int64)) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataPrepError(f"{bin_path}: {actual} bytes but {idx_path} describes {expected} (truncated or mismatched)")

    # A memory map lets numpy scan a file larger than RAM for min/max.
    tokens = np.memmap(bin_path, dtype=dataset.index.dtype, mode="r") if actual else np.zeros(0, dataset.index.dtype)
    return {
        "documents": len(dataset.document_indices) - 1,
        "sequences": len(lengths),
        "tokens": len(tokens),
        "dtype": np.dtype(dataset.index.dtype).name,
        "min_id": int(tokens.min()) if len(tokens) else None,
        "max_id": int(tokens.max()) if len(tokens) else None,
    }
