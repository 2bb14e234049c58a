"""The Generator: prompt in, text out, with a KV cache, on onnxruntime alone.

    prompt ─► encode ─► prefill(prompt ids, empty past) ─► logits, cache
                        ┌───────────────────────────────────────┘
                        ▼
    Sampler.choose(logits) ─► Decoding.accept ─► yield token ─► decode_step(token, cache) ─► choose ...

The loop and its stop rules (eos, max_new_tokens, a full context, stop strings, cancel) are
runtime/decoding.py's, shared with batch rows, the PyTorch reference and the gates; the Stream that
stream() / stream_tokens() return (runtime/stream.py) says why it ended, as its finish_reason.

The Generator is the public API and the wiring; each part lives in the module named for it:
    runtime/prompts.py      text and token-id prompts checked against the context; chats rendered and fitted
    runtime/session.py      the execution provider ("auto" | "cpu" | "cuda") a package runs on, threads
    runtime/kv_cache.py     the KV cache and one forward pass, per package layout
    runtime/batch.py        generate_batch's rows decoded together (also the continuous batcher's)
    runtime/speculative.py  guessing ahead with a draft model or prompt lookup

Chat: chat() / stream_chat() render a list of messages with the package's chat template
(runtime/chat_template.py, the way Hugging Face renders it), encode the text without adding special
tokens (the template writes them) and run the same loop, which ends at any of the package's eos ids.

How the cache is kept depends on the package's kv_layout (runtime/kv_cache.py): `static` (the fused
graph) keeps a buffer that grows by doubling with the tokens it holds (at most max_length) and a step
writes one position in place; `concat` (the plain graph) feeds the cache in and gets it back grown by
the new tokens.
"""

from __future__ import annotations

import typing
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import TOKENIZER
from edgegpt.runtime.batch import Row, batches, decode_rows
from edgegpt.runtime.decoding import FINISH_REASONS, Cancel, Decoding
from edgegpt.runtime.detokenizer import TextStream
from edgegpt.runtime.kv_cache import RUNNERS, KVCache, check_contract
from edgegpt.runtime.options import GenerateOptions, GenerationOptions, resolve_options
from edgegpt.runtime.package import ModelPackage, ModelSpec
from edgegpt.runtime.prompts import Prompts
from edgegpt.runtime.sampling import Sampler
from edgegpt.runtime.session import check_provider, open_session
from edgegpt.runtime.speculative import Drafters, LookupDrafter, ModelDrafter, SpeculationStats, run_speculative
from edgegpt.runtime.stream import Stream

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; annotations are never evaluated at run time here
    from tokenizers import Tokenizer
    from typing_extensions import Unpack


__all__ = ["FINISH_REASONS", "Cancel", "Generator", "GenerateOptions", "KVCache", "Stream"]


class Generator:
    """Text generation from a model package.

        g = Generator.load("edgegpt-out/model", provider="auto", threads=None, max_length=None)
        g.generate(prompt, **options) -> str          g.stream(prompt, cancel=event, **options) -> Stream of pieces
        g.generate_batch(prompts, **options) -> [str] g.generate_ids -> [ids]; stream_tokens -> Stream of ids
        g.chat(messages, **options) -> str            g.stream_chat(messages, cancel=event, **options) -> Stream
        options (GenerateOptions): max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop, stop_at_eos, truncate, speculate, lookup; None means
        the package's generation_config.json.
        A Stream's finish_reason says why it ended: "eos", "stop", "length", "max_length" or "cancelled".

    Chat: messages are [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...], rendered by
    the package's chat_template.jinja with the assistant's turn opened (render_chat shows the text). A
    package without a chat template has no chat format (a base model was trained on plain text), so
    chat() says so rather than guess one: continue text with generate(), or give the package the model's
    template. With truncate="left", chat drops the oldest turns (never the leading system messages nor
    the last turn) until the prompt leaves max_new_tokens of the context free (fit_chat).

    Memory: the static cache starts small and doubles with what the sequence holds, so max_length only
    caps a sequence (and what its cache may grow to); it is not allocated up front.

    Context: a prompt longer than max_length is an EdgeGPTError, unless truncate="left", which keeps its
    last max(1, max_length - max_new_tokens) tokens so the requested tokens fit. Generation otherwise
    stops at max_length tokens in all (finish_reason "max_length"): the last token is sampled from a full
    context and never fed.

    Thread safety: one Generator may serve several threads at once.
      shared, read-only after `load`: the onnxruntime session (its run() is thread-safe), the package
        (config, tokenizer — tokenizers' decode/encode are thread-safe), provider and max_length, and
        the chat template once compiled (at the first chat; each render has its own state);
      per call, in the call's own local variables: the KV cache (for the static layout its buffers and
        IO binding), the Sampler (random generator, seen ids), the detokenizer and stop-string state.
    So seeded calls give the same text whether they run alone or from 8 threads at once. Calls share the
    session's intra-op thread pool, so concurrent calls run side by side but not faster in total. A
    KVCache from prefill/decode_step belongs to one thread at a time.

    An empty prompt encodes to no tokens, so generation then starts from the end-of-text token
    (generation_config.json's eos_token_id), the way every training document boundary looks to the model.
    """

    def __init__(self, package: ModelPackage, session, provider: str, max_length: int | None = None,
                 draft: Generator | None = None) -> None:
        self.package = package
        self.draft = draft  # a smaller model with the same tokenizer that guesses ahead (runtime/speculative.py)
        self.config: ModelSpec = package.model
        self.provider = provider  # "cpu" or "cuda": the one actually used
        # Tokens one sequence may hold (prompt + generated): what a sequence's cache may grow to.
        self.max_length = check_max_length(max_length, self.config.max_len)
        self._runner = RUNNERS[package.graph.kv_layout](session, package, provider, self.max_length)
        # Asked once: tokenizers builds it anew at each call (slow for a large vocabulary), and
        # every generation's sampler needs it.
        self._vocab_size = package.tokenizer.get_vocab_size()
        self._prompts = Prompts(package, self.max_length, self._vocab_size)
        check_contract(session, self._runner)

    @classmethod
    def load(
        cls, path: str | Path, provider: str = "auto", threads: int | None = None, max_length: int | None = None,
        draft: str | Path | None = "auto",
    ) -> "Generator":
        """Load a package directory; provider "auto" | "cpu" | "cuda"; threads default: physical cores;
        max_length (default: the model's max_len) caps prompt + generated tokens, and so what a
        sequence's cache may grow to (it starts small: runtime/kv_cache.py). draft: a draft model package
        for speculative decoding; "auto" takes the package's own (`edgegpt export --draft`), None none."""
        target = cls._load(path, provider, threads, max_length)
        path_of_draft = target.package.draft_path if draft == "auto" else draft
        if path_of_draft is not None:
            target.draft = target._load_draft(Path(path_of_draft), threads)
        return target

    def _load_draft(self, path: Path, threads: int | None) -> "Generator":
        """The draft package, on this Generator's provider, refused unless it reads the same tokens. A
        draft made by `edgegpt export --draft` has the target's very tokenizer.json: reused, not re-read."""
        mine, theirs = self.package.path / TOKENIZER, path / TOKENIZER
        same_file = theirs.is_file() and theirs.read_bytes() == mine.read_bytes()
        draft = Generator._load(path, self.provider, threads, None, self.package.tokenizer if same_file else None)
        if not same_file and draft.package.tokenizer.get_vocab() != self.package.tokenizer.get_vocab():
            raise EdgeGPTError(f"the draft {path} has another tokenizer than {self.package.path} "
                               f"({draft._vocab_size} vs {self._vocab_size} tokens); a draft must be distilled from "
                               "this model (`edgegpt train --teacher`), which gives it the same tokenizer")
        return draft

    @classmethod
    def _load(cls, path: str | Path, provider: str, threads: int | None, max_length: int | None,
              tokenizer: Tokenizer | None = None, prepack: bool = True) -> "Generator":
        check_provider(provider)  # before the package is read
        package = ModelPackage.load(path, tokenizer)
        check_max_length(max_length, package.model.max_len)
        session, used = open_session(package, provider, threads, prepack)
        return cls(package, session, used, max_length)

    # -- one forward pass at a time (gpt-fast's prefill / decode_one_token) -------------------------

    def empty_cache(self, capacity: int | None = None) -> KVCache:
        """A cache holding no tokens. Static layout: fresh buffers of `capacity` positions (default 256,
        at most max_length), which forward() grows by doubling when the tokens need more; give the
        capacity you expect to avoid the copies of growing."""
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, Integral) or capacity < 1):
            raise EdgeGPTError(f"a cache's capacity must be a positive number of positions, got {capacity!r}")
        return self._runner.new_cache(None if capacity is None else int(capacity))

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

    def steps(self, prompt_ids: Sequence[int]) -> tuple[Callable[[], np.ndarray], Callable[[int], np.ndarray]]:
        """prefill() and feed(token) over one fresh cache: the logits [vocab] after the prompt, then after
        each token fed; what runtime/decoding.py's loop drives (Decoding.run, greedy)."""
        cache: KVCache | None = None

        def prefill() -> np.ndarray:
            nonlocal cache
            logits, cache = self.prefill(list(prompt_ids))
            return logits

        def feed(token: int) -> np.ndarray:
            nonlocal cache
            logits, cache = self.decode_step(token, cache)
            return logits

        return prefill, feed

    # -- generation ---------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids, checked against the context; "" becomes [eos_token_id] (see class doc)."""
        return self._prompts.encode(prompt)

    def stream_tokens(
        self, prompt: str | Sequence[int], *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> Stream[int]:
        """New token ids, one at a time (eos not included unless stop_at_eos=False). The prompt is text or
        token ids. Options: GenerateOptions (None: the package's generation_config.json); `stop` is refused
        here: stop strings are text.

        Options and prompt length are checked now, before the first token is asked for. The Stream's
        finish_reason says why it ended.
        """
        resolved = self._resolve(options)
        if resolved.stop:
            raise EdgeGPTError("stop strings apply to text: use generate() or stream(), not the token-id methods")
        prompt_ids = self._prompts.prompt_ids(prompt, resolved)
        decoding = self._decoding(prompt_ids, resolved, cancel)
        stats = self._speculation(resolved)
        return Stream(self._tokens(prompt_ids, resolved, decoding, stats), len(prompt_ids), decoding, stats)

    def generate_ids(
        self, prompt: str | Sequence[int], *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> list[int]:
        """All new token ids. Options as `stream_tokens`."""
        return list(self.stream_tokens(prompt, cancel=cancel, **options))

    def stream(
        self, prompt: str, *, cancel: Cancel | None = None, **options: Unpack[GenerateOptions]
    ) -> Stream[str]:
        """Text pieces as they are ready: never half a UTF-8 character, never any part of a stop string
        (text that could begin one is held back until it is clear). Options: GenerateOptions.

        Cancelling: set `cancel` (a threading.Event, or anything with is_set()) from any thread; the
        stream ends before the next forward pass, so at most the step in flight still yields, and the
        cache is released when it ends. From the consuming thread, `close()` on the iterator does the same.
        When it has ended, its finish_reason says why (Stream).
        """
        resolved = self._resolve(options)
        return self._text_stream(self._prompts.prompt_ids(prompt, resolved), resolved, cancel)

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
        layouts and CUDA run the rows one after another, and so does a generation that guesses ahead (a
        draft loaded or lookup=True, and speculate not False): each row then speculates as generate() does.
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
        ids = [self._prompts.prompt_ids(prompt, row) for prompt, row in zip(prompts, per_row)]
        if not prompts:
            return []
        # Every row has the same options but the seed, so the first row says whether they all guess ahead.
        if not batches(self._runner, self.provider) or self._speculation(per_row[0]) is not None:
            return ["".join(self._text_stream(i, o, None)) for i, o in zip(ids, per_row)]
        rows = [Row(i, o, self._decoding(i, o, None, text=True), self._vocab_size) for i, o in zip(ids, per_row)]
        decode_rows(self._runner, rows, self._checked)
        return [row.text() for row in rows]

    # -- chat -------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict[str, str]], *, cancel: Cancel | None = None,
             **options: Unpack[GenerateOptions]) -> str:
        """The assistant's reply to `messages`: "".join(stream_chat(...)). Options as `stream_chat`."""
        return "".join(self.stream_chat(messages, cancel=cancel, **options))

    def stream_chat(self, messages: Sequence[dict[str, str]], *, cancel: Cancel | None = None,
                    **options: Unpack[GenerateOptions]) -> Stream[str]:
        """The assistant's reply to `messages` ([{"role": str, "content": str}, ...]) as text pieces, the
        way stream() gives them (same options, cancel and finish_reason). The messages are rendered by
        the package's chat template with the assistant's turn opened, and the reply ends at any of the
        package's end-of-text ids (finish_reason "eos"). truncate="left" drops the oldest turns to fit
        (fit_chat); None: a conversation longer than the context is an error.

        Raises EdgeGPTError now, before the first token, for bad messages or options, a package without
        a chat template, a template that fails (runtime/chat_template.py), or a conversation too long.
        """
        resolved = self._resolve(options)
        return self._text_stream(self._prompts.chat_ids(messages, resolved), resolved, cancel)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text the model reads for `messages`: the package's chat template rendered the way Hugging
        Face's apply_chat_template(tokenize=False) renders it (add_generation_prompt: open the
        assistant's turn). It is encoded without adding special tokens: the template writes them."""
        return self._prompts.render_chat(messages, add_generation_prompt)

    def fit_chat(self, messages: Sequence[dict[str, str]], max_new_tokens: int | None = None) -> list[dict[str, str]]:
        """`messages` (checked, as new dicts) with the oldest turns dropped until the rendered prompt
        leaves max_new_tokens (default: the package's) of the context free. A turn starts at a user
        message, so a template that wants user and assistant to alternate still gets them in order; the
        leading system messages and the last turn are always kept, even when they alone leave less room.
        """
        return self._prompts.fit_chat(messages, max_new_tokens)

    def _decoding(self, prompt_ids: list[int], options: GenerationOptions, cancel: Cancel | None,
                  text: bool = False) -> Decoding:
        """The stop rules of one generation (runtime/decoding.py); text: detokenize, with stop strings."""
        return Decoding(
            len(prompt_ids), options.max_new_tokens, self.max_length, self.package.generation.eos_token_ids,
            options.stop_at_eos, TextStream(self.package.tokenizer, options.stop) if text else None, cancel,
        )

    def _speculation(self, options: GenerationOptions) -> SpeculationStats | None:
        """Stats to fill when this generation guesses ahead (a draft loaded or lookup asked for), else None."""
        return SpeculationStats() if options.speculate and (self.draft is not None or options.lookup) else None

    def _tokens(
        self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding,
        speculation: SpeculationStats | None = None,
    ) -> typing.Generator[int, None, str]:
        """The one decode loop (Decoding.run, or with `speculation` its guessing form) on this Generator's
        session; returns the finish reason."""
        sampler = Sampler(options.sampling, options.seed, prompt_ids, self._vocab_size)
        if speculation is None:
            prefill, feed = self.steps(prompt_ids)
            return (yield from decoding.run(lambda: self._checked(prefill()),
                                            lambda token: self._checked(feed(token)), sampler.choose))
        drafters = [LookupDrafter()] if options.lookup else []
        if self.draft is not None:
            drafters.append(ModelDrafter(self.draft, options.seed))
        cache = self.empty_cache()

        def forward(tokens: list[int]) -> np.ndarray:
            nonlocal cache
            logits, cache = self.forward(tokens, cache)
            return self._checked(logits)

        def truncate(length: int) -> None:
            nonlocal cache
            cache = cache.truncated(length)

        return (yield from run_speculative(decoding, prompt_ids, forward, truncate, sampler, Drafters(drafters),
                                           self.max_length, speculation, room=lambda: cache.speculative_room()))

    def _text_stream(self, prompt_ids: list[int], options: GenerationOptions, cancel: Cancel | None) -> Stream[str]:
        decoding = self._decoding(prompt_ids, options, cancel, text=True)
        stats = self._speculation(options)
        return Stream(self._pieces(prompt_ids, options, decoding, stats), len(prompt_ids), decoding, stats)

    def _pieces(
        self, prompt_ids: list[int], options: GenerationOptions, decoding: Decoding,
        speculation: SpeculationStats | None = None,
    ) -> typing.Generator[str, None, str]:
        """Text pieces of the decode loop, stop strings held back; returns the finish reason."""
        tokens = self._tokens(prompt_ids, options, decoding, speculation)
        try:
            for _ in tokens:
                if piece := decoding.take_text():
                    yield piece
            if tail := decoding.take_text():
                yield tail
            return decoding.finish_reason
        finally:
            tokens.close()  # ends the decode loop now, releasing its cache, whoever stops iterating

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab], refused when not finite. The sampler has an answer for any logits (runtime/sampling.py),
        but a model of ours never computes NaN or infinity: it says the package is damaged, so say that."""
        if not np.isfinite(logits).all():
            kind = "NaN" if np.isnan(logits).any() else "infinite"
            raise EdgeGPTError(
                f"the model produced {kind} logits ({self.package.model_path}); the package is corrupt, "
                "re-run `edgegpt export`"
            )
        return logits

    def _resolve(self, options) -> GenerationOptions:
        return resolve_options(self.package.generation, options)


def check_max_length(max_length: int | None, max_len: int) -> int:
    """max_length, or the model's max_len when None; refused outside 1..max_len."""
    if max_length is None:
        return max_len
    if isinstance(max_length, bool) or not isinstance(max_length, Integral) or not 1 <= max_length <= max_len:
        raise EdgeGPTError(f"max_length must be an integer from 1 to the model's context {max_len}, got {max_length!r}")
    return int(max_length)
