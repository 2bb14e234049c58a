"""An imported model's generation settings, as the checkpoint's generation_config.json holds them.

Hugging Face's own field names, so the file converts back unchanged: `eos_token_id` (one id or a list:
an instruct model often ends a turn with a token other than its end-of-text), `bos_token_id`,
`pad_token_id` and the sampling defaults its authors chose. `edgegpt export` reads the sampling keys it
knows; what `do_sample: false` means for them is the reader's business, so it is kept as written.
"""

from __future__ import annotations

from typing import Any, Mapping

from edgegpt.core.errors import EdgeGPTError

TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
INT_KEYS = ("top_k", "max_new_tokens")
NUMBER_KEYS = ("temperature", "top_p", "min_p", "repetition_penalty")
BOOL_KEYS = ("do_sample",)
# Everything else in a Hugging Face generation_config.json (transformers_version, _from_model_config, beam
# search settings) means nothing to edgegpt's runtime and is left behind.
GENERATION_KEYS = (*TOKEN_KEYS, *BOOL_KEYS, *NUMBER_KEYS, *INT_KEYS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_ids(value: Any, key: str, vocab_size: int, source: str) -> list[int]:
    """One id or a list of ids, each a token of the vocabulary; duplicates dropped, order kept."""
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise EdgeGPTError(f"{source}: {key} must be a token id (0 to {vocab_size - 1}) or a list of them, "
                           f"got {value!r:.80}")
    return list(dict.fromkeys(ids))


def clean_generation_config(data: Mapping[str, Any], vocab_size: int, source: str) -> dict[str, Any]:
    """The keys edgegpt keeps (GENERATION_KEYS), each checked; a value of the wrong type names its key.
    An eos list of one id is written as that id (what Hugging Face writes)."""
    if not isinstance(data, Mapping):
        raise EdgeGPTError(f"{source}: expected a JSON object, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key in GENERATION_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if key in TOKEN_KEYS:
            ids = token_ids(value, key, vocab_size, source)
            if key != "eos_token_id" and len(ids) > 1:
                raise EdgeGPTError(f"{source}: {key} must be one token id, got {value!r:.80}")
            out[key] = ids if len(ids) > 1 else ids[0]
        elif key in BOOL_KEYS and not isinstance(value, bool):
            raise EdgeGPTError(f"{source}: {key} must be true or false, got {value!r:.80}")
        elif key in INT_KEYS and not _is_int(value):
            raise EdgeGPTError(f"{source}: {key} must be an integer, got {value!r:.80}")
        elif key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise EdgeGPTError(f"{source}: {key} must be a number, got {value!r:.80}")
        else:
            out[key] = value
    return out


def eos_ids(generation: Mapping[str, Any] | None) -> list[int]:
    """The end-of-sequence ids of a cleaned generation config, as a list (empty when it names none)."""
    value = (generation or {}).get("eos_token_id")
    return [] if value is None else value if isinstance(value, list) else [value]
