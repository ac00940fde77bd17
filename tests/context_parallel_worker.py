"""One rank of test_context_parallel: CP attention on this rank's chunks against a plain
softmax attention over the whole sequence (written here, independent of the module)."""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.attention import annealed_attention_mask, causal_attention_mask
from megatron_ext.context_parallel import ContextParallelAttention, local_query_positions
from megatron_ext.cpu_compat import apply_cpu_compat

SEQ, BATCH, HEADS, KV_HEADS, HEAD_DIM = 16, 2, 4, 2, 8


def reference_attention(q, k, v, mask):
    """Softmax attention of [s, b, h, d] tensors; GQA by repeating key/value heads."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / HEAD_DIM**0.5
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(dim=-1), v).reshape(SEQ, BATCH, -1)


def check(kind: str, rank: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=generator, requires_grad=True)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=generator, requires_grad=True)
    v = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=generator, requires_grad=True)
    out_weights = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=generator)
    mask, mask_type = {
        "causal": (causal_attention_mask(SEQ), AttnMaskType.causal),
        "annealing": (annealed_attention_mask(3, 8, SEQ, seed=5), AttnMaskType.arbitrary),
        "none": (None, AttnMaskType.no_mask),
    }[kind]

    expected = reference_attention(q, k, v, mask)
    (expected * out_weights).sum().backward()

    rows = local_query_positions(SEQ // 2, rank, 2)
    local_q, local_k, local_v = (x.detach()[rows].requires_grad_() for x in (q, k, v))
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=KV_HEADS, context_parallel_size=2)
    attention = ContextParallelAttention(config, 1, mask_type, "self")
    # The causal AR stage passes no mask (the module builds it from global positions).
    local_mask = mask[:, :, rows] if kind == "annealing" else None
    got = attention(local_q, local_k, local_v, local_mask)
    (got * out_weights[rows]).sum().backward()

    torch.testing.assert_close(got, expected[rows])
    torch.testing.assert_close(local_q.grad, q.grad[rows])
    torch.testing.assert_close(local_k.grad, k.grad[rows])
    torch.testing.assert_close(local_v.grad, v.grad[rows])
    print(f"rank {rank}: {kind}: outputs and gradients match", flush=True)


def main() -> None:
    apply_cpu_compat()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    for kind in ("causal", "annealing", "none"):
        check(kind, parallel_state.get_context_parallel_rank())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
