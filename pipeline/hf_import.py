"""Import a Hugging Face GPT-2 or LLaMA checkpoint as the Megatron starting point of adaptation.

    python -m pipeline.hf_import --config configs/diffugpt-m.yaml --hf gpt2-medium \
        --out checkpoints/gpt2-medium-megatron

writes ``<out>/iter_0000000/`` + ``<out>/latest`` (a model-only Megatron dist checkpoint, the
recipe's ``train.init_checkpoint``) and ``<out>/tokenizer/`` (the recipe's ``data.tokenizer``).

The recipe's model section must describe the HF model (a mismatch is a one-line error naming
the field). When the recipe's mask is a dedicated token (``diffusion.mask_token`` with no
``mask_token_id``) the tokenizer lacks, it is added, and its embedding and output rows start
as the mean of the existing rows (DiffuGPT-M). Megatron's vocabulary padding for the recipe's
TP gets the mean rows too: a zero row would give its padding logit 0, far above GPT-2's
typical logits, and take most of the softmax mass in training. The checkpoint is written from
one process at TP = PP = 1; Megatron's dist_checkpointing reshards it on load to any TP/PP
(only the padding depends on TP, hence the recipe's). Weights stay float32.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from pipeline.checkpoint import latest_checkpoint, save_checkpoint
from pipeline.config import ModelConfig, RunConfig, load_config
from pipeline.export import GPT2_LAYER_LINEARS, GPT2_LAYER_NORMS, build_single_process_model

CHECKPOINT_STEP = 0


def recipe_model_from_hf(hf_config: PretrainedConfig) -> dict:
    """The ``model`` fields of a recipe that the HF config fixes; unsupported variants are errors."""
    if hf_config.model_type == "llama":
        rope = hf_config.rope_parameters
        heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
        unsupported = {
            "rope_type": (rope.get("rope_type", "default"), "default"),  # Megatron's RoPE here: no scaling
            "hidden_act": (hf_config.hidden_act, "silu"),
            "attention_bias": (hf_config.attention_bias, False),
            "mlp_bias": (hf_config.mlp_bias, False),
            "head_dim": (hf_config.head_dim, hf_config.hidden_size // heads),
        }
        _refuse_variants(unsupported)
        return dict(
            family="llama", num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
            num_attention_heads=heads, num_query_groups=None if kv == heads else kv,
            ffn_hidden_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            rotary_base=float(rope["rope_theta"]), norm_epsilon=hf_config.rms_norm_eps,
            tie_embeddings=hf_config.tie_word_embeddings,
        )
    if hf_config.model_type == "gpt2":
        # megatron_ext.model builds GPT-2 with the tanh GELU ("gelu_new"), GPT-2's own.
        _refuse_variants({
            "activation_function": (hf_config.activation_function, "gelu_new"),
            "scale_attn_weights": (hf_config.scale_attn_weights, True),
            "scale_attn_by_inverse_layer_idx": (hf_config.scale_attn_by_inverse_layer_idx, False),
        })
        return dict(
            family="gpt2", num_layers=hf_config.n_layer, hidden_size=hf_config.n_embd,
            num_attention_heads=hf_config.n_head, num_query_groups=None,
            ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd,
            max_position_embeddings=hf_config.n_positions, norm_epsilon=hf_config.layer_norm_epsilon,
            tie_embeddings=hf_config.tie_word_embeddings,
        )
    raise ValueError(f"hf model_type {hf_config.model_type!r}: import supports 'gpt2' and 'llama'")


def _refuse_variants(settings: dict) -> None:
    for name, (value, supported) in settings.items():
        if value != supported:
            raise ValueError(f"hf config {name}: {value!r} is not supported (only {supported!r})")


def check_recipe_matches(model: ModelConfig, expected: dict) -> None:
    """One-line error naming the first recipe field that differs from the HF model."""
    heads = model.num_attention_heads
    for name, value in expected.items():
        recipe = getattr(model, name)
        if name == "num_query_groups":  # None and num_attention_heads both mean multi-head
            recipe, value = recipe or heads, value or expected["num_attention_heads"]
        if recipe != value:
            raise ValueError(f"model.{name}: the recipe says {recipe!r}, the HF checkpoint has {value!r}")


def add_mask_token(tokenizer, cfg: RunConfig) -> None:
    """Add the recipe's dedicated mask token to ``tokenizer`` when it is not there yet."""
    if cfg.diffusion.mask_token_id is not None:  # an existing token reused as the mask
        if not 0 <= cfg.diffusion.mask_token_id < len(tokenizer):
            raise ValueError(f"diffusion.mask_token_id: {cfg.diffusion.mask_token_id} is outside the "
                             f"tokenizer's {len(tokenizer)} tokens")
        return
    if cfg.diffusion.mask_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": cfg.diffusion.mask_token})


def _rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight``'s rows, extended to ``rows`` with the mean row (new tokens, TP padding)."""
    if weight.shape[0] > rows:
        raise ValueError(f"the HF embedding has {weight.shape[0]} rows, more than the {rows} expected")
    mean = weight.mean(dim=0, keepdim=True)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows (weight or bias): per query group, [its query heads; k; v]."""
    head_dim = q.shape[0] // heads
    rest = q.shape[1:]
    parts = [q.view(groups, heads // groups, head_dim, *rest),
             k.view(groups, 1, head_dim, *rest), v.view(groups, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def megatron_from_llama(hf: dict, m: ModelConfig, rows: int) -> dict[str, torch.Tensor]:
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    out = {"embedding.word_embeddings.weight": _rows(hf["model.embed_tokens.weight"], rows)}
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], heads, groups)
        out[dst + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        # SwiGLU's fc1 is [gate; up]: silu acts on the first half.
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                        hf[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not m.tie_embeddings:
        out["output_layer.weight"] = _rows(hf["lm_head.weight"], rows)
    return out


def megatron_from_gpt2(hf: dict, m: ModelConfig, rows: int) -> dict[str, torch.Tensor]:
    heads = m.num_attention_heads
    out = {"embedding.word_embeddings.weight": _rows(hf["transformer.wte.weight"], rows),
           "embedding.position_embeddings.weight": hf["transformer.wpe.weight"]}
    for i in range(m.num_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        # HF GPT-2's Conv1D stores weights as [in, out], transposed from torch's Linear; c_attn's
        # outputs are [all q | all k | all v], Megatron's are grouped per head.
        q, k, v = hf[src + "attn.c_attn.weight"].t().chunk(3)
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, heads, heads)
        q, k, v = hf[src + "attn.c_attn.bias"].chunk(3)
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(q, k, v, heads, heads)
        for meg_name, hf_name in GPT2_LAYER_LINEARS:
            out[dst + meg_name + ".weight"] = hf[src + hf_name + ".weight"].t()
            out[dst + meg_name + ".bias"] = hf[src + hf_name + ".bias"]
        for meg_name, hf_name in GPT2_LAYER_NORMS:
            out[dst + meg_name + ".weight"] = hf[src + hf_name + ".weight"]
            out[dst + meg_name + ".bias"] = hf[src + hf_name + ".bias"]
    out["decoder.final_layernorm.weight"] = hf["transformer.ln_f.weight"]
    out["decoder.final_layernorm.bias"] = hf["transformer.ln_f.bias"]
    if not m.tie_embeddings:
        out["output_layer.weight"] = _rows(hf["lm_head.weight"], rows)
    return out


class _NoOptimizerState:
    """An import has no optimizer or LR-schedule state: ``train.init_checkpoint`` loads the
    model only and starts both fresh."""

    def sharded_state_dict(self, model_sharded_state_dict):
        return {}

    def state_dict(self):
        return {}


def import_from_hf(cfg: RunConfig, hf_path: str, out_dir: str | Path) -> Path:
    """Write ``hf_path`` (a Hub name or folder) as a Megatron checkpoint root + tokenizer at ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; remove it to import again")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    check_recipe_matches(cfg.model, recipe_model_from_hf(hf_model.config))
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    add_mask_token(tokenizer, cfg)

    model = build_single_process_model(cfg, len(tokenizer))
    rows = model.embedding.word_embeddings.weight.shape[0]  # len(tokenizer) padded for the recipe's TP
    convert = megatron_from_llama if cfg.model.family == "llama" else megatron_from_gpt2
    weights = convert({k: v.detach() for k, v in hf_model.state_dict().items()}, cfg.model, rows)
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    if expected != weights.keys():
        differing = sorted(expected ^ weights.keys())
        raise RuntimeError(f"import: keys differ from the Megatron model's: {differing}")
    model.load_state_dict({**model.state_dict(), **weights}, strict=True)  # shapes checked here

    # Written beside out_dir and renamed into place: a crash never leaves half an import.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = {"config_fingerprint": cfg.fingerprint(), "vocab_size": len(tokenizer),
                    "objective": "ar", "source": str(hf_path)}  # the HF model is autoregressive
        no_state = _NoOptimizerState()
        save_checkpoint(staging, CHECKPOINT_STEP, model, no_state, no_state, manifest)
        tokenizer.save_pretrained(staging / "tokenizer")
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def start_from_hf(cfg: RunConfig, out_dir: Path) -> RunConfig:
    """``cfg`` starting from ``init.hf_model``: imported into ``out_dir`` (once), its checkpoint
    as ``train.init_checkpoint`` and its tokenizer (with the mask token) as ``data.tokenizer``."""
    if latest_checkpoint(out_dir) is None:
        import_from_hf(cfg, cfg.init.hf_model, out_dir)
    started = copy.deepcopy(cfg)
    started.train.init_checkpoint = str(out_dir)
    started.data.tokenizer = str(out_dir / "tokenizer")
    return started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the recipe the import starts")
    parser.add_argument("--hf", required=True, help="HF model name or folder (GPT-2 or LLaMA)")
    parser.add_argument("--out", required=True, help="checkpoint root to write (train.init_checkpoint)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        out = import_from_hf(load_config(args.config, args.overrides), args.hf, args.out)
    except (ValueError, FileExistsError) as err:  # a recipe that does not fit, an existing import
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.hf} to {out} (tokenizer: {out / 'tokenizer'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
