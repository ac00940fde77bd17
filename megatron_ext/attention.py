"""Attention-mask annealing: from the AR model's causal mask to full bidirectional attention.

At step s every future (upper-triangular) edge is opened independently with probability
r = min(1, (s + 1) / anneal_steps); causal edges stay open. One random L x L mask per step,
shared by the batch, the heads and the layers, and drawn from (seed, step) alone so every
tensor-, pipeline- and context-parallel rank builds the same mask without communication.
From r = 1 on there is no mask at all, so attention runs on the fused bidirectional path.

A structured alternative ("window"): every query sees the whole past and the next
w = floor(r * L) future tokens, a band that widens to full attention. Its masks are the
sliding windows (left = all, right = w) that flash / fused kernels can run natively, so
annealing need not leave the fast path (for now the band is passed as an explicit mask like
the random one; handing it to TE as ``window_size`` waits for a GPU to verify it on); the
trade-off is that the opened future edges are always the nearest ones rather than a uniform
random subset, so the model never sees long-range future context before the window reaches it.

Megatron-Core fixes the mask *type* of each attention module at build time, and fused / TE
kernels of a causal type ignore a passed mask. ``set_attn_mask_type`` therefore switches the
type of every attention module when the phase changes: causal (AR), arbitrary (annealing,
explicit mask), no_mask (bidirectional).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType

_STEP_STRIDE = 7_919  # decorrelates the per-step mask seeds from the noise seeds


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of future edges open at ``step`` (1.0 = bidirectional)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def annealed_attention_mask(
    step: int, anneal_steps: int, seq_len: int, seed: int, schedule: str = "random"
) -> Optional[torch.Tensor]:
    """The [1, 1, L, L] bool mask for ``step`` (True = masked out), or None once r = 1."""
    ratio = anneal_ratio(step, anneal_steps)
    if ratio >= 1.0:
        return None
    if schedule == "window":
        visible_future = int(ratio * seq_len)
        return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1 + visible_future)[None, None]
    if schedule != "random":
        raise ValueError(f"diffusion.anneal_schedule: expected 'random' or 'window', got {schedule!r}")
    generator = torch.Generator().manual_seed(seed * _STEP_STRIDE + step)
    closed = torch.rand(seq_len, seq_len, generator=generator) >= ratio
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)
    return (closed & future)[None, None]


def causal_attention_mask(seq_len: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)[None, None]


def attention_phase(objective: str, step: int, anneal_steps: int, per_sample_masks: bool = False) -> AttnMaskType:
    """The mask type the model must run with at ``step`` (``per_sample_masks``: the batch
    mixes attention patterns, as with an auxiliary AR loss, so masks are always explicit)."""
    if objective == "ar":
        return AttnMaskType.causal
    if per_sample_masks or anneal_ratio(step, anneal_steps) < 1.0:
        return AttnMaskType.arbitrary
    return AttnMaskType.no_mask


def set_attn_mask_type(model: torch.nn.Module, mask_type: AttnMaskType) -> None:
    """Switch every attention module (and its softmax) of ``model`` to ``mask_type``."""
    for module in model.modules():
        if hasattr(module, "attn_mask_type"):
            module.attn_mask_type = mask_type
