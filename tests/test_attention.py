"""The annealing schedule: causal at r -> 0, no mask at r = 1, opened fraction tracks r."""

import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.attention import (
    anneal_ratio,
    annealed_attention_mask,
    attention_phase,
    causal_attention_mask,
)


def test_ratio_schedule():
    assert anneal_ratio(0, 10_000) == 1 / 10_000
    assert anneal_ratio(4_999, 10_000) == 0.5
    assert anneal_ratio(9_999, 10_000) == 1.0 and anneal_ratio(50_000, 10_000) == 1.0
    assert anneal_ratio(0, 0) == 1.0


def test_near_zero_ratio_is_causal():
    mask = annealed_attention_mask(step=0, anneal_steps=10**9, seq_len=64, seed=0)
    assert torch.equal(mask, causal_attention_mask(64))


def test_full_ratio_is_no_mask():
    assert annealed_attention_mask(step=99, anneal_steps=100, seq_len=64, seed=0) is None
    assert attention_phase("diffusion", 99, 100) == AttnMaskType.no_mask
    assert attention_phase("diffusion", 50, 100) == AttnMaskType.arbitrary
    assert attention_phase("ar", 500, 100) == AttnMaskType.causal


def test_open_fraction_tracks_ratio_and_causal_edges_stay_open():
    seq_len = 256
    future = causal_attention_mask(seq_len)[0, 0]
    for step in (99, 499, 899):
        mask = annealed_attention_mask(step, 1000, seq_len, seed=3)[0, 0]
        assert not mask[~future].any()  # past and diagonal always visible
        opened = (~mask[future]).float().mean().item()
        assert abs(opened - anneal_ratio(step, 1000)) < 0.01


def test_mask_is_a_function_of_seed_and_step():
    a = annealed_attention_mask(10, 100, 32, seed=1)
    assert torch.equal(a, annealed_attention_mask(10, 100, 32, seed=1))
    assert not torch.equal(a, annealed_attention_mask(11, 100, 32, seed=1))


def test_window_schedule_opens_the_nearest_future_tokens():
    mask = annealed_attention_mask(step=24, anneal_steps=100, seq_len=40, seed=0, schedule="window")[0, 0]
    visible = (~mask).sum(dim=1)
    # r = 0.25: row i sees positions 0..i+10 (clipped at the end of the sequence).
    assert visible.tolist() == [min(i + 11, 40) for i in range(40)]
    assert annealed_attention_mask(99, 100, 40, 0, schedule="window") is None
