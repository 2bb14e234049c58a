"""Byte-level BPE, trained with Hugging Face `tokenizers` and saved as `tokenizer.json`.

Byte level means every UTF-8 string round-trips exactly: no unknown token, no normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgegpt.errors import EdgeGPTError

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train on `texts`; the end-of-text token is id 0 and all 256 bytes are in the base alphabet."""
    if vocab_size < 257 + 1:
        raise EdgeGPTError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 258")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise EdgeGPTError(f"{path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise EdgeGPTError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def end_of_text_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise EdgeGPTError(f"tokenizer has no {END_OF_TEXT} token")
    return token_id
