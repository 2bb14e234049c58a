"""SentencePiece itself, running a BPE model built from nothing but a GGUF file's tokenizer metadata: the
reference that edgegpt's rebuilt tokenizer (gguf_tokenizer.py) is checked against for SentencePiece-style
files (`tokenizer.ggml.model = llama`, as Llama 2 and Gemma 3 ship). The tests and benchmarks/real_model.py
share it; edgegpt itself never tokenizes with it. Needs the sentencepiece package (the [dev] and [bench]
extras), imported only when called.

Not transformers' GGUF tokenizer converter: it reads Gemma 3's BPE pieces as a Unigram model and splits
common words into pieces (docs/models.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# SentencePiece's piece types, which llama.cpp's converter stores as they are in tokenizer.ggml.token_type
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


def sentencepiece_from_metadata(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                                dummy_prefix: bool):
    """A `sentencepiece.SentencePieceProcessor` of the BPE model these pieces, scores and types describe. llama.cpp's
    converter writes a user-defined piece's "▁" as a space (llama.cpp matches those pieces in the raw text;
    SentencePiece after spaces became "▁"): the model gets its own form back."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    proto = sp_model.ModelProto()
    proto.trainer_spec.model_type = sp_model.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = BYTE in types  # byte pieces <0x00>…<0xFF>, which SentencePiece then requires
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token.replace(" ", "▁") if kind == USER_DEFINED else token, score, kind
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def sentencepiece_from_gguf(meta: Mapping[str, Any]):
    """The reference for a GGUF file's metadata (`read_gguf(path)[0]`) of a SentencePiece-style tokenizer."""
    tokens, scores = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.scores"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    if unknown is not None:
        types[int(unknown)] = 2  # llama.cpp's converter marks <unk> as control; SentencePiece needs it unknown
    # llama.cpp's default, and SentencePiece's: a "▁" before the text unless the file says otherwise
    dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
    return sentencepiece_from_metadata(tokens, scores, types, dummy_prefix)
