"""Two prepared datasets blended 0.7 / 0.3 by Megatron's BlendedMegatronDatasetBuilder: the
training batches draw from each in proportion, and the index caches go where the recipe says."""

import numpy as np

from conftest import write_tiny_recipe
from data_prep.build import build_indexed_dataset
from data_prep.tokenizer import load_tokenizer
from pipeline.config import load_config
from pipeline.data import build_datasets, megatron_tokenizer
from pipeline.export import init_single_process


def test_blend_follows_the_weights(tmp_path):
    recipe = write_tiny_recipe(tmp_path, 300)
    # A second corpus whose documents are all one repeated word, so its tokens are recognisable.
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join("zebra " * 40 for _ in range(400)))
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    build_indexed_dataset([str(other)], tokenizer, str(tmp_path / "data" / "other"))
    cfg = load_config(recipe, [f"data.prefixes=[{tmp_path}/data/corpus, {tmp_path}/data/other]",
                               "data.weights=[0.7, 0.3]", f"data.cache_dir={tmp_path}/blend-cache"])
    init_single_process(cfg)
    train, _ = build_datasets(cfg, megatron_tokenizer(cfg.data.tokenizer), train_steps=100)
    zebra = set(tokenizer(" zebra zebra", add_special_tokens=False)["input_ids"])
    from_other = [bool(set(train[i]["tokens"].tolist()) <= zebra | {tokenizer.eos_token_id})
                  for i in range(len(train))]
    assert abs(np.mean(from_other) - 0.3) < 0.03
    assert any((tmp_path / "blend-cache").iterdir())
