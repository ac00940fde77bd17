"""Diffusion decoding over a stand-in logits function with a known answer, and over a tiny
(random) Hugging Face LLaMA through the export's bidirectional logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_ext.sampling import ORDERS, diffusion_sample, infill_and_masks, prompt_and_masks, prompts_and_masks
from pipeline.hf_model import diffusion_logits

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


@pytest.mark.parametrize("order", ORDERS)
def test_fills_every_mask_and_keeps_the_prompt(order):
    tokens, fixed = prompt_and_masks([5, 6, 7], length=12, mask_id=MASK_ID)
    model = CountingModel()
    out = diffusion_sample(model, tokens, fixed, MASK_ID, VOCAB, steps=6, order=order, seed=1)
    assert out[0, :3].tolist() == [5, 6, 7]
    assert not (out == MASK_ID).any()
    assert out[0, 3:].tolist() == [i % 30 for i in range(3, 15)]  # the shift undone
    assert model.calls <= 6


@pytest.mark.parametrize("order", ["confidence", "entropy"])
def test_ranked_orders_call_the_model_once_per_step(order):
    tokens, fixed = prompt_and_masks([5], length=12, mask_id=MASK_ID)
    model = CountingModel()
    diffusion_sample(model, tokens, fixed, MASK_ID, VOCAB, steps=4, order=order)
    assert model.calls == 4


@pytest.mark.parametrize("order", ORDERS)
def test_infill_respects_prefix_and_suffix(order):
    tokens, fixed = infill_and_masks([1, 2], [9, 9, 9], length=5, mask_id=MASK_ID)
    out = diffusion_sample(CountingModel(), tokens, fixed, MASK_ID, VOCAB, steps=5, order=order, seed=0)
    assert out[0, :2].tolist() == [1, 2] and out[0, -3:].tolist() == [9, 9, 9]
    assert out[0, 2:7].tolist() == [2, 3, 4, 5, 6]


def test_entropy_order_commits_the_most_certain_position_first():
    inputs = []

    def one_sure_position(tokens):
        inputs.append(tokens.clone())
        logits = torch.zeros(*tokens.shape, VOCAB)  # uniform everywhere ...
        logits[:, 4, 7] = 20.0  # ... but token 5 (predicted at 4, shifted) is certain
        return logits

    tokens, fixed = prompt_and_masks([5], length=8, mask_id=MASK_ID)
    diffusion_sample(one_sure_position, tokens, fixed, MASK_ID, VOCAB, steps=8, order="entropy", seed=3)
    after_first_step = inputs[1][0]
    assert after_first_step[5] == 7
    assert (after_first_step[1:] == MASK_ID).sum() == 7  # one position per step


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("order", ORDERS)
def test_samplers_on_a_real_model_batch_prompts_and_infills(tiny_llama, order):
    tokens, fixed, attention = prompts_and_masks([[3, 4, 5, 6], [7]], length=6, mask_id=MASK_ID, pad_id=0)
    calls = []

    def logits_fn(x):
        calls.append(1)
        return diffusion_logits(tiny_llama, x, attention)

    out = diffusion_sample(logits_fn, tokens, fixed, MASK_ID, VOCAB, steps=6, temperature=0.9, top_p=0.9,
                           order=order, seed=2)
    assert out[0, :4].tolist() == [3, 4, 5, 6] and out[1, :4].tolist() == [0, 0, 0, 7]
    assert not (out == MASK_ID).any() and len(calls) <= 6
    again = diffusion_sample(logits_fn, tokens, fixed, MASK_ID, VOCAB, steps=6, temperature=0.9, top_p=0.9,
                             order=order, seed=2)
    assert torch.equal(out, again)

    tokens, fixed = infill_and_masks([3, 4], [8, 9], length=4, mask_id=MASK_ID)
    out = diffusion_sample(lambda x: diffusion_logits(tiny_llama, x), tokens, fixed, MASK_ID, VOCAB, steps=4,
                           order=order, seed=2)
    assert out[0, :2].tolist() == [3, 4] and out[0, -2:].tolist() == [8, 9] and not (out == MASK_ID).any()


def test_left_padding_does_not_change_a_greedy_decode(tiny_llama):
    def decode(prompts):
        tokens, fixed, attention = prompts_and_masks(prompts, length=5, mask_id=MASK_ID, pad_id=0)
        return diffusion_sample(lambda x: diffusion_logits(tiny_llama, x, attention), tokens, fixed, MASK_ID,
                                VOCAB, steps=5, temperature=0.0, order="confidence")[:, -5:]

    alone = decode([[7]])
    padded = decode([[3, 4, 5, 6], [7]])
    assert torch.equal(padded[1], alone[0])
