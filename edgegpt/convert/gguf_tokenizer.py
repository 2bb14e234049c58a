"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata.

A GGUF file carries its tokenizer as data, not as a tokenizer.json: the token strings in id order, the
BPE merges or the SentencePiece scores, a type per token, the ids of the special tokens, whether a BOS is
added, and the name of a pre-tokenizer that llama.cpp hard-codes (`tokenizer.ggml.pre`). This module maps
those onto the equivalent `tokenizers` pieces, written here because nothing reads the file's metadata that
way: transformers 4.57's GGUF conversion gets SmolLM2's special tokens and pre-tokenizer wrong (it adds a
BOS to every encoding, reports `<|im_start|>` as eos and does not split digits; BENCHMARK-NOTES.md), and
reads Gemma 3's SentencePiece BPE pieces as a Unigram model, which splits common words into pieces.

    tokenizer.ggml.model       "gpt2": byte-level BPE, merges listed; "llama": SentencePiece-style BPE, where
                               the merges follow from the scores (sentencepiece_merges)
    tokenizer.ggml.tokens      the vocabulary, id = position
    tokenizer.ggml.merges      "a b" pairs, in priority order (gpt2)
    tokenizer.ggml.scores      a score per token; the higher, the earlier pieces merge into it (llama)
    tokenizer.ggml.token_type  1 normal, 2 unknown, 3 control → special added token, 4 user-defined → added
                               token, 5 unused, 6 byte (<0xNN>, SentencePiece's byte fallback)
    tokenizer.ggml.pre         the split rule before BPE (PRE_TOKENIZERS; gpt2 only)
    tokenizer.ggml.add_space_prefix  SentencePiece's dummy prefix: "▁" before the text (Llama 2 yes, Gemma 3 no)
    tokenizer.ggml.add_bos_token / add_eos_token   a post-processor that adds them
    tokenizer.ggml.{bos,eos,eot,eom,padding}_token_id and tokenizer.chat_template → generation_config.json
                               and chat_template.jinja (generation_from_gguf, chat_template_from_gguf)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgegpt.convert.generation import clean_generation_config
from edgegpt.core.errors import EdgeGPTError

# llama.cpp's token types (llama_token_type in llama.h).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split pattern: what ByteLevel(use_regex=True) applies, and what llama.cpp's "gpt2" kind lists.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's pattern, as its tokenizer.json writes it (llama.cpp spells the case-insensitive group out).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's pattern (Qwen2.5 and Qwen3 files say "qwen2" too), as its tokenizer.json writes it: Llama 3's, but
# every digit on its own.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPACE = "\u2581"  # "▁", SentencePiece's visible space


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's list for these kinds is ["\p{N}", GPT-2's pattern]: every digit on its own first.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def make() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return make


_llama3 = _split_then_bytes(LLAMA3_PATTERN)
_qwen2 = _split_then_bytes(QWEN2_PATTERN)

# tokenizer.ggml.pre → (pre-tokenizer, ignore_merges, NFC), from llama.cpp's llama-vocab.cpp. ignore_merges:
# a pre-token that is itself in the vocabulary is one token whatever the merges say (Llama 3's rule, and
# llama.cpp sets it for these kinds). NFC: the family's tokenizer.json normalizes text to NFC first (Qwen2's
# does; llama.cpp skips it, which only matters for text that is not already NFC, and the published
# tokenizer is the reference). "default" (and a file without the key) is llama.cpp's fallback, GPT-2's
# rule. Only kinds whose rule is known exactly are listed: a guess would encode silently wrong.
PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool, bool]] = {
    "default": (_gpt2, False, False),
    "gpt2": (_gpt2, False, False),
    "smollm": (_digits_then_gpt2, False, False),
    "starcoder": (_digits_then_gpt2, False, False),
    "refact": (_digits_then_gpt2, False, False),
    "llama-bpe": (_llama3, True, False),
    "llama3": (_llama3, True, False),
    "llama-v3": (_llama3, True, False),
    "qwen2": (_qwen2, False, True),
}

# Tokens llama.cpp also ends a generation at, found by their text (llama-vocab.cpp: a Gemma 3 or Qwen file
# often names <end_of_turn> or <|im_end|> nowhere else): an instruct model ends its turn with one of these.
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "<|endoftext|>",
                     "<end_of_utterance>")


def _strings(meta: Mapping[str, Any], key: str, source: str) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise EdgeGPTError(f"{source}: {key} is {'missing' if value is None else 'not a list of strings'}; "
                           "the file's tokenizer is incomplete")
    return value


def _optional_id(meta: Mapping[str, Any], key: str, size: int, source: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
        raise EdgeGPTError(f"{source}: {key} is {value!r}, not a token id (0 to {size - 1})")
    return value


def _vocabulary(tokens: list[str], source: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise EdgeGPTError(f"{source}: tokenizer.ggml.tokens holds {token!r} twice (ids {vocab[token]} and {i}); "
                               "a vocabulary maps each string to one id")
        vocab[token] = i
    return vocab


def _merges(meta: Mapping[str, Any], source: str) -> list[tuple[str, str]]:
    merges = []
    for i, merge in enumerate(_strings(meta, "tokenizer.ggml.merges", source)):
        pair = merge.split(" ")
        if len(pair) != 2 or not all(pair):
            raise EdgeGPTError(f"{source}: tokenizer.ggml.merges[{i}] is {merge!r}, not two tokens joined by a space")
        merges.append((pair[0], pair[1]))
    return merges


def _token_types(meta: Mapping[str, Any], count: int, source: str) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [NORMAL] * count
    if not isinstance(types, list) or len(types) != count:
        raise EdgeGPTError(f"{source}: tokenizer.ggml.token_type has {len(types) if isinstance(types, list) else '?'} "
                           f"entries for {count} tokens")
    return [int(t) for t in types]


def _scores(meta: Mapping[str, Any], count: int, source: str) -> list[float]:
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != count or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        found = "missing" if scores is None else f"{len(scores)} entries" if isinstance(scores, list) else "not a list"
        raise EdgeGPTError(f"{source}: tokenizer.ggml.scores is {found}; a SentencePiece-style tokenizer needs one "
                           f"score per token ({count})")
    return [float(x) for x in scores]


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges that reproduce SentencePiece's BPE encoding from its pieces and scores.

    SentencePiece (and llama.cpp's port of it) repeatedly joins the adjacent pair whose concatenation is the
    piece of highest score, leftmost first on a tie. A `tokenizers` BPE joins the adjacent pair of lowest
    merge rank, leftmost first: the same when every way to split a normal piece into two normal pieces is a
    merge, ranked by the score of the piece it makes. The scores of a trained SentencePiece model differ
    between pieces; where two pieces tie, the lower id goes first."""
    normal = {token for token, kind in zip(tokens, types) if kind == NORMAL}
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_bpe(meta: Mapping[str, Any], vocab: dict[str, int], source: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise EdgeGPTError(f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer edgegpt does not know; "
                           f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    make_pre_tokenizer, ignore_merges, nfc = PRE_TOKENIZERS[pre]
    try:
        model = models.BPE(vocab=vocab, merges=_merges(meta, source), ignore_merges=ignore_merges, fuse_unk=False,
                           byte_fallback=False)
    except Exception as e:  # tokenizers raises a bare Exception for a merge of tokens not in the vocabulary
        raise EdgeGPTError(f"{source}: the tokenizer's merges do not fit its tokens ({str(e)[:120]})") from None
    tokenizer = Tokenizer(model)
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], vocab: dict[str, int], types: list[int],
                       source: str) -> Tokenizer:
    """SentencePiece's BPE as `tokenizers` pieces: spaces become "▁" (and one "▁" goes before the text when
    the file asks for SentencePiece's dummy prefix), the merges follow from the scores, characters outside
    the vocabulary fall back to their UTF-8 bytes as <0xNN> tokens, and decoding undoes all three."""
    scores = _scores(meta, len(tokens), source)
    unknown = _optional_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens), source)
    if unknown is None:
        unknown = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    model = models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types),
                       unk_token=None if unknown is None else tokens[unknown], fuse_unk=True,
                       byte_fallback=any(kind == BYTE for kind in types))
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if _dummy_prefix(meta):
        steps.insert(0, normalizers.Prepend(SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if _dummy_prefix(meta) else [])])
    return tokenizer


def _dummy_prefix(meta: Mapping[str, Any]) -> bool:
    # llama.cpp's default for SentencePiece-style files, and SentencePiece's own: a "▁" before the text.
    return meta.get("tokenizer.ggml.add_space_prefix", True) is not False


def tokenizer_from_gguf(meta: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer the metadata describes; anything it cannot rebuild exactly is one EdgeGPTError."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise EdgeGPTError(f"{source}: tokenizer.ggml.model is {kind!r}; edgegpt rebuilds 'gpt2' (byte-level BPE) "
                           "and 'llama' (SentencePiece-style BPE) tokenizers")
    tokens = _strings(meta, "tokenizer.ggml.tokens", source)
    vocab = _vocabulary(tokens, source)
    types = _token_types(meta, len(tokens), source)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, vocab, source)
    else:
        tokenizer = _sentencepiece_bpe(meta, tokens, vocab, types, source)
    # Control tokens (<|im_start|>, <|eot_id|>) are special: matched whole in any text, left out of decoded
    # text when special tokens are skipped. User-defined tokens (<think>) are matched whole too but stay
    # ordinary text in the output, as llama.cpp prints them and as Hugging Face marks them (special=false).
    # Both are matched in the text as written, before spaces become "▁": SentencePiece and llama.cpp do so
    # too, so Gemma 3's user-defined "▁▁" pieces never stand for two spaces. Each already has its id in the
    # vocabulary, which the added token takes over.
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])
    tokenizer.post_processor = _post_processor(meta, tokens, source, add_bos_default=kind == "llama")
    return tokenizer


def _post_processor(meta: Mapping[str, Any], tokens: list[str], source: str,
                    add_bos_default: bool = False) -> processors.PostProcessor | None:
    """BOS before (and EOS after) every encoding where the file says the model expects them; a file that does
    not say gets llama.cpp's default (a BOS for SentencePiece-style tokenizers, when the file names one)."""
    single, pair, special = ["$A:0"], ["$A:0", "$B:1"], []
    for flag, key, first in (("add_bos_token", "bos_token_id", True), ("add_eos_token", "eos_token_id", False)):
        wanted = meta.get(f"tokenizer.ggml.{flag}")
        if wanted is None and first and add_bos_default:
            if meta.get(f"tokenizer.ggml.{key}") is None:
                continue
        elif wanted is not True:
            continue
        token_id = _optional_id(meta, f"tokenizer.ggml.{key}", len(tokens), source)
        if token_id is None:
            raise EdgeGPTError(f"{source}: tokenizer.ggml.{flag} is true but tokenizer.ggml.{key} is missing")
        token = tokens[token_id]
        special.append((token, token_id))
        if first:  # Llama 3's template: <bos> A, and <bos> A <bos> B for a pair
            single, pair = [f"{token}:0", *single], [f"{token}:0", pair[0], f"{token}:1", pair[1]]
        else:
            single, pair = [*single, f"{token}:0"], [pair[0], f"{token}:0", pair[1], f"{token}:1"]
    if not special:
        return None
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def generation_from_gguf(meta: Mapping[str, Any], vocab_size: int, source: str) -> dict[str, Any] | None:
    """generation_config.json's content: eos ids (eos, then llama.cpp's other end-of-generation ids: eot and
    eom, and the control or user-defined tokens whose text is an end of turn, END_OF_TURN_TEXTS: Llama 3
    ends a turn with <|eot_id|>, Gemma with <end_of_turn>, Qwen with <|im_end|>), bos id, pad id. None when
    the file names no end at all."""
    ids = {key: _optional_id(meta, f"tokenizer.ggml.{key}_token_id", vocab_size, source)
           for key in ("bos", "eos", "eot", "eom", "padding")}
    eos = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    tokens, types = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.token_type") or []
    eos += [i for i, (token, kind) in enumerate(zip(tokens, types))
            if kind in (CONTROL, USER_DEFINED) and token in END_OF_TURN_TEXTS and i < vocab_size]
    if not eos:
        return None
    data = {"bos_token_id": ids["bos"], "eos_token_id": eos, "pad_token_id": ids["padding"]}
    return clean_generation_config(data, vocab_size, source)


def chat_template_from_gguf(meta: Mapping[str, Any], source: str) -> str | None:
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise EdgeGPTError(f"{source}: tokenizer.chat_template must be text, got {type(template).__name__}")
    return template
