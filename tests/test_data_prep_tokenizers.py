"""data_prep with the tokenizer families of the recipes: GPT-2 byte-level BPE, LLaMA-2
SentencePiece, LLaMA-3 byte-level BPE with reserved special tokens. Each is trained small on
the test corpus, saved in the layout its Hub checkpoints have, and loaded through load_tokenizer."""

import gzip
import io
import json
import shutil

import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import (
    ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
)
from transformers import GPT2TokenizerFast, LlamaTokenizerFast, PreTrainedTokenizerFast

from data_prep.build import build_indexed_dataset
from data_prep.corpus import DataPrepError, iter_documents
from data_prep.tokenizer import MASK_TOKEN, load_tokenizer
from data_prep.verify import verify_indexed_dataset
from megatron_ext.mask_token import resolve_mask_id
from pipeline.config import DiffusionConfig, RunConfig
from pipeline.data import megatron_tokenizer
from pipeline.hf_import import add_mask_token
from conftest import CORPUS

FAMILIES = ["gpt2", "llama2", "llama3"]
EOS = {"gpt2": "<|endoftext|>", "llama2": "</s>", "llama3": "<|end_of_text|>"}
# Written after the corpus, never trained on: characters outside the small vocabularies
# (SentencePiece's byte fallback) and the special tokens' strings as plain text.
UNSEEN = "Unseen characters: naïve café, 漢字, 🙂."
LITERAL_SPECIALS = "Literal specials: <|endoftext|> <s> </s> <|begin_of_text|> <|end_of_text|> <|mask|> end."
# LLaMA-3 appends 256 special tokens after its 128,000 BPE tokens; a few of them, in its order.
LLAMA3_BPE_SIZE = 128_000
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]  # fmt: skip
# LLaMA-3's pre-tokenizer split (numbers in runs of at most 3 digits, then bytes).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def save_gpt2(texts: list[str], out):
    """GPT-2's layout: vocab.json + merges.txt, `<|endoftext|>` the last id (50256 in GPT-2)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=500, show_progress=False)
    files = out.parent / f"{out.name}-files"
    files.mkdir()
    bpe.save_model(str(files))
    vocab = json.loads((files / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (files / "vocab.json").write_text(json.dumps(vocab))
    GPT2TokenizerFast.from_pretrained(str(files)).save_pretrained(str(out))


def train_sentencepiece(texts: list[str]) -> bytes:
    """A SentencePiece BPE model with LLaMA-2's training options (its tokenizer.model)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def save_llama2(texts: list[str], out):
    """meta-llama/Llama-2-7b-hf's layout: tokenizer.model, tokenizer.json, tokenizer_config.json."""
    model_dir = out.parent / f"{out.name}-spm"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(train_sentencepiece(texts))
    LlamaTokenizerFast.from_pretrained(str(model_dir), bos_token="<s>", eos_token="</s>").save_pretrained(str(out))
    shutil.copy(model_dir / "tokenizer.model", out)
    # transformers 5 writes its own Metaspace pipeline, which drops a leading space; the Hub's
    # tokenizer.json has SentencePiece's (always prepend "▁", every space a "▁") and puts BOS first.
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(out / "tokenizer.json"))


def save_llama3(texts: list[str], out):
    """meta-llama/Meta-Llama-3-8B's layout: a PreTrainedTokenizerFast whose special tokens are
    numbered from 128000, after the BPE vocabulary (len() exceeds vocab_size, ids need int32)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    # Tokens no merge produces fill the BPE vocabulary up to LLaMA-3's 128,000.
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), LLAMA3_BPE_SIZE)})
    bpe = Tokenizer.from_str(json.dumps(spec))
    bpe.add_special_tokens(LLAMA3_SPECIALS)
    bos = ("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos[0], eos_token="<|end_of_text|>")
    tokenizer.save_pretrained(str(out))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus's first 100,000 characters (whole paragraphs), then the two extra documents."""
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = f.read(100_000).rsplit("\n\n", 1)[0]
    (root / "train.txt").write_text(text, encoding="utf-8")
    (root / "corpus.txt").write_text(f"{text}\n\n{UNSEEN}\n\n{LITERAL_SPECIALS}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer_dirs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    texts = list(iter_documents([str(corpus / "train.txt")]))
    for family, save in [("gpt2", save_gpt2), ("llama2", save_llama2), ("llama3", save_llama3)]:
        save(texts, root / family)
    return root


@pytest.fixture(scope="module")
def built(corpus, tokenizer_dirs, tmp_path_factory):
    """family -> (tokenizer, dataset prefix, build summary)."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for family in FAMILIES:
        tokenizer = load_tokenizer(str(tokenizer_dirs / family))
        prefix = str(root / family)
        out[family] = tokenizer, prefix, build_indexed_dataset([str(corpus / "corpus.txt")], tokenizer, prefix)
    return out


def read_documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_document_is_its_tokens_then_eos(family, corpus, built):
    tokenizer, prefix, summary = built[family]
    assert tokenizer.eos_token == EOS[family]
    texts = list(iter_documents([str(corpus / "corpus.txt")]))
    documents = read_documents(prefix)
    assert len(documents) == len(texts) > 100
    for text, document in zip(texts, documents):
        # No BOS: the documents are packed, and EOS alone separates them.
        assert document == tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    if family != "gpt2":  # LLaMA's tokenizers put BOS first unless told not to
        assert tokenizer(texts[0])["input_ids"][0] == tokenizer.bos_token_id != documents[0][0]
    assert tokenizer.decode(documents[-2][:-1]) == UNSEEN
    report = verify_indexed_dataset(prefix)
    assert (report["documents"], report["tokens"]) == (len(texts), sum(map(len, documents)))
    assert report["dtype"] == ("int32" if family == "llama3" else "uint16")
    assert 0 <= report["min_id"] and report["max_id"] == max(map(max, documents)) < len(tokenizer)
    assert (report["min_id"], report["max_id"]) == (summary["min_id"], summary["max_id"])


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_strings_in_a_document_stay_text(family, built):
    tokenizer, prefix, _ = built[family]
    document = read_documents(prefix)[-1]
    specials = set(tokenizer.all_special_ids)
    assert document[-1] == tokenizer.eos_token_id and specials.isdisjoint(document[:-1])
    assert tokenizer.decode(document[:-1]) == LITERAL_SPECIALS
    # Tokenized the default way, the text would have held the EOS mid-document.
    assert tokenizer.eos_token_id in tokenizer(LITERAL_SPECIALS, add_special_tokens=False)["input_ids"]


def test_eos_above_vocab_size_is_in_range(built):
    # LLaMA-3's special tokens are added tokens: the range check must use len(), not vocab_size.
    tokenizer, prefix, _ = built["llama3"]
    assert tokenizer.vocab_size == LLAMA3_BPE_SIZE and len(tokenizer) == LLAMA3_BPE_SIZE + len(LLAMA3_SPECIALS)
    assert tokenizer.eos_token_id == 128_001
    assert all(document[-1] == 128_001 for document in read_documents(prefix))


@pytest.mark.parametrize("layout", ["tokenizer.json", "tokenizer.model only"])
def test_llama2_ids_are_sentencepiece_ids(layout, corpus, tokenizer_dirs, tmp_path):
    """Every document, most of which start with indentation, gets the ids LLaMA-2's own
    SentencePiece model gives, whether the folder has the Hub's tokenizer.json or only the
    tokenizer.model and tokenizer_config.json (as transformers 4's slow LlamaTokenizer saved it)."""
    folder = tmp_path / "llama2"
    shutil.copytree(tokenizer_dirs / "llama2", folder)
    if layout != "tokenizer.json":
        (folder / "tokenizer.json").unlink()
    tokenizer = load_tokenizer(str(folder))
    sentencepiece = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    texts = list(iter_documents([str(corpus / "corpus.txt")]))
    assert sum(text.startswith(" ") for text in texts) > len(texts) // 2
    prefix = str(tmp_path / "data")
    build_indexed_dataset([str(corpus / "corpus.txt")], tokenizer, prefix)
    documents = read_documents(prefix)
    for text, document in zip(texts, documents):
        assert document == sentencepiece.encode(text) + [sentencepiece.eos_id()], text[:60]
    byte_pieces = [sentencepiece.id_to_piece(i) for i in documents[-2] if sentencepiece.is_byte(i)]
    assert "<0xE6>" in byte_pieces  # 漢 (E6 BC A2) was never seen: it is spelled in bytes


# The mask each family's recipes use: DiffuGPT-M adds "<|mask|>" to GPT-2 (pipeline.hf_import),
# DiffuLLaMA reuses LLaMA-2's id 811, and LLaMA-3 has reserved special tokens to take one of.
MASKS = {
    "gpt2": (DiffusionConfig(mask_token=MASK_TOKEN), 501),
    "llama2": (DiffusionConfig(mask_token_id=811), 811),
    "llama3": (DiffusionConfig(mask_token="<|reserved_special_token_0|>"), 128_002),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_mask_resolves_in_training_and_leaves_the_data_unchanged(family, corpus, tokenizer_dirs, built, tmp_path):
    _, prefix, _ = built[family]
    # data_prep adds no mask token to a tokenizer it loads: the default one is not there.
    with pytest.raises(ValueError, match=r"'<\|mask\|>' is not a single token of the tokenizer"):
        resolve_mask_id(megatron_tokenizer(str(tokenizer_dirs / family)), MASK_TOKEN)

    diffusion, expected_id = MASKS[family]
    with_mask = load_tokenizer(str(tokenizer_dirs / family))
    add_mask_token(with_mask, RunConfig(diffusion=diffusion))
    with_mask.save_pretrained(str(tmp_path / "tokenizer"))
    training = megatron_tokenizer(str(tmp_path / "tokenizer"))  # as pipeline.train loads it
    mask_id = resolve_mask_id(training, diffusion.mask_token, diffusion.mask_token_id)
    assert mask_id == expected_id and training.vocab_size == len(with_mask)

    # Data tokenized with the mask-carrying tokenizer is the data tokenized without it.
    reloaded = load_tokenizer(str(tmp_path / "tokenizer"))
    build_indexed_dataset([str(corpus / "corpus.txt")], reloaded, str(tmp_path / "data"))
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(tmp_path / f"data{ext}", "rb").read()


def test_token_id_beyond_the_vocabulary_stops_the_build(corpus, tmp_path):
    # A vocabulary with a gap: 501 tokens, but EOS numbered 70000, past both len() and uint16.
    save_gpt2(list(iter_documents([str(corpus / "train.txt")])), tmp_path / "tokenizer")
    spec = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    spec["model"]["vocab"]["<|endoftext|>"] = 70000
    for token in spec["added_tokens"]:
        token["id"] = 70000 if token["content"] == "<|endoftext|>" else token["id"]
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    assert (len(tokenizer), tokenizer.eos_token_id) == (501, 70000)

    message = r"document 0: token id 70000 outside the vocabulary \(size 501\) or the uint16 range"
    with pytest.raises(DataPrepError, match=message):
        build_indexed_dataset([str(corpus / "train.txt")], tokenizer, str(tmp_path / "data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer", "tokenizer-files"]
