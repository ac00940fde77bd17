"""Context parallelism under any attention mask, the annealing masks included.

With context parallelism (CP) every rank of a CP group holds a slice of each sequence:
Megatron-Core's load-balanced split (``get_batch_on_this_cp_rank``) cuts the sequence into
2 * cp chunks and gives rank r chunks r and 2 * cp - 1 - r; RoPE is sliced the same way inside
GPTModel. Transformer Engine's CP attention (ring / all-to-all) runs only the causal, no-mask
and sliding-window patterns, and Megatron-Core's local attention refuses CP, but annealing
needs an arbitrary L x L mask. So the attention here gathers the keys and values of the whole
sequence from the CP group (the all-gather form of CP, as Llama 3 trained) and lets each rank
attend from its own queries to all of them, with the mask rows of those queries
(``get_batch_on_this_cp_rank`` slices the mask's rows). The gather's backward returns each
key's and value's gradient to the rank that owns it. Attention itself is PyTorch's
scaled_dot_product_attention: the memory-efficient kernel with a mask during annealing, flash
without one afterwards (on GPUs), plain math on CPU.

Cost: each rank holds the full sequence's keys and values of one layer at a time (small with
GQA) and the gather is not overlapped with compute, unlike TE's ring.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.distributed.nn.functional import all_gather


def rank_chunks(rank: int, cp_size: int) -> tuple[int, int]:
    """The two sequence chunks (of 2 * cp_size) that CP rank ``rank`` holds."""
    return rank, 2 * cp_size - 1 - rank


def chunk_order(cp_size: int) -> list[int]:
    """The sequence chunks in the order an all-gather over the CP group returns them."""
    return [chunk for rank in range(cp_size) for chunk in rank_chunks(rank, cp_size)]


def gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """[s/cp, ...] this rank's two chunks -> [s, ...] the whole sequence in order (differentiable)."""
    cp_size = group.size()
    pieces = [piece for part in all_gather(local, group=group) for piece in part.chunk(2, dim=0)]
    in_order = [None] * (2 * cp_size)
    for piece, chunk in zip(pieces, chunk_order(cp_size)):
        in_order[chunk] = piece
    return torch.cat(in_order, dim=0)


def local_query_positions(local_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global positions of this rank's queries (its two chunks)."""
    chunk = local_len // 2
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in rank_chunks(cp_rank, cp_size)])


class ContextParallelAttention(MegatronModule):
    """Core attention for a CP-split sequence; a drop-in for Megatron's core_attention.

    ``attention_mask`` is None (``no_mask``: bidirectional; ``causal``: causal by global
    position) or a bool mask [b or 1, 1, s/cp, s] of this rank's query rows over all keys,
    True = masked out.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("ContextParallelAttention: no attention bias or packed sequences")
        key = gather_sequence(key, self.cp_group)
        value = gather_sequence(value, self.cp_group)
        if attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal:
            queries = local_query_positions(query.shape[0], self.cp_group.rank(), self.cp_group.size())
            attention_mask = (torch.arange(key.shape[0])[None, :] > queries[:, None])[None, None]
        # [s, b, heads, d] -> [b, heads, s, d]; keys and values may have fewer heads (GQA).
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask.to(q.device),
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
