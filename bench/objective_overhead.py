"""What the diffusion objective and attention annealing cost on top of AR training.

One process, one Megatron-Core GPTModel (the tiny recipe's shape unless overridden), the same
batches: time forward + backward for (a) the AR objective with causal attention, (b) the
diffusion objective with no mask (bidirectional, after annealing), (c) the diffusion
objective during annealing (an explicit random mask per step). Prints one JSON line with
step times and the ratios against (a), all measured in this run.

    python bench/objective_overhead.py [--config configs/tiny.yaml] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from megatron_ext.attention import annealed_attention_mask, set_attn_mask_type
from megatron_ext.diffusion import diffusion_loss, diffusion_targets, sample_noise
from megatron.core.transformer.enums import AttnMaskType
from pipeline.config import load_config
from pipeline.export import build_single_process_model

VOCAB = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    model = build_single_process_model(cfg, VOCAB)
    batch, length = cfg.train.micro_batch_size, cfg.data.seq_length
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(2, VOCAB, (batch, length + 1), generator=generator)
    tokens, next_tokens = x0[:, :-1], x0[:, 1:]
    positions = torch.arange(length).expand(batch, length)

    def ar_step(step):
        set_attn_mask_type(model, AttnMaskType.causal)
        ce = model(tokens, positions, None, labels=next_tokens)
        return diffusion_loss(ce, torch.ones_like(ce, dtype=torch.bool), torch.ones(batch), "masked")[0]

    def diffusion_step(step, annealing):
        set_attn_mask_type(model, AttnMaskType.arbitrary if annealing else AttnMaskType.no_mask)
        noised = sample_noise(tokens, torch.arange(batch) + step * batch, 0, 1e-3, 1)
        labels, loss_mask = diffusion_targets(tokens, next_tokens, noised.masked, shift=True)
        mask = annealed_attention_mask(step, 10 * args.steps, length, 0) if annealing else None
        ce = model(noised.tokens, positions, mask, labels=labels)
        return diffusion_loss(ce, loss_mask, noised.t, "masked")[0]

    def seconds_per_step(step_fn) -> float:
        for step in range(3):  # warm-up
            step_fn(step).backward()
        began = time.perf_counter()
        for step in range(args.steps):
            step_fn(step).backward()
        return (time.perf_counter() - began) / args.steps

    ar = seconds_per_step(ar_step)
    bidirectional = seconds_per_step(lambda s: diffusion_step(s, annealing=False))
    annealing = seconds_per_step(lambda s: diffusion_step(s, annealing=True))
    print(json.dumps({
        "bench": "objective_overhead",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": f"{cfg.model.num_layers}x{cfg.model.hidden_size}",
        "batch": batch, "seq_length": length,
        "ar_s_per_step": round(ar, 5),
        "diffusion_s_per_step": round(bidirectional, 5),
        "annealing_s_per_step": round(annealing, 5),
        "diffusion_vs_ar": round(bidirectional / ar, 3),
        "annealing_vs_no_mask": round(annealing / bidirectional, 3),
    }))


if __name__ == "__main__":
    main()
