"""Byte-level BPE, trained with Hugging Face `tokenizers` and saved as `tokenizer.json`.

Byte level means every UTF-8 string round-trips exactly: no unknown token, no normalisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgegpt.core.errors import EdgeGPTError

END_OF_TEXT = "<|endoftext|>"
# Text goes to `tokenizers` in pieces of at most this many characters: it pre-tokenizes and encodes a
# string whole, holding a few hundred bytes per token, so one 50 MB line would take gigabytes at once.
PIECE_CHARS = 1 << 16
# The BPE trainer's time grows with the square of a word's length (a 50 MB run without whitespace would
# take days), so it sees longer runs cut into words this long.
TRAINER_WORD_CHARS = 1000
_LONG_RUN = re.compile(rf"(\S{{{TRAINER_WORD_CHARS}}})")


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, cut where whitespace follows a
    non-space character: byte-level pre-tokenization (GPT-2's pattern) never joins those two, and only
    looks ahead, so the pieces give exactly the tokens the whole text gives. Only a stretch of `size`
    characters with no such place is cut blindly."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        while cut > start and text[cut - 1].isspace():  # back to the start of the whitespace run
            cut -= 1
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _trainer_pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for piece in text_pieces(text):
            if _LONG_RUN.search(piece):
                yield from filter(None, _LONG_RUN.split(piece))
            else:
                yield piece


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257 + 1:
        raise EdgeGPTError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 258")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train on `texts`; the end-of-text token is id 0 and all 256 bytes are in the base alphabet."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_trainer_pieces(texts), trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise EdgeGPTError(f"{path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise EdgeGPTError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


# The document separator under the names other tokenizers give it (GPT-2/SmolLM2, Llama 3, Llama 2 and
# Mistral, Gemma), so a teacher's tokenizer works as is.
END_OF_TEXT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")


def end_of_text_id(tokenizer: Tokenizer) -> int:
    for name in END_OF_TEXT_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise EdgeGPTError(f"the tokenizer has no end-of-text token (one of {', '.join(END_OF_TEXT_NAMES)})")
