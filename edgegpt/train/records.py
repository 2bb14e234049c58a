"""JSONL records as token ids, with the tokens to train on marked: chat conversations rendered by the
checkpoint's chat template, and prompt/completion pairs (edgegpt/train/examples.py says what each is).

    file ─► read_records (line, record) ─► render_chat: text + the assistant's character spans ─┐
                                         └► raw text: start, prompt, completion, end-of-text ───┴► (ids, trained)

How the assistant's tokens are found: the conversation up to each assistant message is rendered with the
assistant's turn opened (add_generation_prompt), then through that message; the characters between the
two, less the whitespace after the turn's end marker, are the assistant's, and a token is trained when it
covers any of them (what transformers' return_assistant_tokens_mask does with a template's
{% generation %} marks; tests/test_chat_masks.py checks the two agree on ChatML, Llama 3 and Gemma
templates). Rendering the runtime's way rather than reading {% generation %} marks works for every
template, marked or not (few published ones are). A template that renders a conversation's opening
differently on its own than within the whole cannot be read this way, and says so.

Every bad record is one EdgeGPTError naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from edgegpt.checkpoint import read_chat_template, read_generation_config
from edgegpt.convert.generation import clean_generation_config, eos_ids
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, GENERATION_CONFIG, TOKENIZER
from edgegpt.runtime.chat_template import ChatTemplate, check_messages
from edgegpt.tokenizer import end_of_text_id, load_tokenizer
from edgegpt.train.corpus import is_example_data, read_text_file

# Texts handed to tokenizers' encode_batch at once (it encodes them in parallel).
ENCODE_BATCH = 512
Example = tuple[np.ndarray, np.ndarray]  # ids int32 [n], trained bool [n] (token j is a target)


@dataclass
class ExampleFormat:
    """How a checkpoint's model reads an example: its tokenizer, chat template (None: no chat format), the
    ids that start a raw-text example and the end-of-text id that ends one. origin names it in errors."""

    tokenizer: Tokenizer
    eos_id: int
    text_start: tuple[int, ...]
    template: ChatTemplate | None
    origin: str

    @classmethod
    def from_checkpoint(cls, directory: Path) -> ExampleFormat:
        """The format of a checkpoint directory: tokenizer.json, and an imported model's
        generation_config.json (eos and bos ids, as export and the runtime read them) and chat_template.jinja."""
        directory = Path(directory)
        tokenizer = load_tokenizer(directory / TOKENIZER)
        raw = read_generation_config(directory)
        if raw is None:  # a model trained here: <|endoftext|> starts and ends every document
            return cls.from_tokenizer(tokenizer, origin=str(directory))
        generation = clean_generation_config(raw, tokenizer.get_vocab_size(), str(directory / GENERATION_CONFIG))
        eos = (eos_ids(generation) or [end_of_text_id(tokenizer)])[0]  # the runtime's eos_token_id
        bos = generation.get("bos_token_id")
        # bos where the tokenizer's own encoder adds it (Llama 3, Gemma), as transformers' tokenizer(text) does.
        adds_bos = bos is not None and tokenizer.encode("").ids[:1] == [bos]
        source = read_chat_template(directory)
        template = None
        if source is not None:
            template = ChatTemplate(source, None if bos is None else token_text(tokenizer, bos),
                                    token_text(tokenizer, eos), origin=str(directory / CHAT_TEMPLATE))
        return cls(tokenizer, eos, (bos,) if adds_bos else (), template, str(directory))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, template: ChatTemplate | None = None,
                       origin: str = "the model") -> ExampleFormat:
        """A tokenizer trained here: its <|endoftext|> starts a raw-text example (as data.py starts every
        document) and ends it."""
        eos = end_of_text_id(tokenizer)
        return cls(tokenizer, eos, (eos,), template, origin)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as a template writes it: a special token's own text, else its decoding (as the runtime does)."""
    added = tokenizer.get_added_tokens_decoder().get(token_id)
    return added.content if added is not None else tokenizer.decode([token_id], skip_special_tokens=False)


# -- reading ------------------------------------------------------------------------------------------


def example_files(paths: Sequence[Path]) -> list[Path]:
    """The files of `paths`: files as given, directories' *.jsonl files in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise EdgeGPTError(f"data path {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".jsonl")
            if not found:
                raise EdgeGPTError(f"{path} contains no .jsonl files of examples")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise EdgeGPTError("no data given: pass JSONL files of examples")
    return files


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; lines end at "\\n" only (JSON text may hold U+2028)."""
    empty = True
    for line_no, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgeGPTError(f"{path}:{line_no} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or not ("messages" in record or "prompt" in record or "completion" in record):
            what = f"keys {sorted(record)[:4]}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise EdgeGPTError(f'{path}:{line_no} is neither {{"messages": [...]}} nor {{"prompt": ..., '
                               f'"completion": ...}} (it has {what}); write one of the two per line')
        empty = False
        yield line_no, record
    if empty:
        raise EdgeGPTError(f"{path} holds no examples (it is empty); write one JSON record per line")


# -- tokenizing ---------------------------------------------------------------------------------------


def read_examples(paths: Sequence[Path], fmt: ExampleFormat, include_prompts: bool = False) -> list[Example]:
    """Every record of `paths` tokenized, with its trained tokens marked, in file order."""
    examples: list[Example] = []
    pending: list[tuple[str, list[tuple[int, int]]]] = []  # rendered chats (text, spans) not yet encoded

    def flush() -> None:  # before a raw-text example, so the examples stay in file order
        encodings = fmt.tokenizer.encode_batch([text for text, _ in pending], add_special_tokens=False)
        for encoding, (_, spans) in zip(encodings, pending):
            examples.append(_chat_example(encoding, spans, include_prompts))
        pending.clear()

    for file in example_files(paths):
        for line_no, record in read_records(file):
            where = f"{file}:{line_no}"
            if "messages" in record:
                pending.append(render_chat(fmt, record, where, find_spans=not include_prompts))
                if len(pending) >= ENCODE_BATCH:
                    flush()
            else:
                flush()
                examples.append(_text_example(fmt, record, where, include_prompts))
    flush()
    return examples


def render_chat(fmt: ExampleFormat, record: dict[str, Any], where: str,
                find_spans: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """A messages record as the template's text, and the character spans of the assistant's trained turns
    (none found when not find_spans: every token is trained)."""
    extra = sorted(set(record) - {"messages"})
    if extra:
        raise EdgeGPTError(f'{where}: a chat record holds only "messages", this one also has {extra[0]!r:.40}')
    if fmt.template is None:
        raise EdgeGPTError(f"{where} is chat data (messages) but {fmt.origin} has no chat template "
                           f"({CHAT_TEMPLATE}), so it has no chat format: train a converted instruct model, "
                           "or write the examples as prompt/completion pairs")
    try:
        messages, weights = _messages_and_weights(record["messages"])
        checked = check_messages(messages)
        full = fmt.template.render(checked, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(checked if find_spans else ()):
            if message["role"] != "assistant" or not weights[i]:
                continue
            if i == 0:
                raise EdgeGPTError("the conversation opens with an assistant message; nothing comes before "
                                   "the first reply to learn it from (start with a system or user message)")
            before = fmt.template.render(checked[:i], add_generation_prompt=True)
            through = fmt.template.render(checked[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise EdgeGPTError(f"{fmt.template.origin} renders the conversation up to message {i} "
                                   "differently from the whole, so the assistant's tokens cannot be found; "
                                   "include the prompts in the loss, or use a template that renders turn by turn")
            spans.append((len(before), max(len(before), len(through.rstrip()))))
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{where}: {e}") from None
    if find_spans and not spans:
        raise EdgeGPTError(f"{where} has no assistant message to train on; add the reply, or leave the record out")
    return full, spans


def example_texts(paths: Sequence[Path], fmt: ExampleFormat) -> list[str]:
    """Every record of `paths` as the text its model reads, one document each: a chat rendered by the template
    (turn markers written out, which the tokenizer reads back as its special tokens), a prompt/completion pair
    as the prompt then the completion. What export calibrates on and eval scores when the data is examples."""
    texts: list[str] = []
    for file in example_files(paths):
        for line_no, record in read_records(file):
            where = f"{file}:{line_no}"
            if "messages" in record:
                texts.append(render_chat(fmt, record, where, find_spans=False)[0])
            else:
                _text_example(fmt, record, where, include_prompts=True)  # the same checks as training's
                texts.append(record["prompt"] + record["completion"])
    return texts


def _messages_and_weights(messages: Any) -> tuple[Any, list[bool]]:
    """The messages without OpenAI's optional "weight" (0 or 1 on an assistant message), and the weights."""
    if not isinstance(messages, list):
        return messages, []  # check_messages says what is wrong
    plain, weights = [], []
    for i, message in enumerate(messages):
        weight = 1
        if isinstance(message, dict) and "weight" in message:
            message = dict(message)
            weight = message.pop("weight")
            if weight not in (0, 1) or isinstance(weight, float) or message.get("role") != "assistant":
                raise EdgeGPTError(f"message {i}'s weight must be 0 or 1, on an assistant message, got {weight!r:.40}")
        plain.append(message)
        weights.append(bool(weight))
    return plain, weights


def _chat_example(encoding, spans: list[tuple[int, int]], include_prompts: bool) -> Example:
    ids = np.asarray(encoding.ids, dtype=np.int32)
    if include_prompts:
        return ids, np.ones(len(ids), dtype=bool)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:  # every token that covers a character of the span
        trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return ids, trained


def _text_example(fmt: ExampleFormat, record: dict[str, Any], where: str, include_prompts: bool) -> Example:
    extra = sorted(set(record) - {"prompt", "completion"})
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            got = "nothing" if key not in record else type(record[key]).__name__
            raise EdgeGPTError(f'{where}: "{key}" must be a string, got {got}; a record is '
                               '{"prompt": "...", "completion": "..."}')
    if extra:
        raise EdgeGPTError(f'{where}: a prompt/completion record holds only "prompt" and "completion", '
                           f"this one also has {extra[0]!r:.40}")
    try:
        prompt, completion = (fmt.tokenizer.encode(record[key], add_special_tokens=False).ids
                              for key in ("prompt", "completion"))
    except Exception:  # lone surrogates (\ud800 in the JSON) are no text the tokenizer can encode
        raise EdgeGPTError(f"{where}: the prompt or completion is not valid UTF-8 text") from None
    ids = np.asarray([*fmt.text_start, *prompt, *completion, fmt.eos_id], dtype=np.int32)
    trained = np.ones(len(ids), dtype=bool)
    if not include_prompts:
        trained[: len(fmt.text_start) + len(prompt)] = False
    return ids, trained


__all__ = ["Example", "ExampleFormat", "example_files", "example_texts", "is_example_data", "read_examples",
           "read_records", "render_chat", "token_text"]
