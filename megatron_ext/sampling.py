"""Diffusion decoding: fill the masked positions of a sequence in T model calls.

Works over any ``logits_fn(tokens) -> logits [B, L, V]`` running bidirectional attention:
the Megatron model during training or the exported Hugging Face model afterwards. Positions
marked ``fixed`` (a prompt, the prefix and suffix of an infill, left padding) are never
changed; every other position starts as the mask token and is committed once, never remasked.

Each step proposes a token for every position (temperature and top-p; temperature 0 is the
argmax) and commits some of the still-masked ones, in one of three orders:
  "random"      each still-masked position is committed at step i with probability
                1 / (T - i), so all are committed by the last step (DiffuGPT's sampler);
  "confidence"  the positions whose proposal is most probable (MaskGIT-style top-k);
  "entropy"     the positions whose predictive distribution has the lowest entropy.
The two ranked orders commit an equal share of what is left per step, so T steps call the
model T times when there are at least T masks. Deterministic under ``seed``.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_ext.diffusion import undo_shift

ORDERS = ("random", "confidence", "entropy")


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _positions_to_commit(
    order: str,
    still_masked: torch.Tensor,
    probs: torch.Tensor,
    proposal: torch.Tensor,
    remaining_steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    if order == "random":
        chance = torch.rand(still_masked.shape, generator=generator).to(still_masked.device)
        return still_masked & (chance < 1.0 / remaining_steps)
    if order == "confidence":
        score = probs.gather(-1, proposal[..., None]).squeeze(-1)
    else:  # "entropy": the negative entropy, so the most certain positions rank first
        score = (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    score = score.masked_fill(~still_masked, float("-inf"))
    per_row = (still_masked.sum(dim=1).float() / remaining_steps).ceil().long()
    ranks = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return still_masked & (ranks < per_row[:, None])


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
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
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
        if temperature > 0:
            probs = _filter_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
            flat = probs.reshape(-1, probs.shape[-1]).cpu()
            proposal = torch.multinomial(flat, 1, generator=generator).view(x.shape).to(x.device)
        else:
            probs = torch.softmax(logits, dim=-1)
            proposal = probs.argmax(dim=-1)
        commit = _positions_to_commit(order, still_masked, probs, proposal, steps - step, generator)
        x = torch.where(commit, proposal, x)
        still_masked &= ~commit
    return x


def prompt_and_masks(prompt_ids: list[int], length: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, P + length] sequence: the prompt (fixed) followed by ``length`` masks."""
    tokens = torch.tensor([prompt_ids + [mask_id] * length])
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, : len(prompt_ids)] = True
    return tokens, fixed


def prompts_and_masks(
    prompts: list[list[int]], length: int, mask_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of prompts of any lengths, each followed by ``length`` masks.

    Prompts are left-padded so that every generated span ends the row; returns tokens,
    fixed (prompt and padding) and the attention mask (0 on padding) for the logits function.
    Rotary positions are relative, so the padding offset does not change what a row sees.
    """
    width = max(len(p) for p in prompts) + length
    rows = [[pad_id] * (width - length - len(p)) + p + [mask_id] * length for p in prompts]
    tokens = torch.tensor(rows)
    fixed = torch.ones_like(tokens, dtype=torch.bool)
    fixed[:, width - length :] = False
    attention = torch.tensor([[0] * (width - length - len(p)) + [1] * (len(p) + length) for p in prompts])
    return tokens, fixed, attention


def infill_and_masks(
    prefix_ids: list[int], suffix_ids: list[int], length: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, P + length + S] sequence: prefix and suffix fixed, the middle masked."""
    tokens = torch.tensor([prefix_ids + [mask_id] * length + suffix_ids])
    fixed = torch.ones_like(tokens, dtype=torch.bool)
    fixed[:, len(prefix_ids) : len(prefix_ids) + length] = False
    return tokens, fixed
