"""Run an exported diffusion LM with transformers alone (no Megatron).

    model, tokenizer = load_diffusion_lm("runs/tiny/hf")
    ids = tokenizer("The hacker <|mask|><|mask|>", return_tensors="pt").input_ids
    logits = diffusion_logits(model, ids)

The export (``pipeline.export``) is a plain ``LlamaForCausalLM`` (or ``GPT2LMHeadModel``), but the adapted model attends
bidirectionally: every position sees the whole (partly masked) sequence. LLaMA builds a causal
mask unless it is handed a ready 4D one, so ``diffusion_logits`` builds the full
bidirectional mask in the format of the model's attention implementation (eager, sdpa) and
passes it in. With ``config.diffusion_shift`` true the logits at position i predict token i+1
(DiffuLLaMA); otherwise token i (LLaDA). ``config.mask_token_id`` is the absorbing state.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask


def load_diffusion_lm(path: str, device: str | torch.device = "cpu"):
    """The exported model (float32, eval mode) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def diffusion_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L, V] logits with bidirectional attention; ``attention_mask`` [B, L] marks padding (0)."""
    embeds = model.get_input_embeddings()(input_ids)
    full = create_bidirectional_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        # Materialise the mask even without padding: a None mask would make LLaMA build a causal one.
        allow_is_bidirectional_skip=False,
    )
    return model(inputs_embeds=embeds, attention_mask=full).logits
