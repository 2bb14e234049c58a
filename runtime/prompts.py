"""Prompts as token ids: text and token-id prompts checked against the context, chats rendered and fitted.

    text      ─► encode (only the tail the context could hold is tokenized) ─► ids, or PromptTooLong
                 truncate="left": the last max(1, max_length - max_new_tokens) ids
    token ids ─► checked against the vocabulary and the context the same way
    messages  ─► check_messages ─► (truncate="left": fit_chat drops the oldest turns) ─► the package's chat
                 template (runtime/chat_template.py) ─► encoded without adding special tokens (the template
                 writes them) ─► checked against the context

One Prompts per Generator, shared by every thread that generates on it: it holds nothing per call, and
what it finds once (the longest token's length, the compiled template) is the same whoever finds it.
"""

from __future__ import annotations

from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgegpt.core.errors import EdgeGPTError, PromptTooLong
from edgegpt.core.formats import CHAT_TEMPLATE
from edgegpt.runtime.options import GenerationOptions, resolve_options
from edgegpt.runtime.package import ModelPackage

if TYPE_CHECKING:
    from edgegpt.runtime.chat_template import ChatTemplate


class Prompts:
    """The prompts of one package with a context of `max_length` tokens (vocab_size: ids it reads)."""

    def __init__(self, package: ModelPackage, max_length: int, vocab_size: int) -> None:
        self.package, self.max_length, self.vocab_size = package, max_length, vocab_size
        self._token_chars: int | None = None  # max_token_chars, at the first text prompt
        self._template: ChatTemplate | None = None  # compiled at the first chat

    @property
    def max_token_chars(self) -> int:
        """The most characters one token covers. No token covers more than its vocabulary entry is long
        (byte-level entries count bytes, and a character is at least one byte): max_length tokens hold at
        most max_length times this many. Found at the first text prompt, not at load: listing a large
        vocabulary takes tens of milliseconds, which a caller of token ids never needs."""
        if self._token_chars is None:
            added = [token.content for token in self.package.tokenizer.get_added_tokens_decoder().values()]
            self._token_chars = max(map(len, [*self.package.tokenizer.get_vocab(), *added]), default=1)
        return self._token_chars

    # -- text and token ids -----------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids, checked against the context; "" becomes [eos_token_id] (Generator's class doc)."""
        ids, cut = self._token_ids(prompt, self.max_length * self.max_token_chars)
        if len(ids) > self.max_length or cut:  # cut: longer than max_length tokens could ever cover
            larger = ""
            if self.max_length < self.package.model.max_len:
                larger = f", load with a larger max_length (up to {self.package.model.max_len})"
            raise PromptTooLong(
                f"the prompt is {'over ' if cut else ''}{len(ids):,} tokens but the "
                f"model's context is {self.max_length} tokens; shorten the prompt{larger} or keep its last tokens "
                "with truncate='left' (--truncate left)"
            )
        return ids

    def prompt_ids(self, prompt: str | Sequence[int], options: GenerationOptions) -> list[int]:
        """encode(prompt), or with truncate="left" its last max(1, max_length - max_new_tokens) tokens, so the
        requested tokens fit the context (at least one prompt token is kept; the same rule as `edgegpt chat`).
        A prompt given as token ids is checked against the vocabulary and the context the same way."""
        if isinstance(prompt, (list, tuple)):  # token ids (bytes and other sequences are refused as text)
            return self._checked_ids(prompt, options)
        if options.truncate is None:
            return self.encode(prompt)
        # Twice the characters the context can hold: the cut lands well before the tokens that are kept.
        ids, _ = self._token_ids(prompt, 2 * self.max_length * self.max_token_chars)
        keep = max(1, self.max_length - options.max_new_tokens)
        return ids[-keep:]

    def _checked_ids(self, prompt: Sequence[int], options: GenerationOptions) -> list[int]:
        vocab = self.vocab_size
        in_vocabulary = (isinstance(i, Integral) and not isinstance(i, bool) and 0 <= i < vocab for i in prompt)
        if not prompt or not all(in_vocabulary):
            raise EdgeGPTError(f"a prompt of token ids must be a non-empty list of integers in [0, {vocab}), "
                               f"got {list(prompt)[:8]!r:.80}")
        ids = [int(i) for i in prompt]
        if options.truncate is not None:
            return ids[-max(1, self.max_length - options.max_new_tokens):]
        if len(ids) > self.max_length:
            raise PromptTooLong(f"the prompt is {len(ids):,} tokens but the model's context is {self.max_length} "
                               "tokens; shorten it or keep its last tokens with truncate='left'")
        return ids

    def _token_ids(self, prompt: str, max_chars: int) -> tuple[list[int], bool]:
        """Token ids of the prompt's last `max_chars` characters (all of it when shorter), and whether it was
        cut. A prompt longer than the context can hold is never tokenized whole: tokenizing a paste of many
        megabytes takes many times its size in memory."""
        if not isinstance(prompt, str):
            raise EdgeGPTError(f"prompt must be a string, got {type(prompt).__name__}")
        tail = prompt[-max_chars:] if len(prompt) > max_chars else prompt
        try:
            tail.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: what Python makes of argv bytes that are not UTF-8
            raise EdgeGPTError(f"the prompt is not valid UTF-8 text (character {e.start}: {tail[e.start]!r}); "
                               "pass text decoded as UTF-8") from None
        return self.package.tokenizer.encode(tail).ids or [self.package.generation.eos_token_id], tail is not prompt

    # -- chat -------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text the model reads for `messages` (Generator.render_chat)."""
        return self.template().render(messages, add_generation_prompt)

    def fit_chat(self, messages: Sequence[dict[str, str]], max_new_tokens: int | None = None) -> list[dict[str, str]]:
        """`messages` (checked, as new dicts) with the oldest turns dropped until the rendered prompt
        leaves max_new_tokens (default: the package's) of the context free (Generator.fit_chat)."""
        from edgegpt.runtime.chat_template import check_messages  # jinja2 is imported by chat only

        checked = check_messages(messages)
        new = resolve_options(self.package.generation, {"max_new_tokens": max_new_tokens}).max_new_tokens
        budget = max(1, self.max_length - new)
        system = next((i for i, m in enumerate(checked) if m["role"] != "system"), len(checked))
        starts = [system] + [i for i in range(system + 1, len(checked)) if checked[i]["role"] == "user"]

        def fits(start: int) -> bool:
            ids = self._chat_prompt(checked[:system] + checked[start:])
            return ids is not None and len(ids) <= budget

        if fits(starts[0]) or len(starts) == 1:
            return checked
        # The prompt shrinks as turns are dropped: the first start that fits, by bisection (each try
        # renders and encodes the conversation once).
        low, high = 1, len(starts) - 1
        while low < high:
            middle = (low + high) // 2
            if fits(starts[middle]):
                high = middle
            else:
                low = middle + 1
        return checked[:system] + checked[starts[low]:]

    def chat_ids(self, messages: Sequence[dict[str, str]], options: GenerationOptions) -> list[int]:
        """The prompt ids of a chat: rendered (fitted first with truncate="left"), checked against the context."""
        from edgegpt.runtime.chat_template import check_messages

        checked = check_messages(messages)
        if options.truncate is not None:
            checked = self.fit_chat(checked, options.max_new_tokens)
        ids = self._chat_prompt(checked)
        if ids is not None and 0 < len(ids) <= self.max_length:
            return ids
        if ids is not None and not ids:
            raise EdgeGPTError(f"{self.template().origin} rendered this conversation as no text at all")
        size = f"over {self.max_length:,}" if ids is None else f"{len(ids):,}"
        if options.truncate is not None:
            raise PromptTooLong(f"the conversation's last turn and system messages alone are {size} tokens but the "
                               f"model's context is {self.max_length} tokens; shorten them or load with a larger "
                               "max_length (--max-length)")
        raise PromptTooLong(f"the conversation is {size} tokens but the model's context is {self.max_length} "
                           "tokens; drop its oldest turns with truncate='left' (--truncate left) or load with a "
                           "larger max_length (--max-length)")

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int] | None:
        """Token ids of the rendered conversation, or None when its text is longer than max_length
        tokens could ever cover (never tokenized, as for long prompts)."""
        text = self.template().render(messages, add_generation_prompt=True)
        if len(text) > self.max_length * self.max_token_chars:
            return None
        return self.package.tokenizer.encode(text, add_special_tokens=False).ids

    def template(self) -> ChatTemplate:
        """The package's chat template, compiled once (two threads racing both compile the same one)."""
        from edgegpt.runtime.chat_template import ChatTemplate

        if self._template is None:
            source = self.package.chat_template
            if source is None:
                raise EdgeGPTError(
                    f"{self.package.path} has no chat template ({CHAT_TEMPLATE}), so the model has no chat format: "
                    "continue text with generate(), or add the model's template to the package "
                    "(`edgegpt convert` brings it from a Hugging Face or GGUF model)"
                )
            generation = self.package.generation
            bos = None if generation.bos_token_id is None else self._token_text(generation.bos_token_id)
            self._template = ChatTemplate(source, bos, self._token_text(generation.eos_token_id),
                                          origin=str(Path(self.package.path) / CHAT_TEMPLATE))
        return self._template

    def _token_text(self, token_id: int) -> str:
        """A token as a template writes it: a special token's own text (e.g. "<|im_end|>"), else its decoding."""
        added = self.package.tokenizer.get_added_tokens_decoder().get(token_id)
        return added.content if added is not None else self.package.tokenizer.decode([token_id],
                                                                                     skip_special_tokens=False)
