"""pipeline.export / pipeline.hf_model: a trained Megatron checkpoint as a transformers model.

A tiny GQA model is trained for a few steps under torchrun (once per module); its HF export
must give the Megatron model's logits, bidirectional and causal, and an export of a TP=2
checkpoint must hold the same tensors as the TP=1 model it was resharded from. A sharded export
holds the same tensors behind an index, and the model card reports the run.
"""

import json

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import torchrun_train, write_tiny_recipe
from megatron_ext.attention import set_attn_mask_type
from pipeline.config import load_config
from pipeline.export import build_single_process_model, export_to_hf, llama_state_dict, load_megatron_model
from pipeline.hf_model import diffusion_logits, load_diffusion_lm
from pipeline.metrics import read_metrics

# Padded to 576 rows at TP=1 and 640 at TP=2: the export must load the checkpoint's padding
# and cut it off.
VOCAB = 520


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("export"), VOCAB)


@pytest.fixture(scope="module")
def trained(recipe):
    cfg = load_config(recipe)
    ckpt = torchrun_train(recipe, recipe.parent / "runs" / "tp1", 1)
    return cfg, ckpt, export_to_hf(cfg, ckpt, recipe.parent / "hf")


def megatron_logits(model, input_ids, mask_type):
    set_attn_mask_type(model, mask_type)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None)


def fresh_llama_weights(cfg):
    """The weights every layout initialises from (same seed), in the export's layout."""
    return llama_state_dict(build_single_process_model(cfg, VOCAB), cfg, VOCAB)


def test_export_writes_a_llama_folder(trained):
    cfg, _, out = trained
    model, tokenizer = load_diffusion_lm(str(out))
    assert len(tokenizer) == VOCAB
    assert model.lm_head.weight.shape == (VOCAB, cfg.model.hidden_size)
    assert model.config.num_key_value_heads == 2
    assert model.config.mask_token_id == tokenizer.convert_tokens_to_ids(cfg.diffusion.mask_token)
    assert model.config.bidirectional_attention is True
    assert model.config.diffusion_shift is True
    assert not model.training and model.dtype == torch.float32
    assert not list(out.parent.glob(f".{out.name}.*")), "staging folders left behind"


def test_export_holds_trained_weights_not_the_init(trained):
    cfg, _, out = trained
    exported = load_file(out / "model.safetensors")
    fresh = fresh_llama_weights(cfg)
    assert exported.keys() == fresh.keys()
    assert all(not torch.equal(exported[k], fresh[k]) for k in exported if not k.endswith("norm.weight"))


def test_hf_logits_equal_megatron_logits(trained):
    cfg, ckpt, out = trained
    megatron = load_megatron_model(cfg, ckpt, VOCAB)
    model, _ = load_diffusion_lm(str(out))
    ids = torch.randint(0, VOCAB, (2, cfg.data.seq_length), generator=torch.Generator().manual_seed(0))

    bidirectional = megatron_logits(megatron, ids, AttnMaskType.no_mask)[..., :VOCAB]
    torch.testing.assert_close(diffusion_logits(model, ids), bidirectional, atol=1e-4, rtol=0)
    causal = megatron_logits(megatron, ids, AttnMaskType.causal)[..., :VOCAB]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, causal, atol=1e-4, rtol=0)
    assert (bidirectional - causal).abs().max() > 1e-2


def test_diffusion_logits_see_the_future(trained):
    _, _, out = trained
    model, _ = load_diffusion_lm(str(out))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % VOCAB
    assert (diffusion_logits(model, ids)[0, 0] - diffusion_logits(model, later)[0, 0]).abs().max() > 1e-6


def test_tp2_checkpoint_exports_like_tp1(recipe):
    # lr = 0: the step leaves the weights at their initialisation, which is the same at every
    # layout, so the resharded TP=2 checkpoint must export exactly the TP=1 initial model.
    ckpt = torchrun_train(recipe, recipe.parent / "runs" / "tp2", 2, "parallel.tp=2", "train.steps=1",
                 "train.save_interval=1", "train.lr=0")
    cfg = load_config(recipe, ["parallel.nproc_per_node=2", "parallel.tp=2"])
    exported = load_file(export_to_hf(cfg, ckpt, recipe.parent / "hf_tp2") / "model.safetensors")
    fresh = fresh_llama_weights(cfg)
    assert exported.keys() == fresh.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], fresh[key], atol=0, rtol=0, msg=key)


def test_sharded_export_has_an_index_and_the_same_tensors(trained, recipe):
    cfg, ckpt, out = trained
    sharded = export_to_hf(cfg, ckpt, recipe.parent / "hf_sharded", max_shard_size="100KB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    merged = {key: value for shard in shards for key, value in load_file(sharded / shard).items()}
    single = load_file(out / "model.safetensors")
    assert merged.keys() == single.keys() == weight_map.keys()
    assert all(torch.equal(merged[key], single[key]) for key in single)


def test_model_card_reports_the_recipe_steps_and_loss(trained):
    cfg, ckpt, out = trained
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "diffusion" in card.data.tags
    losses = [r["loss"] for r in read_metrics(ckpt.parent / "metrics.jsonl") if r.get("loss") is not None]
    final_loss = losses[-1]
    assert f"| final train loss | {final_loss:.4f} |" in card.text
    assert f"| steps | {cfg.train.steps} |" in card.text and f"| recipe | {cfg.name} |" in card.text
    assert "| attention | bidirectional |" in card.text
