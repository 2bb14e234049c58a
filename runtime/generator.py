"""The Generator: prompt in, text out, with a KV cache, on onnxruntime alone.

    prompt ─► encode ─► prefill(prompt ids, empty past) ─► logits, cache
                        ┌───────────────────────────────────────┘
                        ▼
    Sampler.choose(logits) ─► yield token ─► decode_step(token, cache) ─► logits, cache ─► choose ...
    stops at eos_token_id (not yielded; stop_at_eos=False to go on), after max_new_tokens, when the
    context (max_length) is full, at a stop string (text level), or when `cancel` is set.

How the cache is kept depends on the package's kv_layout (runtime/kv_cache.py): `static` (the fused
graph) preallocates max_length positions and a step writes one in place; `concat` (the plain graph)
feeds the cache in and gets it back grown by the new tokens.
"""

from __future__ import annotations

from numbers import Integral
from pathlib import Path
from typing import Iterator, Protocol, Sequence, Unpack

import numpy as np

from edgegpt.errors import EdgeGPTError
from edgegpt.runtime.batch import Row, generate_rows
from edgegpt.runtime.detokenizer import TextStream
from edgegpt.runtime.kv_cache import RUNNERS, KVCache, StaticRunner
from edgegpt.runtime.options import GenerateOptions, GenerationOptions, resolve_options
from edgegpt.runtime.package import ModelPackage, ModelSpec
from edgegpt.runtime.sampling import Sampler
from edgegpt.runtime.session import PROVIDERS, cuda_available, create_session

__all__ = ["Generator", "GenerateOptions", "KVCache"]


class Cancel(Protocol):
    """What `cancel=` takes: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


def cancelled(cancel: Cancel | None) -> bool:
    return cancel is not None and cancel.is_set()


class Generator:
    """Text generation from a model package.

        g = Generator.load("edgegpt-out/model", provider="auto", threads=None, max_length=None)
        g.generate(prompt, **options) -> str          g.stream(prompt, cancel=event, **options) -> pieces
        g.generate_batch(prompts, **options) -> [str] g.generate_ids / stream_tokens -> token ids
        options (GenerateOptions): max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        seed, stop, stop_at_eos; None means the package's generation_config.json.

    Thread safety: one Generator may serve several threads at once.
      shared, read-only after `load`: the onnxruntime session (its run() is thread-safe), the package
        (config, tokenizer — tokenizers' decode/encode are thread-safe), provider and max_length;
      per call, in the call's own local variables: the KV cache (for the static layout its buffers and
        IO binding), the Sampler (random generator, seen ids), the detokenizer and stop-string state.
    So seeded calls give the same text whether they run alone or from 8 threads at once. Calls share the
    session's intra-op thread pool, so concurrent calls run side by side but not faster in total. A
    KVCache from prefill/decode_step belongs to one thread at a time.

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
        if provider not in PROVIDERS:  # before the package's dtype picks one for "auto"
            raise EdgeGPTError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
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
        self, prompt: str, *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[int]:
        """New token ids, one at a time (eos not included unless stop_at_eos=False). Options: GenerateOptions
        (None: the package's generation_config.json); `stop` is refused here: stop strings are text.

        Options and prompt length are checked now, before the first token is asked for.
        """
        resolved = self._resolve(options)
        if resolved.stop:
            raise EdgeGPTError("stop strings apply to text: use generate() or stream(), not the token-id methods")
        return self._tokens(self.encode(prompt), resolved, cancel)

    def generate_ids(
        self, prompt: str, *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> list[int]:
        """All new token ids. Options as `stream_tokens`."""
        return list(self.stream_tokens(prompt, cancel=cancel, **options))

    def stream(
        self, prompt: str, *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[str]:
        """Text pieces as they are ready: never half a UTF-8 character, never any part of a stop string
        (text that could begin one is held back until it is clear). Options: GenerateOptions.

        Cancelling: set `cancel` (a threading.Event, or anything with is_set()) from any thread; the
        stream ends before the next forward pass, so at most the step in flight still yields, and the
        cache is released when it ends. From the consuming thread, `close()` on the iterator does the same.
        """
        resolved = self._resolve(options)
        return self._pieces(self._tokens(self.encode(prompt), resolved, cancel), resolved.stop)

    def generate(
        self, prompt: str, *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> str:
        """The generated text, without the prompt: "".join(stream(...)). Options as `stream`."""
        return "".join(self.stream(prompt, cancel=cancel, **options))

    def generate_batch(self, prompts: Sequence[str], **options: Unpack[GenerateOptions]) -> list[str]:
        """One text per prompt, equal to [generate(p, **options) for p in prompts].

        Seeds: `seed` may also be a list with one seed per prompt. An int seed is every row's seed, so each
        row is exactly its one-by-one generation with that seed (two equal prompts give equal texts).
        The fused graph on the CPU runs the rows as one batch per decode step (runtime/batch.py); other
        layouts and CUDA run the rows one after another.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise EdgeGPTError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        seeds = options.pop("seed", None)
        if isinstance(seeds, (list, tuple)):
            if len(seeds) != len(prompts):
                raise EdgeGPTError(f"seed has {len(seeds)} values for {len(prompts)} prompts")
        else:
            seeds = [seeds] * len(prompts)
        per_row = [self._resolve({**options, "seed": seed}) for seed in seeds]
        ids = [self.encode(prompt) for prompt in prompts]
        if not prompts:
            return []
        if not isinstance(self._runner, StaticRunner) or self.provider != "cpu":
            return ["".join(self._pieces(self._tokens(i, o, None), o.stop)) for i, o in zip(ids, per_row)]
        rows = [Row(i, o, self.package, self.max_length) for i, o in zip(ids, per_row)]
        generate_rows(self._runner, rows, ids, self._checked)
        return [row.result() for row in rows]

    def _tokens(self, prompt_ids: list[int], options: GenerationOptions, cancel: Cancel | None) -> Iterator[int]:
        """The decode loop (the stopping rules mirror runtime/batch.py's Row.accept)."""
        if options.max_new_tokens == 0 or cancelled(cancel):
            return
        sampler = Sampler(options.sampling, options.seed, prompt_ids, self.package.tokenizer.get_vocab_size())
        eos = self.package.generation.eos_token_id
        logits, cache = self.prefill(prompt_ids)
        for produced in range(1, options.max_new_tokens + 1):
            token = sampler.choose(self._checked(logits))
            if token == eos and options.stop_at_eos:
                return
            yield token
            # Feeding this token would need one more position than the context has: stop here.
            if produced == options.max_new_tokens or cache.length >= self.max_length or cancelled(cancel):
                return
            logits, cache = self.decode_step(token, cache)

    def _pieces(self, tokens: Iterator[int], stop: tuple[str, ...]) -> Iterator[str]:
        text = TextStream(self.package.tokenizer, stop)
        try:
            for token in tokens:
                if piece := text.push(token):
                    yield piece
                if text.stopped:
                    return
            if tail := text.flush():
                yield tail
        finally:
            tokens.close()  # ends the decode loop now, releasing its cache, whoever stops iterating

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab], refused when not finite (the sampler drops ids the tokenizer cannot decode)."""
        if not np.isfinite(logits).all():
            raise EdgeGPTError(
                f"{self.package.model_path} produced non-finite logits; the package is corrupt, re-run `edgegpt export`"
            )
        return logits

    def _resolve(self, options) -> GenerationOptions:
        return resolve_options(self.package.generation, options)

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
