"""Generation options: the keyword arguments of Generator.generate / stream / generate_batch, checked
once and resolved against the package's generation_config.json.

    generate(prompt, max_new_tokens=64, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=1)
                      └──────────── GenerateOptions (TypedDict: what an IDE completes) ────────────┘
                                     ─► resolve_options(defaults, kwargs) ─► GenerationOptions

Keyword arguments rather than one options object, because that is how Hugging Face and llama.cpp's
Python bindings take them; one TypedDict declares them once for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Mapping, Sequence, TypedDict

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.sampling import SamplingParams, check_sampling


class GenerateOptions(TypedDict, total=False):
    """Every option; None (or leaving it out) means the package's generation_config.json default."""

    max_new_tokens: int | None  # at most this many new tokens (the context may end generation first)
    temperature: float | None  # 0 = greedy
    top_k: int | None  # 0 = off
    top_p: float | None  # 1.0 = off
    min_p: float | None  # 0 = off
    repetition_penalty: float | None  # 1.0 = off
    presence_penalty: float | None  # 0 = off; OpenAI's, in [-2, 2] (runtime/sampling.py)
    frequency_penalty: float | None  # 0 = off; OpenAI's, in [-2, 2]
    seed: int | None  # same seed, same text; None: fresh randomness
    stop: str | Sequence[str] | None  # text generation ends before the first of these; never included
    stop_at_eos: bool  # False: the end-of-text token does not end generation (benchmarks: exactly N tokens)
    truncate: str | None  # None: a prompt longer than the context is an error; "left": keep its last tokens
    speculate: bool  # False: no guessing ahead, even with a draft loaded or lookup on (runtime/speculative.py)
    lookup: bool  # True: guess from the text so far (prompt lookup); with a draft, lookup goes first


OPTION_NAMES = tuple(GenerateOptions.__annotations__)


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    stop_at_eos: bool
    truncate: str | None = None
    speculate: bool = True
    lookup: bool = False


def resolve_options(defaults, options: Mapping[str, Any]) -> GenerationOptions:
    """Check `options` (GenerateOptions keys) and fill the Nones from `defaults` (GenerationDefaults).
    Raises EdgeGPTError naming the first bad option."""
    unknown = [name for name in options if name not in OPTION_NAMES]
    if unknown:
        raise EdgeGPTError(f"unknown generation option {unknown[0]!r}; the options are {', '.join(OPTION_NAMES)}")

    def pick(name: str):
        value = options.get(name)
        return getattr(defaults, name) if value is None else value

    # generation_config.json has no presence or frequency penalty (Hugging Face has none): off unless asked.
    occurrence = [0.0 if options.get(name) is None else options[name] for name in ("presence_penalty",
                                                                                    "frequency_penalty")]
    sampling = SamplingParams(
        pick("temperature"), pick("top_k"), pick("top_p"), pick("min_p"), pick("repetition_penalty"), *occurrence
    )
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.repetition_penalty,
                   sampling.presence_penalty, sampling.frequency_penalty)
    max_new_tokens = pick("max_new_tokens")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise EdgeGPTError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    seed = options.get("seed")
    check_seed(seed)
    stop_at_eos = options.get("stop_at_eos", True)
    if not isinstance(stop_at_eos, bool):
        raise EdgeGPTError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")
    truncate = options.get("truncate")
    if truncate is not None and not (isinstance(truncate, str) and truncate == "left"):
        raise EdgeGPTError(f"truncate must be None (a too-long prompt is an error) or 'left', got {truncate!r:.80}")
    switches = {}
    for name, default in (("speculate", True), ("lookup", False)):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise EdgeGPTError(f"{name} must be True or False, got {value!r:.40}")
        switches[name] = default if value is None else value
    return GenerationOptions(
        int(max_new_tokens), sampling, seed, check_stop(options.get("stop")), stop_at_eos, truncate, **switches
    )


def is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, Integral)


def check_seed(seed) -> None:
    if seed is not None and (not is_int(seed) or seed < 0):
        raise EdgeGPTError(f"seed must be an integer >= 0, got {seed!r}")


def check_stop(stop) -> tuple[str, ...]:
    """A string or a sequence of non-empty strings -> a tuple (None: no stop strings)."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise EdgeGPTError(f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
    return tuple(stops)
