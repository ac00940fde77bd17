"""Likelihood of a continuation under a masked diffusion LM, as DiffuGPT / DiffuLLaMA score.

A diffusion LM has no left-to-right factorisation to read log p(continuation | context) off.
The paper scores a continuation by its diffusion loss instead: mask only continuation tokens,
each with probability t, and take the 1/t-weighted cross-entropy of the masked tokens (with
the shift: logits at i are scored against token i+1 where input i+1 is masked), averaged over
T noise levels. Summed over the continuation's tokens this is the negative ELBO, an upper bound
on -log p(continuation | context), on the same nats scale as an AR model's log-likelihood.

The T levels are stratified, t_k in ((k - 1) / T, k / T] for k = 1..T, and all T noised copies
go through the model as one batch. The noise depends only on ``seed`` (and the sequence
length): every choice of a multiple-choice question sees the same t and mask draws, so their
scores differ by the model, not by the noise (common random numbers).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megatron_ext.diffusion import diffusion_targets


@torch.no_grad()
def diffusion_log_likelihood(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    context: list[int],
    continuation: list[int],
    mask_id: int,
    vocab_size: int,
    shift: bool = True,
    noise_levels: int = 32,
    seed: int = 0,
) -> float:
    """The negative diffusion loss (nats) of ``continuation`` given ``context``, higher is likelier."""
    if shift and not context:
        raise ValueError("with the shift, the first token is never predicted: give a context (e.g. BOS)")
    if not continuation:
        raise ValueError("continuation: nothing to score")
    generator = torch.Generator().manual_seed(seed)
    levels = torch.arange(noise_levels, dtype=torch.float32)
    t = (levels + 1.0 - torch.rand(noise_levels, generator=generator)) / noise_levels
    x0 = torch.tensor([context + continuation]).repeat(noise_levels, 1)
    in_continuation = torch.zeros_like(x0, dtype=torch.bool)
    in_continuation[:, len(context) :] = True
    masked = in_continuation & (torch.rand(x0.shape, generator=generator) < t[:, None])
    noised = torch.where(masked, torch.full_like(x0, mask_id), x0)

    logits = logits_fn(noised).float()[..., :vocab_size]  # padded vocab rows are never targets
    next_tokens = torch.cat([x0[:, 1:], x0[:, -1:]], dim=1)  # the last label never counts
    labels, loss_mask = diffusion_targets(x0, next_tokens, masked, shift)
    labels, loss_mask, t = labels.to(logits.device), loss_mask.to(logits.device), t.to(logits.device)
    token_ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    loss_per_level = (token_ce * loss_mask / t[:, None]).sum(dim=1)
    return -loss_per_level.mean().item()
