"""Export a Megatron checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

    python -m pipeline.export --config runs/tiny/adapt/config.yaml \
        --checkpoint runs/tiny/adapt/checkpoints --out runs/tiny/hf

The checkpoint may come from any TP / PP layout: this process builds the model at TP=1, PP=1
and lets Megatron's dist_checkpointing reshard it on load. The weights are then renamed and
split into LLaMA's layout (our recipe *is* LLaMA: RMSNorm, SwiGLU, RoPE, no biases), the
vocabulary padding is cut off, and the folder is written with safetensors beside the
tokenizer. The config carries what a diffusion sampler needs on top of LLaMA:
``mask_token_id``, ``bidirectional_attention`` and ``diffusion_shift``; see
``pipeline.hf_model`` for running it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_ext.model import build_gpt_model, padded_vocab_size
from pipeline.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.config import ParallelConfig, RunConfig, load_config
from pipeline.distributed import init_distributed


def init_single_process(cfg: RunConfig) -> None:
    """World size 1 and Megatron parallel state TP = PP = 1 in this process."""
    if not dist.is_initialized():
        # An in-memory store: one process needs no rendezvous (no MASTER_ADDR / PORT).
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_distributed(dataclasses.replace(cfg, parallel=ParallelConfig()))


def build_single_process_model(cfg: RunConfig, vocab_size: int) -> GPTModel:
    """The whole model (TP = PP = 1, fp32, local spec), freshly initialised from the run's seed."""
    init_single_process(cfg)
    # The local spec whatever the recipe says: its module names are the ones converted below
    # (the checkpoint's names are the same for the TE and local specs).
    model_cfg = dataclasses.replace(cfg.model, layer_spec="local")
    # Padded as at the training layout: the checkpoint's embedding has that many rows.
    padded = padded_vocab_size(vocab_size, model_cfg.vocab_divisible_by, cfg.parallel.tp)
    return build_gpt_model(model_cfg, ParallelConfig(), "fp32", padded, cfg.data.seq_length)


def load_megatron_model(cfg: RunConfig, checkpoint_dir: str | Path, vocab_size: int) -> GPTModel:
    """The whole model with the checkpoint's weights, in eval mode.

    ``checkpoint_dir`` is an ``iter_XXXXXXX`` folder, or a checkpoints root (its newest one).
    """
    model = build_single_process_model(cfg, vocab_size)
    # Model only (no optimizer): Megatron reshards the saved TP / PP layout into this one.
    load_checkpoint(latest_checkpoint(checkpoint_dir) or checkpoint_dir, model)
    return model.eval()


def llama_state_dict(model: GPTModel, cfg: RunConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Megatron GPTModel weights renamed and split into LlamaForCausalLM's layout."""
    m = cfg.model
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = m.hidden_size // heads
    src = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": src["embedding.word_embeddings.weight"][:vocab_size]}
    for i in range(m.num_layers):
        meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Fused QKV rows are grouped per query group: [q of the group's heads; k; v].
        qkv = src[meg + "self_attention.linear_qkv.weight"].view(groups, heads // groups + 2, head_dim, -1)
        q, k, v = qkv.split([heads // groups, 1, 1], dim=1)
        out[hf + "self_attn.q_proj.weight"] = q.reshape(heads * head_dim, -1)
        out[hf + "self_attn.k_proj.weight"] = k.reshape(groups * head_dim, -1)
        out[hf + "self_attn.v_proj.weight"] = v.reshape(groups * head_dim, -1)
        out[hf + "self_attn.o_proj.weight"] = src[meg + "self_attention.linear_proj.weight"]
        # SwiGLU's fc1 is [gate; up]: silu acts on the first half.
        gate, up = src[meg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = src[meg + "mlp.linear_fc2.weight"]
        out[hf + "input_layernorm.weight"] = src[meg + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = src[meg + "pre_mlp_layernorm.weight"]
    out["model.norm.weight"] = src["decoder.final_layernorm.weight"]
    # Tied: Megatron has no output layer, HF's lm_head is the embedding itself.
    head = "embedding.word_embeddings.weight" if m.tie_embeddings else "output_layer.weight"
    out["lm_head.weight"] = src[head][:vocab_size]
    return {key: value.contiguous() for key, value in out.items()}


def llama_config(cfg: RunConfig, tokenizer) -> LlamaConfig:
    m = cfg.model
    mask_token_id = cfg.diffusion.mask_token_id
    if mask_token_id is None:
        mask_token_id = tokenizer.convert_tokens_to_ids(cfg.diffusion.mask_token)
    if mask_token_id is None or mask_token_id == tokenizer.unk_token_id:
        raise ValueError(f"diffusion.mask_token: {cfg.diffusion.mask_token!r} is not in the tokenizer")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=max(cfg.data.seq_length, m.max_position_embeddings),
        rms_norm_eps=m.norm_epsilon,
        # Megatron's RoPE takes an integer base (megatron_ext.model), so the export does too.
        rope_parameters={"rope_type": "default", "rope_theta": float(int(m.rotary_base))},
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        # Read by diffusion samplers; plain transformers ignores them.
        mask_token_id=mask_token_id,
        bidirectional_attention=True,
        diffusion_shift=cfg.diffusion.shift,
    )


def export_to_hf(cfg: RunConfig, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint_dir`` as an HF folder at ``out_dir`` (replacing an older export)."""
    if cfg.model.family != "llama":
        raise ValueError(f"model.family: export supports 'llama', not {cfg.model.family!r} yet")
    out_dir = Path(out_dir).absolute()
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    model = load_megatron_model(cfg, checkpoint_dir, len(tokenizer))
    hf_model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    hf_model.load_state_dict(llama_state_dict(model, cfg, len(tokenizer)), strict=True)

    # Written beside out_dir and renamed into place: a crash never leaves half an export.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():  # safetensors' writer leaves 0600; exports are shared
            path.chmod(0o644)
        # A directory cannot be renamed over a non-empty one: move the old export aside first.
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="iter_XXXXXXX folder, or a checkpoints root")
    parser.add_argument("--out", required=True, help="HF folder to write")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    out = export_to_hf(load_config(args.config, args.overrides), Path(args.checkpoint), Path(args.out))
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
