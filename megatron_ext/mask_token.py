"""The absorbing-state token: an existing id reused, or a dedicated token of the tokenizer.

DiffuGPT-S reuses GPT-2 id 10541 and DiffuLLaMA reuses LLaMA-2 id 811; the tiny default and
DiffuGPT-M use a dedicated "<|mask|>" token. Either way the id must lie inside the
tokenizer's vocabulary (never in Megatron's TP padding rows).
"""

from __future__ import annotations

from typing import Optional


def resolve_mask_id(tokenizer, mask_token: str, mask_token_id: Optional[int] = None) -> int:
    """The mask id for a Megatron tokenizer, checked against its vocabulary size."""
    if mask_token_id is not None:
        mask_id = mask_token_id
        source = f"diffusion.mask_token_id: {mask_token_id}"
    else:
        ids = tokenizer.tokenize(mask_token)
        if len(ids) != 1:
            raise ValueError(
                f"diffusion.mask_token: {mask_token!r} is not a single token of the tokenizer "
                f"(it encodes to {len(ids)} ids); add it to the tokenizer or set diffusion.mask_token_id"
            )
        mask_id = ids[0]
        source = f"diffusion.mask_token: {mask_token!r} (id {mask_id})"
    if not 0 <= mask_id < tokenizer.vocab_size:
        raise ValueError(f"{source} is outside the tokenizer's vocabulary of {tokenizer.vocab_size}")
    return mask_id
