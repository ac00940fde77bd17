"""Megatron-Core's GPTModel configured for a recipe: a LLaMA-style or a GPT-2 decoder.

LLaMA: RMSNorm, SwiGLU, RoPE, no biases, optional GQA. GPT-2: LayerNorm, GELU, learned
positions, biases, tied embeddings. On GPUs with Transformer Engine the TE layer spec
(BF16/FP8 kernels); elsewhere Megatron-Core's local spec. The attention modules are built
for arbitrary masks and switched per phase by ``attention.set_attn_mask_type``; with context
parallelism their core attention is ``context_parallel.ContextParallelAttention``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.context_parallel import ContextParallelAttention
from pipeline.config import ModelConfig, ParallelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the embedding rows split evenly over the TP ranks."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: str) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    bf16 = precision in ("bf16", "fp8")
    llama = model.family == "llama"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=llama,
        # GPT-2 uses the tanh approximation of GELU (HF's "gelu_new").
        activation_func=F.silu if llama else partial(F.gelu, approximate="tanh"),
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.tp > 1 and on_gpu,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        fp8="hybrid" if precision == "fp8" else None,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Diffusion needs the per-token loss; Megatron's fused CE path is fine for it.
        cross_entropy_loss_fusion=False,
    )


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.layer_spec == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if model.layer_spec == "te":
            raise RuntimeError("model.layer_spec=te: transformer-engine is not installed (pip install .[gpu])")
        return False
    return torch.cuda.is_available()


def layer_spec(model: ModelConfig, parallel: ParallelConfig):
    if use_transformer_engine(model):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(
            normalization="RMSNorm" if model.family == "llama" else "LayerNorm"
        )
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    if parallel.cp > 1:
        # Neither Megatron's local attention nor TE's CP attention takes the annealing masks.
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return spec


def build_gpt_model(
    model: ModelConfig, parallel: ParallelConfig, precision: str, vocab_size: int, seq_length: int
) -> GPTModel:
    """This rank's stage of the model (pre/post-process flags from Megatron's parallel state)."""
    return GPTModel(
        config=transformer_config(model, parallel, precision),
        transformer_layer_spec=layer_spec(model, parallel),
        vocab_size=padded_vocab_size(vocab_size, model.vocab_divisible_by, parallel.tp),
        max_sequence_length=max(seq_length, model.max_position_embeddings),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if model.family == "llama" else "learned_absolute",
        rotary_base=int(model.rotary_base),
    )
