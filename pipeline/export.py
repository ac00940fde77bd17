"""Export a Megatron checkpoint as a Hugging Face folder: ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.

    python -m pipeline.export --config runs/tiny/adapt/config.yaml \
        --checkpoint runs/tiny/adapt/checkpoints --out runs/tiny/hf

The checkpoint may come from any TP / PP / DP layout: this process builds the model at TP=1,
PP=1 and lets Megatron's dist_checkpointing reshard it on load. The weights are then renamed
and split into the family's HF layout, the vocabulary padding is cut off, and the folder is
written with safetensors (sharded with an index above ``--max-shard-size``) beside the
tokenizer and a model card (recipe, data, steps, loss from the run's ``metrics.jsonl``). The
config carries what a diffusion sampler needs on top of the architecture: ``mask_token_id``,
``bidirectional_attention`` (false for a checkpoint not yet adapted) and ``diffusion_shift``;
see ``pipeline.hf_model`` for running it. ``pipeline.hf_import`` is the inverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from huggingface_hub import ModelCard, ModelCardData
from megatron.core.models.gpt import GPTModel
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from megatron_ext.model import build_gpt_model, padded_vocab_size
from pipeline.checkpoint import latest_checkpoint, load_checkpoint, read_manifest
from pipeline.config import ParallelConfig, RunConfig, load_config
from pipeline.distributed import init_distributed
from pipeline.metrics import read_metrics


# A GPT-2 layer's modules, (Megatron name, HF GPT-2 name): weight and bias each. The Linear
# weights are transposed between the two (HF's Conv1D stores [in, out]).
GPT2_LAYER_LINEARS = (
    ("self_attention.linear_proj", "attn.c_proj"),
    ("mlp.linear_fc1", "mlp.c_fc"),
    ("mlp.linear_fc2", "mlp.c_proj"),
)
GPT2_LAYER_NORMS = (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2"))


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


def split_qkv(fused: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """q, k, v rows of Megatron's fused QKV weight or bias, whose rows are grouped per query
    group: [the group's query heads; its k head; its v head]."""
    rest = fused.shape[1:]
    grouped = fused.view(groups, heads // groups + 2, -1, *rest)
    return tuple(t.reshape(-1, *rest) for t in grouped.split([heads // groups, 1, 1], dim=1))


def _weights(model: GPTModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def llama_state_dict(model: GPTModel, cfg: RunConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Megatron GPTModel weights renamed and split into LlamaForCausalLM's layout."""
    m = cfg.model
    src = _weights(model)
    out = {"model.embed_tokens.weight": src["embedding.word_embeddings.weight"][:vocab_size]}
    for i in range(m.num_layers):
        meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(src[meg + "self_attention.linear_qkv.weight"], m.num_attention_heads,
                            m.num_query_groups or m.num_attention_heads)
        out[hf + "self_attn.q_proj.weight"] = q
        out[hf + "self_attn.k_proj.weight"] = k
        out[hf + "self_attn.v_proj.weight"] = v
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


def gpt2_state_dict(model: GPTModel, cfg: RunConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Megatron GPTModel weights renamed and split into GPT2LMHeadModel's layout."""
    m = cfg.model
    heads = m.num_attention_heads
    src = _weights(model)
    out = {"transformer.wte.weight": src["embedding.word_embeddings.weight"][:vocab_size],
           "transformer.wpe.weight": src["embedding.position_embeddings.weight"]}
    for i in range(m.num_layers):
        meg, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        # HF's c_attn outputs [all q | all k | all v], and its Conv1D stores weights as
        # [in, out], the transpose of Megatron's (torch Linear) [out, in].
        qkv_weight = split_qkv(src[meg + "self_attention.linear_qkv.weight"], heads, heads)
        out[hf + "attn.c_attn.weight"] = torch.cat(qkv_weight).t()
        qkv_bias = split_qkv(src[meg + "self_attention.linear_qkv.bias"], heads, heads)
        out[hf + "attn.c_attn.bias"] = torch.cat(qkv_bias)
        for meg_name, hf_name in GPT2_LAYER_LINEARS:
            out[hf + hf_name + ".weight"] = src[meg + meg_name + ".weight"].t()
            out[hf + hf_name + ".bias"] = src[meg + meg_name + ".bias"]
        for meg_name, hf_name in GPT2_LAYER_NORMS:
            out[hf + hf_name + ".weight"] = src[meg + meg_name + ".weight"]
            out[hf + hf_name + ".bias"] = src[meg + meg_name + ".bias"]
    out["transformer.ln_f.weight"] = src["decoder.final_layernorm.weight"]
    out["transformer.ln_f.bias"] = src["decoder.final_layernorm.bias"]
    head = "embedding.word_embeddings.weight" if m.tie_embeddings else "output_layer.weight"
    out["lm_head.weight"] = src[head][:vocab_size]
    return {key: value.contiguous() for key, value in out.items()}


def mask_token_id(cfg: RunConfig, tokenizer) -> int:
    mask_id = cfg.diffusion.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.convert_tokens_to_ids(cfg.diffusion.mask_token)
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        raise ValueError(f"diffusion.mask_token: {cfg.diffusion.mask_token!r} is not in the tokenizer")
    return mask_id


def diffusion_fields(cfg: RunConfig, tokenizer, bidirectional: bool) -> dict:
    """Config entries read by diffusion samplers; plain transformers ignores them."""
    return dict(
        mask_token_id=mask_token_id(cfg, tokenizer),
        bidirectional_attention=bidirectional,
        diffusion_shift=cfg.diffusion.shift,
    )


def llama_config(cfg: RunConfig, tokenizer, bidirectional: bool = True) -> LlamaConfig:
    m = cfg.model
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
        **diffusion_fields(cfg, tokenizer, bidirectional),
    )


def gpt2_config(cfg: RunConfig, tokenizer, bidirectional: bool = True) -> GPT2Config:
    m = cfg.model
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(cfg.data.seq_length, m.max_position_embeddings),
        n_embd=m.hidden_size,
        n_layer=m.num_layers,
        n_head=m.num_attention_heads,
        n_inner=m.ffn_hidden_size,
        activation_function="gelu_new",  # tanh GELU, as megatron_ext.model builds GPT-2
        layer_norm_epsilon=m.norm_epsilon,
        # Trained without dropout (megatron_ext.model); fine-tuning the export should match.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **diffusion_fields(cfg, tokenizer, bidirectional),
    )


_FAMILIES = {  # model.family -> (HF class, its config, the weight conversion)
    "llama": (LlamaForCausalLM, llama_config, llama_state_dict),
    "gpt2": (GPT2LMHeadModel, gpt2_config, gpt2_state_dict),
}

_USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
ids = tokenizer("The hacker" + "{mask}" * 8, return_tensors="pt").input_ids
embeds = model.get_input_embeddings()(ids)
# A ready 4D mask: without one, transformers would build a causal mask.
mask = create_bidirectional_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                 allow_is_bidirectional_skip=False)
logits = model(inputs_embeds=embeds, attention_mask=mask).logits
```
"""


def model_card(
    cfg: RunConfig, manifest: dict, metrics: list[dict], tokenizer, bidirectional: bool
) -> ModelCard:
    """README.md of the export: what was trained, on what, for how long, to which loss."""
    losses = [r["loss"] for r in metrics if r.get("loss") is not None]
    val_losses = [r["val_loss"] for r in metrics if r.get("val_loss") is not None]
    data = ", ".join(
        f"{prefix} ({weight:g})" if weight is not None else prefix
        for prefix, weight in zip(cfg.data.prefixes, cfg.data.weights or [None] * len(cfg.data.prefixes))
    )
    m = cfg.model
    rows = [
        ("recipe", cfg.name),
        ("architecture", f"{m.family}, {m.num_layers} layers, hidden {m.hidden_size}"),
        ("objective", manifest.get("objective", cfg.diffusion.objective)),
        ("attention", "bidirectional" if bidirectional else "causal"),
        ("data", data),
        ("sequence length", cfg.data.seq_length),
        ("steps", manifest.get("step", "unknown")),
        ("tokens seen", manifest.get("tokens_seen", "unknown")),
        ("final train loss", f"{losses[-1]:.4f}" if losses else "not recorded"),
        ("final validation loss", f"{val_losses[-1]:.4f}" if val_losses else "not recorded"),
    ]
    mask = tokenizer.convert_ids_to_tokens(mask_token_id(cfg, tokenizer))
    body = "\n".join([
        f"# {cfg.name}",
        "",
        ("A masked diffusion language model adapted from an autoregressive model" if bidirectional
         else "An autoregressive model, not yet adapted to masked diffusion,")
        + " with difftron (Megatron-Core), as in *Scaling Diffusion Language Models via Adaptation "
        "from Autoregressive Models* (Gong et al., ICLR 2025).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        f"`config.mask_token_id` ({mask!r}) is the absorbing state; with `config.diffusion_shift` "
        "the logits at position i predict token i+1.",
        "",
        "## Use with transformers",
        "",
        _USAGE.format(repo="path/or/repo-id", mask=mask),
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ])
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                              tags=["diffusion", "masked-diffusion-lm", "difftron", m.family])
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def export_to_hf(
    cfg: RunConfig, checkpoint_dir: str | Path, out_dir: str | Path, max_shard_size: str = "5GB"
) -> Path:
    """Write ``checkpoint_dir`` as an HF folder at ``out_dir`` (replacing an older export)."""
    if cfg.model.family not in _FAMILIES:
        raise ValueError(f"model.family: export supports {sorted(_FAMILIES)}, not {cfg.model.family!r}")
    hf_class, hf_config, convert = _FAMILIES[cfg.model.family]
    out_dir = Path(out_dir).absolute()
    source = latest_checkpoint(checkpoint_dir) or Path(checkpoint_dir)
    manifest = read_manifest(source) if (source / "manifest.json").is_file() else {}
    # A checkpoint not yet adapted (an import, the AR stage) still attends causally.
    bidirectional = manifest.get("objective", cfg.diffusion.objective) == "diffusion"
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    if cfg.diffusion.mask_token_id is None:  # a dedicated token: tokenizer.mask_token_id names it
        tokenizer.mask_token = cfg.diffusion.mask_token
    model = load_megatron_model(cfg, source, len(tokenizer))
    hf_model = hf_class(hf_config(cfg, tokenizer, bidirectional))
    hf_model.load_state_dict(convert(model, cfg, len(tokenizer)), strict=True)
    # The stage directory holding checkpoints/iter_XXXXXXX also holds the run's metrics; an
    # earlier checkpoint reports the losses up to its own step (a record's step is 0-based).
    metrics = [r for r in read_metrics(source.parent.parent / "metrics.jsonl")
               if r["step"] < manifest.get("step", float("inf"))]

    # Written beside out_dir and renamed into place: a crash never leaves half an export.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        hf_model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        model_card(cfg, manifest, metrics, tokenizer, bidirectional).save(staging / "README.md")
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
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (an index above one)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    out = export_to_hf(load_config(args.config, args.overrides), Path(args.checkpoint), Path(args.out),
                       args.max_shard_size)
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
