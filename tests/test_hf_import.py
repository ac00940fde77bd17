"""pipeline.hf_import: a small HF checkpoint (built here with transformers) -> Megatron -> HF.

A LLaMA-style model with GQA and a GPT-2 model are written with ``save_pretrained`` beside a
tokenizer, imported, and exported back: the tensors must come back identical, the Megatron
model must give the HF model's logits (causal before adaptation, bidirectional against the
export), and the GPT-2 import, resharded by a diffusion run at TP=2 PP=2, must export to the
same tensors again, and push step by step.
"""

import json
import math
import threading

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
)

from conftest import torchrun_train, write_tiny_recipe
from megatron_ext.attention import set_attn_mask_type
from pipeline.config import ConfigError, load_config
from pipeline.export import export_to_hf, load_megatron_model
from pipeline.hf_import import import_from_hf, start_from_hf
from pipeline.hf_model import diffusion_logits
from pipeline.metrics import read_metrics
from pipeline.push import push_checkpoints
from test_push import LocalHub

VOCAB = 500
# The write_tiny_recipe model is LLaMA-style with GQA (4 heads, 2 groups); these turn it into GPT-2
# with a mask token the tokenizer lacks, so the import adds it.
GPT2 = ["model.family=gpt2", "model.num_query_groups=null", "model.ffn_hidden_size=256",
        "model.tie_embeddings=true", "diffusion.mask_token=<mask>"]
FAMILIES = {"llama": [], "gpt2": GPT2}


def build_hf_model(family, cfg, tokenizer):
    m = cfg.model
    # A wider init than the default 0.02, so attention patterns (causal vs bidirectional) matter.
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
            max_position_embeddings=m.max_position_embeddings, rope_theta=m.rotary_base,
            rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False, **common))
    return GPT2LMHeadModel(GPT2Config(
        n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads,
        n_positions=m.max_position_embeddings, activation_function="gelu_new", **common))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("hf_import"), VOCAB)


@pytest.fixture(scope="module")
def imports(recipe):
    """family -> (recipe overrides for the import, HF original, import root, its export)."""
    root = recipe.parent
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    out = {}
    for family, overrides in FAMILIES.items():
        cfg = load_config(recipe, overrides)
        hf = build_hf_model(family, cfg, tokenizer)
        hf.save_pretrained(root / f"hf_{family}")
        tokenizer.save_pretrained(root / f"hf_{family}")
        imported = import_from_hf(cfg, str(root / f"hf_{family}"), root / f"megatron_{family}")
        overrides = overrides + [f"data.tokenizer={imported / 'tokenizer'}"]
        export = export_to_hf(load_config(recipe, overrides), imported, root / f"export_{family}")
        out[family] = (overrides, hf.eval(), imported, export)
    return out


def assert_same_tensors(exported, original, vocab_rows=()):
    """``exported`` equals ``original``, the embedding-shaped ones up to the rows added at import."""
    assert exported.keys() <= original.keys()
    for key, tensor in exported.items():
        expected = original[key]
        if key in vocab_rows:
            tensor = tensor[: expected.shape[0]]
        torch.testing.assert_close(tensor, expected, atol=0, rtol=0, msg=key)


def test_llama_gqa_round_trip_is_exact(imports):
    _, hf, _, export = imports["llama"]
    exported = load_file(export / "model.safetensors")
    assert exported.keys() == hf.state_dict().keys()
    assert_same_tensors(exported, hf.state_dict())
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    # Imported, not yet adapted: the export says so.
    assert config["bidirectional_attention"] is False


def test_gpt2_round_trip_is_exact_and_adds_the_mask_token_as_the_mean_row(imports):
    _, hf, imported, export = imports["gpt2"]
    exported = load_file(export / "model.safetensors")
    original = hf.state_dict()
    assert_same_tensors(exported, original, vocab_rows={"transformer.wte.weight"})
    wte = exported["transformer.wte.weight"]
    assert wte.shape[0] == VOCAB + 1
    torch.testing.assert_close(wte[VOCAB], original["transformer.wte.weight"].mean(dim=0))

    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id == VOCAB
    assert AutoTokenizer.from_pretrained(imported / "tokenizer").mask_token_id == VOCAB
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["mask_token_id"] == VOCAB


def megatron_logits(model, input_ids, mask_type, vocab):
    set_attn_mask_type(model, mask_type)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None)[..., :vocab]  # without the TP padding


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_the_hf_models(imports, recipe, family):
    overrides, hf, imported, export = imports[family]
    vocab = len(AutoTokenizer.from_pretrained(imported / "tokenizer"))  # GPT-2's: + the new mask token
    megatron = load_megatron_model(load_config(recipe, overrides), imported, vocab)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))

    causal = megatron_logits(megatron, ids, AttnMaskType.causal, vocab)
    with torch.no_grad():
        torch.testing.assert_close(causal[..., :VOCAB], hf(ids).logits, atol=1e-4, rtol=0)
    bidirectional = megatron_logits(megatron, ids, AttnMaskType.no_mask, vocab)
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    torch.testing.assert_close(diffusion_logits(exported, ids), bidirectional, atol=1e-4, rtol=0)
    assert (bidirectional - causal).abs().max() > 1e-2


def test_a_recipe_that_does_not_describe_the_hf_model_is_a_one_line_error(imports, recipe, tmp_path):
    expected = r"^model.hidden_size: the recipe says 128, the HF checkpoint has 64$"
    with pytest.raises(ValueError, match=expected):
        import_from_hf(load_config(recipe, ["model.hidden_size=128"]), str(recipe.parent / "hf_llama"),
                       tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_init_source_hf_imports_once_and_points_the_recipe_at_the_import(imports, recipe, tmp_path):
    with pytest.raises(ConfigError, match="^init.hf_model: "):
        load_config(recipe, ["init.source=hf"])
    cfg = load_config(recipe, ["init.source=hf", f"init.hf_model={recipe.parent / 'hf_llama'}"])
    started = start_from_hf(cfg, tmp_path / "import")
    assert started.train.init_checkpoint == str(tmp_path / "import")
    assert started.data.tokenizer == str(tmp_path / "import" / "tokenizer")
    assert start_from_hf(cfg, tmp_path / "import") == started  # a second run reuses the import


@pytest.fixture(scope="module")
def adapted_tp2_pp2(imports, recipe):
    """The GPT-2 import adapted by pipeline.train at TP=2 PP=2: (its config, checkpoints root).

    One warmup step: step 1 runs at lr 0, so its checkpoint holds the imported weights; step 2
    adapts them."""
    overrides, _, imported, _ = imports["gpt2"]
    layout = ["parallel.tp=2", "parallel.pp=2"]
    run = recipe.parent / "runs" / "gpt2_tp2_pp2"
    ckpt = torchrun_train(recipe, run, 4, *overrides, *layout, f"train.init_checkpoint={imported}",
                          "train.steps=2", "train.save_interval=1", "train.warmup_steps=1")
    return load_config(recipe, overrides + layout + ["parallel.nproc_per_node=4"]), ckpt


def test_gpt2_import_adapts_at_tp2_pp2_and_exports_the_same_tensors(imports, adapted_tp2_pp2, tmp_path):
    _, hf, _, _ = imports["gpt2"]
    cfg, ckpt = adapted_tp2_pp2
    losses = [r["loss"] for r in read_metrics(ckpt.parent / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    unchanged = export_to_hf(cfg, ckpt / "iter_0000001", tmp_path / "step1")
    exported = load_file(unchanged / "model.safetensors")
    assert_same_tensors(exported, hf.state_dict(), vocab_rows={"transformer.wte.weight"})
    assert json.loads((unchanged / "config.json").read_text())["bidirectional_attention"] is True

    adapted = load_file(export_to_hf(cfg, ckpt, tmp_path / "step2") / "model.safetensors")
    key = "transformer.h.1.mlp.c_fc.weight"
    assert not torch.equal(adapted[key], exported[key])


def test_every_checkpoint_is_pushed_in_step_order_with_a_tag(adapted_tp2_pp2, monkeypatch):
    cfg, ckpt = adapted_tp2_pp2
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    hub = LocalHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        push_checkpoints(cfg, ckpt, "me/gpt2", endpoint=hub.endpoint)
    finally:
        hub.shutdown()
        hub.server_close()
    repo = hub.repos["me/gpt2"]
    assert repo["tags"] == {"step-1": 0, "step-2": 1}
    export_files = {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    assert all(export_files <= commit.keys() for commit in repo["commits"])
    assert b"| steps | 2 |" in repo["commits"][-1]["README.md"]  # main ends at the newest
    losses = [r["loss"] for r in read_metrics(ckpt.parent / "metrics.jsonl") if "loss" in r]
    assert f"| final train loss | {losses[0]:.4f} |".encode() in repo["commits"][0]["README.md"]
