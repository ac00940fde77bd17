"""Train a small byte-level BPE tokenizer, or load any HF tokenizer, with the mask token we need.

Masked diffusion needs a dedicated mask token; EOS separates documents in the packed
dataset and doubles as BOS/PAD, so the vocabulary carries exactly these two specials.
"""

import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from data_prep.corpus import DataPrepError, iter_documents

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


def train_bpe_tokenizer(paths: list[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on the documents of `paths` and save it as an HF tokenizer in `out_dir`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        # All 256 byte symbols up front, so any input text is encodable (no unknown token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(iter_documents(paths), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        mask_token=MASK_TOKEN,
        pad_token=EOS_TOKEN,
    )
    _save_atomically(tokenizer, out_dir)
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """Save next to `out_dir` and rename into place, so a crash never leaves half a tokenizer."""
    out_dir = os.path.abspath(out_dir)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    old_dir = f"{out_dir}.old-{os.getpid()}"
    try:
        tokenizer.save_pretrained(tmp_dir)
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        if os.path.exists(out_dir):
            os.replace(out_dir, old_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or an HF hub name, tokenizing as its files say.

    The generic fast tokenizer runs tokenizer.json as written, or converts tokenizer.model to
    tokenize as SentencePiece does. AutoTokenizer instead rebuilds some models' pipelines in
    code, and transformers 5's LlamaTokenizer then fuses a leading space into SentencePiece's
    dummy prefix: every document that starts with whitespace would get other ids than
    LLaMA-2 saw in pretraining. The model's own class only reads what nothing else can
    (GPT-2's vocab.json + merges.txt alone).
    """
    # Otherwise a mistyped local path reaches the hub and fails with a repo-id error.
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise DataPrepError(f"{name_or_path}: no such tokenizer directory")
    try:
        try:
            return PreTrainedTokenizerFast.from_pretrained(name_or_path)
        except ValueError:  # neither tokenizer.json nor tokenizer.model (or the hub is out of reach)
            return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, JSON errors...: all mean "can't use this"
        gist = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataPrepError(f"{name_or_path}: cannot load tokenizer: {gist}") from e
