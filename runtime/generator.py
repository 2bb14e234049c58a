"""The Generator: prompt in, text out, with a KV cache, on onnxruntime alone.

    prompt ─► encode ─► prefill(prompt ids, empty past) ─► logits, cache
                        ┌───────────────────────────────────────┘
                        ▼
    next_token(logits) ─► yield token ─► decode_step(token, cache) ─► logits, cache ─► next_token ...
    stops at eos_token_id (not yielded), after max_new_tokens, or when the context (max_len) is full.

The cache is the package's `concat` layout: past_key.{i} / past_value.{i} are [1, n_kv_heads, length,
head_dim] and the graph returns them grown by the new tokens as present_key.{i} / present_value.{i}.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Iterator

import numpy as np

from edgegpt.errors import EdgeGPTError
from edgegpt.runtime.detokenizer import StreamDecoder
from edgegpt.runtime.package import ModelPackage, ModelSpec
from edgegpt.runtime.sampling import check_sampling, next_token
from edgegpt.runtime.session import create_session, ort_error_detail


@dataclass(frozen=True)
class KVCache:
    """One sequence's cache: past input name -> [1, n_kv_heads, length, head_dim]; `length` tokens seen."""

    tensors: dict[str, np.ndarray]
    length: int


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


class Generator:
    """Text generation from a model package.

    Thread safety: one Generator may serve several threads at once. After `load` nothing on it changes;
    `InferenceSession.run` is thread-safe, and each call keeps its own cache, attention mask, random
    generator and detokenizer in local variables. Calls run concurrently on the session's thread pool.

    An empty prompt encodes to no tokens, so generation then starts from the end-of-text token
    (generation_config.json's eos_token_id), the way every training document boundary looks to the model.
    """

    def __init__(self, package: ModelPackage, session, provider: str) -> None:
        self.package = package
        self.config: ModelSpec = package.model
        self.provider = provider  # "cpu" or "cuda": the one actually used
        self._session = session
        self._cache_dtype = np.dtype(package.graph.dtype)
        self._present_to_past: dict[str, str] = {}
        for layer in range(self.config.n_layers):
            for present, past in zip(package.graph.present_names(layer), package.graph.past_names(layer)):
                self._present_to_past[present] = past
        self._output_names = ["logits", *self._present_to_past]
        self._check_session_matches_contract()

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", threads: int | None = None) -> "Generator":
        """Load a package directory; provider "auto" | "cpu" | "cuda"; threads default: physical cores."""
        package = ModelPackage.load(path)
        session, used = create_session(package.model_path, provider=provider, threads=threads)
        return cls(package, session, used)

    # -- one forward pass at a time (gpt-fast's prefill / decode_one_token) -------------------------

    def empty_cache(self) -> KVCache:
        shape = (1, self.config.n_kv_heads, 0, self.config.head_dim)
        return KVCache({name: np.zeros(shape, self._cache_dtype) for name in self._present_to_past.values()}, 0)

    def forward(self, token_ids: list[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run token_ids (S >= 1) after the cache: logits [S, vocab] and the cache grown by S."""
        total = cache.length + len(token_ids)
        feeds = {
            "input_ids": np.asarray([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **cache.tensors,
        }
        try:
            logits, *presents = self._session.run(self._output_names, feeds)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise EdgeGPTError(
                f"{self.package.model_path} failed to run ({ort_error_detail(e)}); "
                "the package is inconsistent, re-run `edgegpt export`"
            ) from None
        new_cache = KVCache(dict(zip(self._present_to_past.values(), presents)), total)
        return logits[0], new_cache

    def prefill(self, prompt_ids: list[int]) -> tuple[np.ndarray, KVCache]:
        """The whole prompt with an empty past: logits [vocab] for the next token, and the cache."""
        logits, cache = self.forward(prompt_ids, self.empty_cache())
        return logits[-1], cache

    def decode_step(self, token: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One token after the cache: logits [vocab] for the token after it, and the cache grown by 1."""
        logits, cache = self.forward([token], cache)
        return logits[-1], cache

    # -- generation ---------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids, checked against the context; "" becomes [eos_token_id] (see class doc)."""
        if not isinstance(prompt, str):
            raise EdgeGPTError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.package.tokenizer.encode(prompt).ids or [self.package.generation.eos_token_id]
        if len(ids) > self.config.max_len:
            raise EdgeGPTError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.config.max_len} tokens; "
                "shorten the prompt"
            )
        return ids

    def stream_tokens(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """New token ids, one at a time (eos not included). None: the package's generation defaults.

        Arguments and prompt length are checked now, before the first token is asked for.
        """
        options = self._options(max_new_tokens, temperature, top_k, top_p, seed)
        return self._tokens(self.encode(prompt), options)

    def generate_ids(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """All new token ids (eos not included). Arguments as `stream_tokens`."""
        return list(self.stream_tokens(prompt, max_new_tokens, temperature, top_k, top_p, seed))

    def stream(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are ready, never half a UTF-8 character. Arguments as `stream_tokens`."""
        return self._pieces(self.stream_tokens(prompt, max_new_tokens, temperature, top_k, top_p, seed))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """The generated text, without the prompt: "".join(stream(...)). Arguments as `stream_tokens`."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed))

    def _tokens(self, prompt_ids: list[int], options: SamplingOptions) -> Iterator[int]:
        rng = np.random.default_rng(options.seed)
        eos = self.package.generation.eos_token_id
        if options.max_new_tokens == 0:
            return
        logits, cache = self.prefill(prompt_ids)
        for produced in range(1, options.max_new_tokens + 1):
            token = next_token(self._checked(logits), rng, options.temperature, options.top_k, options.top_p)
            if token == eos:
                return
            yield token
            # Feeding this token would need one more position than the context has: stop here.
            if produced == options.max_new_tokens or cache.length >= self.config.max_len:
                return
            logits, cache = self.decode_step(token, cache)

    def _pieces(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self.package.tokenizer)
        for token in tokens:
            if piece := decoder.push(token):
                yield piece
        if tail := decoder.flush():
            yield tail

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        """Only ids the tokenizer can decode (a model's vocab may be padded past the tokenizer's)."""
        logits = logits[: self.package.tokenizer.get_vocab_size()]
        if not np.isfinite(logits).all():
            raise EdgeGPTError(
                f"{self.package.model_path} produced non-finite logits; the package is corrupt, re-run `edgegpt export`"
            )
        return logits

    def _options(self, max_new_tokens, temperature, top_k, top_p, seed) -> SamplingOptions:
        defaults = self.package.generation
        options = SamplingOptions(
            max_new_tokens=defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            seed=seed,
        )
        n = options.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
            raise EdgeGPTError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0):
            raise EdgeGPTError(f"seed must be an integer >= 0, got {seed!r}")
        check_sampling(options.temperature, options.top_k, options.top_p)
        return options

    def _check_session_matches_contract(self) -> None:
        """model.onnx must take exactly the inputs config.json declares, and give the outputs we read."""
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        expected_inputs = {"input_ids", "attention_mask", *self._present_to_past.values()}
        problems = [f"input {n!r} missing" for n in sorted(expected_inputs - graph_inputs)]
        problems += [f"unexpected input {n!r}" for n in sorted(graph_inputs - expected_inputs)]
        problems += [f"output {n!r} missing" for n in self._output_names if n not in graph_outputs]
        if problems:
            raise EdgeGPTError(
                f"{self.package.model_path} does not match config.json ({'; '.join(problems[:3])}); "
                "the package is corrupt, re-run `edgegpt export`"
            )
