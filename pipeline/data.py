"""Training data: prepared Megatron datasets blended by Megatron's builder, batched by step.

Batches are a pure function of the step: step s covers global samples
[s * global_batch, (s + 1) * global_batch); each data-parallel rank takes its contiguous
slice, cut into micro-batches. A resumed run therefore reads exactly the samples an
uninterrupted run would, and each sample carries its global index for the noise draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizer

from data_prep.corpus import DataPrepError
from data_prep.verify import check_structure
from pipeline.config import RunConfig
from pipeline.distributed import on_rank0


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, L] x0
    labels: torch.Tensor  # [b, L] x0 shifted left by one (next tokens)
    sample_ids: torch.Tensor  # [b] global sample index, seeds the noise


def megatron_tokenizer(name_or_path: str):
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=name_or_path, metadata_path={"library": "huggingface"}
    )


def build_datasets(cfg: RunConfig, tokenizer, train_steps: int) -> tuple[GPTDataset, GPTDataset]:
    """Train and validation datasets sized for ``train_steps`` steps and the eval schedule."""
    problem = on_rank0(lambda: _dataset_problem(cfg.data.prefixes))
    if problem is not None:
        raise ValueError(problem)
    gbs = cfg.train.global_batch_size
    evals = train_steps // max(1, cfg.train.eval_interval) + 1
    sizes = [train_steps * gbs, evals * cfg.train.eval_iters * gbs, 0]
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.data.seq_length,
        blend=(list(cfg.data.prefixes), cfg.data.weights),
        split=cfg.data.split,
        path_to_cache=cfg.data.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    Path(cfg.data.cache_dir).mkdir(parents=True, exist_ok=True)
    # Every rank reads its own batches. The builder builds on global rank 0 first (writing
    # the index caches) and then on the others, which read the caches.
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def _dataset_problem(prefixes: list[str]) -> str | None:
    """Why a prepared dataset cannot be trained on (missing, truncated, a corrupted index), or
    None; the index is checked, the tokens are not read (``python -m data_prep verify`` does)."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                return f"data.prefixes: {prefix}{suffix} does not exist (run data_prep)"
        try:
            check_structure(prefix)
        except DataPrepError as err:
            return f"data.prefixes: {err}"
    return None


def micro_batches(
    dataset, step: int, global_batch_size: int, micro_batch_size: int
) -> Iterator[MicroBatch]:
    """This data-parallel rank's micro-batches of ``step``."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    for start in range(first, first + per_rank, micro_batch_size):
        ids = list(range(start, start + micro_batch_size))
        samples = [dataset[i % len(dataset)] for i in ids]
        batch = MicroBatch(
            tokens=torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),
            labels=torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
            sample_ids=torch.tensor(ids),
        )
        _check_token_ids(batch, dataset.config.tokenizer.vocab_size)
        yield batch


def _check_token_ids(batch: MicroBatch, vocab_size: int) -> None:
    """An id outside the vocabulary (corrupted tokens, another tokenizer's dataset) would index
    past the embedding table: a clear error instead, naming the sample."""
    ids = torch.cat([batch.tokens, batch.labels], dim=1)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(
            f"data: sample {int(batch.sample_ids[row])} holds token id "
            f"{int(ids[row][bad[row]][0])}, outside the tokenizer's {vocab_size} ids "
            f"(a corrupted .bin, or data prepared with another tokenizer: python -m data_prep verify)"
        )
