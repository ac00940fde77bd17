"""Diffusion decoding: fill the masked positions of a sequence in T model calls.

Works over any ``logits_fn(tokens) -> logits [B, L, V]`` running bidirectional attention:
the Megatron model during training or the exported Hugging Face model afterwards. Positions
marked ``fixed`` (a prompt, or the prefix and suffix of an infill) are never changed; every
other position starts as the mask token and is committed once, never remasked.

Orders of unmasking: "random" (each still-masked position is committed at step i with
probability 1 / (T - i), so all are committed by the last step, as DiffuGPT samples) and
"confidence" (MaskGIT-style: commit the most probable positions, an equal share per step).
Deterministic under ``seed``.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_ext.diffusion import undo_shift


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


@torch.no_grad()
def diffusion_sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    fixed: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    steps: int,
    shift: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    order: str = "random",
    seed: int = 0,
) -> torch.Tensor:
    """Return ``tokens`` [B, L] with every non-fixed position filled."""
    if shift and not bool(fixed[:, 0].all()):
        raise ValueError("with the shift, position 0 must be fixed (a prompt or BOS token)")
    generator = torch.Generator().manual_seed(seed)
    x = torch.where(fixed, tokens, torch.full_like(tokens, mask_id))
    still_masked = ~fixed
    for step in range(steps):
        if not still_masked.any():
            break
        logits = logits_fn(x).float()[..., :vocab_size]  # padded vocab rows never sampled
        logits[..., mask_id] = float("-inf")  # the absorbing state is never a prediction
        if shift:
            logits = undo_shift(logits, logits)  # position j is predicted at j - 1
        probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
        probs = _filter_top_p(probs, top_p)
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        proposal = torch.multinomial(flat, 1, generator=generator).view(x.shape).to(x.device)
        remaining_steps = steps - step
        if order == "random":
            chance = torch.rand(x.shape, generator=generator).to(x.device)
            commit = still_masked & (chance < 1.0 / remaining_steps)
        elif order == "confidence":
            confidence = probs.gather(-1, proposal[..., None]).squeeze(-1)
            confidence = confidence.masked_fill(~still_masked, -1.0)
            per_row = (still_masked.sum(dim=1).float() / remaining_steps).ceil().long()
            ranks = confidence.argsort(dim=1, descending=True).argsort(dim=1)
            commit = still_masked & (ranks < per_row[:, None])
        else:
            raise ValueError(f"order: expected 'random' or 'confidence', got {order!r}")
        x = torch.where(commit, proposal, x)
        still_masked &= ~commit
    return x


def prompt_and_masks(prompt_ids: list[int], length: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, P + length] sequence: the prompt (fixed) followed by ``length`` masks."""
    tokens = torch.tensor([prompt_ids + [mask_id] * length])
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, : len(prompt_ids)] = True
    return tokens, fixed


def infill_and_masks(
    prefix_ids: list[int], suffix_ids: list[int], length: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, P + length + S] sequence: prefix and suffix fixed, the middle masked."""
    tokens = torch.tensor([prefix_ids + [mask_id] * length + suffix_ids])
    fixed = torch.ones_like(tokens, dtype=torch.bool)
    fixed[:, len(prefix_ids) : len(prefix_ids) + length] = False
    return tokens, fixed
