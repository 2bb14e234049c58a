"""The Generator: prompt in, text out, with a KV cache, on onnxruntime alone.

    prompt ─► encode ─► prefill(prompt ids, empty past) ─► logits, cache
                        ┌───────────────────────────────────────┘
                        ▼
    next_token(logits) ─► yield token ─► decode_step(token, cache) ─► logits, cache ─► next_token ...
    stops at eos_token_id (not yielded), after max_new_tokens, or when the context (max_length) is full.

How the cache is kept depends on the package's kv_layout (runtime/kv_cache.py): `static` (the fused
graph) preallocates max_length positions and a step writes one in place; `concat` (the plain graph)
feeds the cache in and gets it back grown by the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgegpt.errors import EdgeGPTError
from edgegpt.runtime.detokenizer import StreamDecoder
from edgegpt.runtime.kv_cache import RUNNERS, KVCache
from edgegpt.runtime.package import ModelPackage, ModelSpec
from edgegpt.runtime.sampling import check_sampling, next_token
from edgegpt.runtime.session import cuda_available, create_session

__all__ = ["Generator", "KVCache"]


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
    onnxruntime's session runs are thread-safe, and each call keeps its own cache (for the static
    layout: its own buffers and IO binding), random generator and detokenizer in local variables.
    Calls run concurrently on the session's thread pool. A KVCache itself is one thread's at a time.

    An empty prompt encodes to no tokens, so generation then starts from the end-of-text token
    (generation_config.json's eos_token_id), the way every training document boundary looks to the model.
    """

    def __init__(self, package: ModelPackage, session, provider: str, max_length: int | None = None) -> None:
        self.package = package
        self.config: ModelSpec = package.model
        self.provider = provider  # "cpu" or "cuda": the one actually used
        # Tokens one sequence may hold (prompt + generated); the static cache preallocates this many.
        self.max_length = check_max_length(max_length, self.config.max_len)
        self._session = session
        self._runner = RUNNERS[package.graph.kv_layout](session, package, provider, self.max_length)
        self._check_session_matches_contract()

    @classmethod
    def load(
        cls, path: str | Path, provider: str = "auto", threads: int | None = None, max_length: int | None = None
    ) -> "Generator":
        """Load a package directory; provider "auto" | "cpu" | "cuda"; threads default: physical cores;
        max_length (default: the model's max_len) caps prompt + generated tokens and sizes the cache."""
        package = ModelPackage.load(path)
        check_max_length(max_length, package.model.max_len)
        if package.graph.dtype == "float16":
            # onnxruntime's CPU provider pads float16 graphs with casts and runs them slower than
            # float32, so a float16 package only ever runs on CUDA; never fall back to the CPU quietly.
            if provider == "cpu" or (provider == "auto" and not cuda_available()):
                raise EdgeGPTError(
                    f"{package.path} is a float16 package, which is for CUDA (provider 'cuda'); "
                    "for the CPU export float32 or int8 (`edgegpt export` without --precision fp16)"
                )
            provider = "cuda"
        elif package.graph.kv_layout == "static":
            # onnxruntime's CUDA GroupQueryAttention exists for float16 (and bfloat16) only: a float32
            # or int8 fused graph on CUDA sends attention back to the CPU with the cache copied across
            # every step (on an H200 its greedy text drifted from the CPU's). Such packages are CPU
            # packages; CUDA gets `--precision fp16`.
            if provider == "cuda" and cuda_available():
                raise EdgeGPTError(
                    f"{package.path} is a {package.graph.dtype} package, which runs on the CPU; "
                    "for CUDA export with `edgegpt export --precision fp16`"
                )
            if provider == "auto":
                provider = "cpu"
        session, used = create_session(package.model_path, provider=provider, threads=threads)
        return cls(package, session, used, max_length)

    # -- one forward pass at a time (gpt-fast's prefill / decode_one_token) -------------------------

    def empty_cache(self) -> KVCache:
        """A cache holding no tokens (static layout: fresh buffers of max_length positions)."""
        return self._runner.new_cache()

    def forward(self, token_ids: Sequence[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run token_ids (S >= 1) after the cache: logits [S, vocab] float32 and the cache grown by S.

        The static layout writes into the cache's buffers: see KVCache for what that means for `cache`.
        """
        return self._runner.forward(token_ids, cache)

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len, vocab] float32 for every position of token_ids, from an empty cache
        (1 <= len <= max_length): row t scores the token after token_ids[t]."""
        logits, _ = self.forward(token_ids, self.empty_cache())
        return np.asarray(logits, dtype=np.float32)

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
        if len(ids) > self.max_length:
            larger = ""
            if self.max_length < self.config.max_len:
                larger = f" or load with a larger max_length (up to {self.config.max_len})"
            raise EdgeGPTError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.max_length} tokens; "
                f"shorten the prompt{larger}"
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
            if produced == options.max_new_tokens or cache.length >= self.max_length:
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
        expected_inputs = set(self._runner.input_names)
        problems = [f"input {n!r} missing" for n in sorted(expected_inputs - graph_inputs)]
        problems += [f"unexpected input {n!r}" for n in sorted(graph_inputs - expected_inputs)]
        problems += [f"output {n!r} missing" for n in self._runner.output_names if n not in graph_outputs]
        if problems:
            raise EdgeGPTError(
                f"{self.package.model_path} does not match config.json ({'; '.join(problems[:3])}); "
                "the package is corrupt, re-run `edgegpt export`"
            )


def check_max_length(max_length: int | None, max_len: int) -> int:
    """max_length, or the model's max_len when None; refused outside 1..max_len."""
    if max_length is None:
        return max_len
    if isinstance(max_length, bool) or not isinstance(max_length, Integral) or not 1 <= max_length <= max_len:
        raise EdgeGPTError(f"max_length must be an integer from 1 to the model's context {max_len}, got {max_length!r}")
    return int(max_length)
