"""The masked (absorbing-state) diffusion objective of DiffuGPT / DiffuLLaMA.

For each sequence x0: draw t ~ U[eps, 1), replace each token by the mask token with
probability t, and train the model to recover the masked tokens, weighting each token's
cross-entropy by 1/t. The adaptation trick is the *shift*: the AR head keeps predicting the
next token, so logits at position i are scored against x0[i+1], counted where input position
i+1 is masked. Without the shift (LLaDA) logits at i are scored against x0[i].

Noise is a pure function of (seed, global sample index): the same sample draws the same t
and mask whatever the data-parallel layout, and a resumed run draws what an uninterrupted
one would. Optionally (MDLM's variance reduction) the t of a global batch are stratified:
t_j = eps + (1 - eps) * frac(u + j / B) with one u per batch, so every batch covers [eps, 1)
evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

_PER_SAMPLE, _PER_BATCH = 0, 1  # independent streams of the same seed


def _generator(*key: int) -> torch.Generator:
    """A generator seeded by a well-mixed hash of integer ``key`` (NumPy's SeedSequence)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@dataclass
class NoisedBatch:
    tokens: torch.Tensor  # [B, L] input with masked positions replaced by the mask id
    masked: torch.Tensor  # [B, L] bool, True where the input was masked
    t: torch.Tensor  # [B] float, the noise level of each sequence


def sample_noise(
    x0: torch.Tensor,
    sample_ids: torch.Tensor,
    seed: int,
    eps: float,
    mask_id: int,
    stratify_over: int = 0,
) -> NoisedBatch:
    """Mask each token of ``x0`` [B, L] independently with probability t ~ U[eps, 1).

    ``stratify_over`` > 0 stratifies t over consecutive groups of that many global samples
    (the global batch size).
    """
    batch, length = x0.shape
    t = torch.empty(batch, dtype=torch.float32)
    draws = torch.empty(batch, length, dtype=torch.float32)
    for row, sample_id in enumerate(sample_ids.tolist()):
        generator = _generator(seed, _PER_SAMPLE, sample_id)
        u = torch.rand((), generator=generator)
        if stratify_over:
            group, slot = divmod(sample_id, stratify_over)
            shared = torch.rand((), generator=_generator(seed, _PER_BATCH, group))
            u = (shared + slot / stratify_over) % 1.0
        t[row] = eps + (1.0 - eps) * u
        draws[row] = torch.rand(length, generator=generator)
    t = t.to(x0.device)
    masked = draws.to(x0.device) < t[:, None]
    tokens = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return NoisedBatch(tokens=tokens, masked=masked, t=t)


def diffusion_targets(
    x0: torch.Tensor, next_tokens: torch.Tensor, masked: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and loss mask [B, L] for the per-position cross-entropy.

    ``next_tokens`` is x0 shifted left by one (the dataset's AR labels). With the shift,
    position i predicts x0[i+1] and counts where input i+1 is masked; the last position has
    no masked successor inside the window and never counts.
    """
    if not shift:
        return x0, masked
    loss_mask = torch.zeros_like(masked)
    loss_mask[:, :-1] = masked[:, 1:]
    return next_tokens, loss_mask


def diffusion_loss(
    token_ce: torch.Tensor,
    loss_mask: torch.Tensor,
    t: torch.Tensor,
    normalization: str,
    sequence_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce per-position cross-entropy [B, L] to the micro-batch loss.

    Returns (loss, number of counted tokens). ``normalization`` "masked" divides the
    1/t-weighted sum by the number of counted tokens (DiffuLLaMA); "sequence" divides by
    B * L (LLaDA / SMDM). With context parallelism each rank of ``sequence_group`` holds a
    slice of every sequence: the denominator is then that of the whole sequences, so the
    ranks' losses add up to the loss of the micro-batch.
    """
    weights = loss_mask.float() / t[:, None]
    total = (token_ce.float() * weights).sum()
    counted = loss_mask.sum()
    positions = torch.tensor(float(token_ce.numel()), device=token_ce.device)
    if sequence_group is not None:
        counted = counted.clone()
        dist.all_reduce(counted, group=sequence_group)
        positions = positions * sequence_group.size()
    if normalization == "masked":
        denominator = counted.clamp(min=1).float()
    elif normalization == "sequence":
        denominator = positions
    else:
        raise ValueError(f"diffusion.normalization: unknown {normalization!r}")
    return total / denominator, counted


def undo_shift(first_tokens: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """Map shifted predictions (position i predicts i+1) back onto positions."""
    return torch.cat([first_tokens[:, :1], predictions[:, :-1]], dim=1)
