"""Diffusion decoding over a stand-in logits function with a known answer."""

import pytest
import torch

from megatron_ext.sampling import diffusion_sample, infill_and_masks, prompt_and_masks

VOCAB, MASK_ID = 32, 31


class CountingModel:
    """Predicts token (position + 1) % 30 at every position, shifted like DiffuGPT."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tokens):
        self.calls += 1
        batch, length = tokens.shape
        logits = torch.full((batch, length, VOCAB + 8), -10.0)  # + padded vocab rows
        for i in range(length):
            logits[:, i, (i + 1) % 30] = 10.0  # shifted: position i predicts i + 1
        logits[..., VOCAB:] = 100.0  # padding rows must never be sampled
        return logits


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_fills_every_mask_and_keeps_the_prompt(order):
    tokens, fixed = prompt_and_masks([5, 6, 7], length=12, mask_id=MASK_ID)
    model = CountingModel()
    out = diffusion_sample(model, tokens, fixed, MASK_ID, VOCAB, steps=6, order=order, seed=1)
    assert out[0, :3].tolist() == [5, 6, 7]
    assert not (out == MASK_ID).any()
    assert out[0, 3:].tolist() == [i % 30 for i in range(3, 15)]  # the shift undone
    assert model.calls <= 6


def test_confidence_order_calls_the_model_once_per_step():
    tokens, fixed = prompt_and_masks([5], length=12, mask_id=MASK_ID)
    model = CountingModel()
    diffusion_sample(model, tokens, fixed, MASK_ID, VOCAB, steps=4, order="confidence")
    assert model.calls == 4


def test_infill_respects_prefix_and_suffix():
    tokens, fixed = infill_and_masks([1, 2], [9, 9, 9], length=5, mask_id=MASK_ID)
    out = diffusion_sample(CountingModel(), tokens, fixed, MASK_ID, VOCAB, steps=5, seed=0)
    assert out[0, :2].tolist() == [1, 2] and out[0, -3:].tolist() == [9, 9, 9]
    assert out[0, 2:7].tolist() == [2, 3, 4, 5, 6]


def test_same_seed_same_sample_and_batches():
    def noisy(tokens):
        generator = torch.Generator().manual_seed(int(tokens.sum()))
        return torch.randn(*tokens.shape, VOCAB, generator=generator)

    tokens, fixed = prompt_and_masks([3], length=10, mask_id=MASK_ID)
    tokens, fixed = tokens.repeat(2, 1), fixed.repeat(2, 1)
    a = diffusion_sample(noisy, tokens, fixed, MASK_ID, VOCAB, steps=5, temperature=1.0, top_p=0.9, seed=4)
    b = diffusion_sample(noisy, tokens, fixed, MASK_ID, VOCAB, steps=5, temperature=1.0, top_p=0.9, seed=4)
    c = diffusion_sample(noisy, tokens, fixed, MASK_ID, VOCAB, steps=5, temperature=1.0, top_p=0.9, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == MASK_ID).any()


def test_shift_needs_a_fixed_first_position():
    tokens = torch.full((1, 4), MASK_ID)
    with pytest.raises(ValueError, match="position 0 must be fixed"):
        diffusion_sample(CountingModel(), tokens, torch.zeros_like(tokens, dtype=torch.bool), MASK_ID, VOCAB, 2)
