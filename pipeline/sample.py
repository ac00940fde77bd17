"""Diffusion samples from an exported checkpoint: a prompted generation and an infill."""

from __future__ import annotations

from pathlib import Path

from megatron_ext.sampling import diffusion_sample, infill_and_masks, prompt_and_masks
from pipeline.config import RunConfig
from pipeline.hf_model import diffusion_logits, load_diffusion_lm


def generate_and_infill(export_dir: Path, cfg: RunConfig) -> str:
    model, tokenizer = load_diffusion_lm(export_dir)
    s = cfg.sample
    mask_id = model.config.mask_token_id
    shift = bool(getattr(model.config, "diffusion_shift", True))

    def logits_fn(tokens):
        return diffusion_logits(model, tokens)

    def sample(tokens, fixed, steps):
        return diffusion_sample(
            logits_fn, tokens, fixed, mask_id=mask_id, vocab_size=len(tokenizer), steps=steps,
            shift=shift, temperature=s.temperature, top_p=s.top_p, order=s.order, seed=s.seed,
        )

    prompt_ids = [tokenizer.eos_token_id] + tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
    tokens, fixed = prompt_and_masks(prompt_ids, s.length, mask_id)
    generated = tokenizer.decode(sample(tokens, fixed, s.steps)[0, 1:], skip_special_tokens=True)

    prefix = [tokenizer.eos_token_id] + tokenizer(s.infill_prefix, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(" " + s.infill_suffix, add_special_tokens=False)["input_ids"]
    tokens, fixed = infill_and_masks(prefix, suffix, s.infill_length, mask_id)
    filled = sample(tokens, fixed, s.infill_length)[0, len(prefix) : len(prefix) + s.infill_length]
    infill = f"{s.infill_prefix} [{tokenizer.decode(filled, skip_special_tokens=True)}] {s.infill_suffix}"
    return f"--- sample (prompt {s.prompt!r}, {s.steps} steps)\n{generated}\n--- infill\n{infill}\n"
