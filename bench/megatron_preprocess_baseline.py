"""The baseline: Megatron-LM's tools/preprocess_data.py approach, reduced to its core loop.

One JSON document per line, read line by line; a multiprocessing Pool whose initializer builds
the tokenizer in each worker; ``pool.imap(encode, lines, 32)``; each document's ids plus EOD
added to megatron-core's IndexedDatasetBuilder; finalize. Sentence splitting and partitions
are off, as in the common `--append-eod` GPT invocation. Kept here so the data_prep benchmark
compares against it on the same corpus and tokenizer in the same run.

    python bench/megatron_preprocess_baseline.py INPUT.jsonl TOKENIZER_DIR OUTPUT_PREFIX WORKERS
"""

import json
import multiprocessing
import sys

from megatron.core.datasets import indexed_dataset
from transformers import AutoTokenizer


class Encoder:
    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def initializer(self):
        Encoder.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)

    def encode(self, json_line: str):
        text = json.loads(json_line)["text"]
        ids = Encoder.tokenizer.encode(text, add_special_tokens=False)
        ids.append(Encoder.tokenizer.eos_token_id)
        return ids, len(json_line)


def main(input_path: str, tokenizer_path: str, output_prefix: str, workers: int) -> None:
    encoder = Encoder(tokenizer_path)
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_path))
    builder = indexed_dataset.IndexedDatasetBuilder(
        output_prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size)
    )
    with open(input_path, encoding="utf-8") as lines, multiprocessing.Pool(
        workers, initializer=encoder.initializer
    ) as pool:
        for ids, _ in pool.imap(encoder.encode, lines, 32):
            builder.add_document(ids, [len(ids)])
    builder.finalize(output_prefix + ".idx")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
