"""A small byte-level BPE tokenizer trained locally on the benchmark text.

Byte-level BPE is used because it needs no ``<unk>`` fallback: any UTF-8 text
maps onto the 256 byte symbols, and decoding inverts encoding exactly, so
``decode(encode(text)) == text`` holds for ordinary sentences.  Training is
offline and deterministic for a fixed list of texts.

The tokenizer adds no BOS/EOS on its own; callers insert ``<s>``/``</s>``
explicitly where they want them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]

MODEL_MAX_LENGTH = 512


def _build_bpe_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a raw ``tokenizers`` byte-level BPE model on ``texts``."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # No prefix space: the leading word of a text keeps its exact bytes, which
    # is what makes decode(encode(text)) reproduce the text unchanged.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Seed the vocabulary with all 256 byte symbols so unseen characters
        # still encode (as bytes) instead of becoming <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizer as a transformers tokenizer with our special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts: list[str], out_dir, vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    The saved directory loads back offline with
    ``transformers.AutoTokenizer.from_pretrained(out_dir)``.  The requested
    ``vocab_size`` is an upper bound: a small corpus may run out of merges
    (with ``min_frequency=2``) before reaching it.
    """
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tokenizer = _wrap(_build_bpe_tokenizer(texts, vocab_size))
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_path))
    return tokenizer
