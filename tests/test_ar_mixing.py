"""The optional auxiliary AR loss: diffusion loss + weight x next-token loss of the clean
batch, computed in one forward pass with per-sample masks, equals the two computed apart."""

import torch
from megatron.core.transformer.enums import AttnMaskType

from conftest import write_tiny_recipe
from megatron_ext.attention import set_attn_mask_type
from pipeline.config import load_config
from pipeline.data import MicroBatch
from pipeline.export import build_single_process_model
from pipeline.train import Objective


def test_mixed_loss_is_the_sum_of_its_parts(tmp_path):
    recipe = write_tiny_recipe(tmp_path, 300, diffusion={"anneal_steps": 10})
    cfg = load_config(recipe, ["diffusion.ar_loss_weight=0.3"])
    model = build_single_process_model(cfg, 300)
    x = torch.randint(2, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = MicroBatch(tokens=x[:, :-1], labels=x[:, 1:], sample_ids=torch.tensor([4, 5]))
    step = 3  # annealing: a random mask on the diffusion half

    set_attn_mask_type(model, AttnMaskType.arbitrary)
    token_ce, loss_fn = Objective(cfg, mask_id=1, seed=7).forward_step(step, iter([batch]), model)
    mixed, logs = loss_fn(token_ce)

    pure = load_config(recipe)
    token_ce, loss_fn = Objective(pure, mask_id=1, seed=7).forward_step(step, iter([batch]), model)
    diffusion, _ = loss_fn(token_ce)
    set_attn_mask_type(model, AttnMaskType.causal)
    positions = torch.arange(16).expand(2, 16)
    ar = model(batch.tokens, positions, None, labels=batch.labels).mean()

    torch.testing.assert_close(logs["ar_loss"], ar.detach())
    torch.testing.assert_close(mixed, diffusion + 0.3 * ar)
