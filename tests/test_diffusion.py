"""The diffusion objective against an independent pure-PyTorch implementation of the recipe."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.diffusion import diffusion_loss, diffusion_targets, sample_noise, undo_shift

MASK_ID = 3


def reference_loss(logits, x0, masked, t, shift, normalization):
    """METHOD.md, written out directly: compare logits[:, :-1] with x0[:, 1:] where input i+1 is
    masked (shift), or logits with x0 where masked (no shift); weight 1/t."""
    batch, length, vocab = logits.shape
    if shift:
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), x0[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(batch, length - 1)
        where = masked[:, 1:].float()
    else:
        ce = F.cross_entropy(logits.reshape(-1, vocab), x0.reshape(-1), reduction="none").view(batch, length)
        where = masked.float()
    total = (ce * where / t[:, None]).sum()
    return total / (where.sum() if normalization == "masked" else batch * length)


def ours(logits, x0, masked, t, shift, normalization):
    next_tokens = torch.cat([x0[:, 1:], torch.zeros_like(x0[:, :1])], dim=1)  # as GPTDataset labels
    labels, loss_mask = diffusion_targets(x0, next_tokens, masked, shift)
    token_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return diffusion_loss(token_ce, loss_mask, t, normalization)[0]


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("normalization", ["masked", "sequence"])
def test_loss_and_gradients_match_reference(shift, normalization):
    torch.manual_seed(0)
    x0 = torch.randint(4, 50, (3, 16))
    noised = sample_noise(x0, torch.tensor([7, 8, 9]), seed=1, eps=1e-3, mask_id=MASK_ID)
    logits_a = torch.randn(3, 16, 50, requires_grad=True)
    logits_b = logits_a.detach().clone().requires_grad_(True)
    loss_a = ours(logits_a, x0, noised.masked, noised.t, shift, normalization)
    loss_b = reference_loss(logits_b, x0, noised.masked, noised.t, shift, normalization)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(logits_a.grad, logits_b.grad)


def test_weighting_is_one_over_t_not_t():
    # One masked target, CE known: the loss must grow as t shrinks (the 7B script's bug did not).
    logits = torch.zeros(1, 4, 10)
    x0 = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[False, True, False, False]])
    small_t = ours(logits, x0, masked, torch.tensor([0.1]), True, "masked")
    large_t = ours(logits, x0, masked, torch.tensor([0.5]), True, "masked")
    torch.testing.assert_close(small_t / large_t, torch.tensor(5.0))


def test_noise_depends_only_on_seed_and_sample_id():
    x0 = torch.randint(4, 50, (4, 64))
    a = sample_noise(x0, torch.tensor([10, 11, 12, 13]), seed=5, eps=1e-3, mask_id=MASK_ID)
    # The same samples in another batch layout draw the same t and mask.
    b = sample_noise(x0[2:], torch.tensor([12, 13]), seed=5, eps=1e-3, mask_id=MASK_ID)
    torch.testing.assert_close(a.t[2:], b.t)
    assert torch.equal(a.masked[2:], b.masked)
    assert torch.equal(a.tokens[a.masked], torch.full_like(a.tokens[a.masked], MASK_ID))
    assert torch.equal(a.tokens[~a.masked], x0[~a.masked])
    c = sample_noise(x0, torch.tensor([10, 11, 12, 13]), seed=6, eps=1e-3, mask_id=MASK_ID)
    assert not torch.equal(a.masked, c.masked)


def test_masking_rate_follows_t():
    x0 = torch.randint(4, 50, (512, 256))
    noised = sample_noise(x0, torch.arange(512), seed=0, eps=1e-3, mask_id=MASK_ID)
    assert noised.t.min() >= 1e-3 and noised.t.max() < 1.0
    rate = noised.masked.float().mean(dim=1)
    assert (rate - noised.t).abs().mean() < 0.03


def test_undo_shift():
    first = torch.tensor([[9, 9, 9]])
    predictions = torch.tensor([[1, 2, 3]])
    assert undo_shift(first, predictions).tolist() == [[9, 1, 2]]


def test_stratified_t_covers_each_batch_evenly():
    x0 = torch.randint(4, 50, (16, 8))
    noised = sample_noise(x0, torch.arange(16, 32), seed=2, eps=1e-3, mask_id=MASK_ID, stratify_over=16)
    strata = ((noised.t - 1e-3) / (1 - 1e-3) * 16).floor().sort().values
    # One t per 1/16-wide stratum (up to the shared offset wrapping around).
    assert len(set(strata.tolist())) == 16
    again = sample_noise(x0[4:], torch.arange(20, 32), seed=2, eps=1e-3, mask_id=MASK_ID, stratify_over=16)
    torch.testing.assert_close(noised.t[4:], again.t)
