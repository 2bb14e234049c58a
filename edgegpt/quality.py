"""How good a model is on held-out text, and how closely it follows a reference: the numbers behind
`edgegpt eval` and the export's quality gates.

    text ─► tokens (capped) ─► windows of `window` tokens (default min(context, 1,024)), stride half a
        window ─► logits per window ─► nats/token, nats/char, perplexity, top-1 agreement with the reference
    16 prompts from the same text ─► 32 greedy tokens each ─► greedy agreement with the reference

Torch-free on purpose: a model package is scored through the runtime's `Generator` (numpy and
onnxruntime only), so `edgegpt eval PACKAGE` works where only the runtime is installed. The PyTorch
side (edgegpt.reference.TorchReference) plugs in through the same two methods, `logits` and `greedy_all`.

Where the time goes: scoring the windows is most of it (windows of 1,024 run as many tokens as windows of
a long context, without attention over thousands of positions, so they are faster), then the greedy
continuations, then loading. The PyTorch reference the export also scores costs about twice as much per
window (float32 with unfused elementwise ops; its greedy prompts run as one batch). How long `edgegpt eval`
and the export's gates take on a real model: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
from rich.table import Table
from tokenizers import Tokenizer

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, TRAIN_STATE, is_checkpoint, is_package
from edgegpt.core.io import read_json
from edgegpt.runtime.decoding import greedy
from edgegpt.scoring import (
    DEFAULT_EVAL_TOKENS,
    DEFAULT_WINDOW,
    MIN_EVAL_TOKENS,
    MIN_WINDOW,
    char_starts_table,
    chunk_starts,
    score,
    strided_windows,
    window_stride,
)
from edgegpt.train.corpus import default_corpus, read_corpus, split_documents
from edgegpt.train.data import tokenize

GREEDY_PROMPTS = 16
GREEDY_TOKENS = 32
PROMPT_TOKENS = 32
# Tokens are rarely longer than this many characters, so reading this many characters per wanted token
# is enough and keeps a large validation split from being tokenized whole only to be cut.
CHARS_PER_TOKEN_BOUND = 16
class Scorable(Protocol):
    """What an evaluated model offers: the PyTorch reference (edgegpt.reference.TorchReference) or a
    package (PackageScorer)."""

    max_len: int

    def logit_chunks(self, windows: np.ndarray, skip: int = 0) -> Iterable[np.ndarray]:
        """float32 [B, n, vocab] chunks of the next-token logits at positions skip.. of each window, in order,
        from an empty past (edgegpt.scoring)."""

    def greedy_all(self, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """The greedy continuation of each prompt, n_tokens long (never stopping at end-of-text)."""


class PackageScorer:
    """A model package through the runtime Generator (what an app would run)."""

    def __init__(self, generator) -> None:
        self.generator = generator
        self.max_len = generator.config.max_len

    def logit_chunks(self, windows: np.ndarray, skip: int = 0) -> Iterator[np.ndarray]:
        """The windows through their caches a chunk of positions per pass (edgegpt.scoring.chunk_starts, from
        0: the history positions run too, they fill the cache), each chunk's kept logits handed over before
        the next pass: the graph computes every position's logits, and a whole window's at once would be
        window × vocab floats (a 262k vocabulary: 1 GiB per 1,024 tokens)."""
        caches = [self.generator.empty_cache() for _ in windows]
        starts = chunk_starts(windows.shape[1], 0, len(windows), self.generator.config.vocab_size)
        for start in starts:
            rows = []
            for i, window in enumerate(windows):
                logits, caches[i] = self.generator.forward(window[start : start + starts.step].tolist(), caches[i])
                # The runtime may reuse its output buffer at the next pass: a batch keeps a copy of each row.
                rows.append(logits if len(windows) == 1 else np.array(logits))
            kept = max(skip - start, 0)
            if kept < len(rows[0]):
                yield np.stack([row[kept:] for row in rows]) if len(rows) > 1 else rows[0][None, kept:]

    def logits(self, windows: np.ndarray, skip: int = 0) -> np.ndarray:
        """float32 [B, L - skip, vocab]: logit_chunks joined."""
        return np.concatenate(list(self.logit_chunks(windows, skip)), axis=1)

    def greedy_all(self, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """One prompt at a time through prefill and decode_step: what an app's generation runs."""
        return [self.greedy(prompt, n_tokens) for prompt in prompts]

    def greedy(self, prompt: Sequence[int], n_tokens: int) -> list[int]:
        return greedy(*self.generator.steps(prompt), len(prompt), n_tokens)


@dataclass(frozen=True)
class EvalText:
    """Held-out tokens, each document preceded by end-of-text as in training, and the window they are
    scored in."""

    tokens: np.ndarray  # int64 [n]
    char_table: np.ndarray  # characters per token id (edgegpt.train.data.char_starts_table)
    source: str  # where the text came from, for the table
    capped: bool  # True when the text had more tokens than the cap
    window: int  # tokens per scoring window (stride half of it); greedy prompts fit inside one


def read_documents(paths: Sequence[Path], model_dir: Path) -> list[str]:
    """The documents of `paths` as `model_dir`'s model (a checkpoint or a package) reads them: plain text (.txt,
    .md, JSONL of {"text"}) as training reads it; JSONL examples (messages, prompt/completion) as their rendered
    text, a chat through the model's own template, so a model fine-tuned on conversations is scored and
    calibrated on conversations."""
    from edgegpt.train.corpus import is_example_data

    paths = [Path(p) for p in paths]
    if is_example_data(paths):
        from edgegpt.train.records import ExampleFormat, example_texts  # (torch: plain text is read without it)

        return example_texts(paths, ExampleFormat.from_checkpoint(model_dir))
    return read_corpus(paths)


def read_eval_documents(data: Path, model_dir: Path) -> tuple[list[str], str]:
    return read_documents([Path(data)], model_dir), str(data)


def validation_documents(checkpoint: Path) -> tuple[list[str], str]:
    """The validation text of the run that made `checkpoint`, as training split it (train_state.json)."""
    state_path = Path(checkpoint) / TRAIN_STATE
    if not state_path.is_file():
        raise EdgeGPTError(f"{checkpoint} has no train_state.json to find its validation text; pass --eval-data PATH")
    state = read_json(state_path)
    val_paths, data_paths = state.get("val_data") or [], state.get("data") or []
    try:
        if val_paths:
            return read_documents(val_paths, checkpoint), ", ".join(val_paths)
        if data_paths:
            validation = split_documents(read_documents(data_paths, checkpoint))[1]
            return validation, f"last 10% of {', '.join(data_paths)}"
    except EdgeGPTError as e:
        raise EdgeGPTError(f"cannot read the checkpoint's validation text ({e}); pass --eval-data PATH") from None
    return split_documents(default_corpus())[1], "last 10% of the embedded Python documentation"


def resolve_window(window: int | None, max_len: int) -> int:
    """--window: None means min(the model's context, DEFAULT_WINDOW); else MIN_WINDOW..max_len tokens."""
    if window is None:
        return min(max_len, DEFAULT_WINDOW)
    if isinstance(window, bool) or not isinstance(window, int) or window < MIN_WINDOW:
        raise EdgeGPTError(f"--window must be a number of tokens, at least {MIN_WINDOW}; got {window!r}")
    if window > max_len:
        raise EdgeGPTError(f"--window {window} is longer than the model's context ({max_len} tokens); "
                           f"choose at most {max_len}")
    return window


def prepare_eval_text(documents: list[str], source: str, tokenizer: Tokenizer, vocab_size: int, window: int,
                      max_tokens: int = DEFAULT_EVAL_TOKENS) -> EvalText:
    """Tokenize (at most max_tokens + 1 tokens: that many targets), to be scored in windows of `window`
    tokens (resolve_window); a text shorter than a window is scored in one. Refuses fewer than
    MIN_EVAL_TOKENS targets."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < MIN_EVAL_TOKENS:
        raise EdgeGPTError(f"--eval-tokens must be at least {MIN_EVAL_TOKENS}, got {max_tokens!r}")
    budget, kept = max_tokens * CHARS_PER_TOKEN_BOUND, []
    for doc in documents:
        kept.append(doc[:budget])
        budget -= len(kept[-1])
        if budget <= 0:
            break
    tokens = tokenize(tokenizer, kept).astype(np.int64)
    if len(tokens) < MIN_EVAL_TOKENS + 1:
        raise EdgeGPTError(
            f"the evaluation text ({source}) has {len(tokens)} tokens, too few to score: it needs at least "
            f"{MIN_EVAL_TOKENS + 1}; pass a longer text"
        )
    return EvalText(tokens=tokens[: max_tokens + 1], char_table=char_starts_table(tokenizer, vocab_size),
                    source=source, capped=len(tokens) > max_tokens + 1, window=window)


@dataclass
class Predictions:
    """A model's choices, kept so another model can be compared with it."""

    top1: np.ndarray  # argmax at every scored position, in window order
    greedy: list[list[int]]  # one continuation per prompt


@dataclass
class Metrics:
    name: str
    nats_per_token: float
    nats_per_char: float
    perplexity: float
    tokens: int  # targets scored
    chars: int  # characters those targets cover
    top1_agreement: float | None = None  # with the reference; None when there is none
    greedy_agreement: float | None = None
    greedy_matches: int | None = None
    greedy_compared: int | None = None
    seconds: float = 0.0
    predictions: Predictions | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        d["seconds"] = round(self.seconds, 2)
        return d


def greedy_prompts(tokens: np.ndarray, window: int) -> tuple[list[list[int]], int]:
    """16 prompts spread evenly over the text, and how many tokens to continue each (fits one window)."""
    n_new = min(GREEDY_TOKENS, window // 2)
    length = min(PROMPT_TOKENS, window - n_new, len(tokens))
    starts = np.linspace(0, len(tokens) - length, GREEDY_PROMPTS).astype(int)
    return [tokens[s : s + length].tolist() for s in starts], n_new


def evaluate(name: str, model: Scorable, text: EvalText, reference: Predictions | None = None) -> Metrics:
    """Score `text` with `model`; agreement figures when a reference's predictions are given."""
    start = time.perf_counter()
    scored = score(model.logit_chunks, text.tokens, strided_windows(len(text.tokens), text.window), text.char_table)
    prompts, n_new = greedy_prompts(text.tokens, text.window)
    predictions = Predictions(top1=scored.top1, greedy=model.greedy_all(prompts, n_new))
    metrics = Metrics(name=name, nats_per_token=scored.nats_per_token, nats_per_char=scored.nats_per_char,
                      perplexity=scored.perplexity, tokens=scored.tokens, chars=scored.chars, predictions=predictions)
    if reference is not None:
        metrics.top1_agreement = float(np.mean(predictions.top1 == reference.top1))
        pairs = list(zip(predictions.greedy, reference.greedy))
        metrics.greedy_matches = sum(a == b for got, want in pairs for a, b in zip(got, want))
        metrics.greedy_compared = sum(len(want) for _, want in pairs)
        metrics.greedy_agreement = metrics.greedy_matches / max(metrics.greedy_compared, 1)
    metrics.seconds = time.perf_counter() - start
    return metrics


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def metrics_table(rows: Sequence[Metrics], text: EvalText, title: str = "quality on held-out text",
                  verdicts: Sequence[str] | None = None) -> Table:
    """One row per model; the first row is the reference the others are compared with."""
    scored = rows[0].tokens if rows else 0
    caption = f"{scored:,} tokens ({rows[0].chars if rows else 0:,} characters) of {text.source}"
    caption += "; capped by --eval-tokens" if text.capped else ""
    caption += f"; windows of {text.window:,} tokens, stride {window_stride(text.window):,}"
    caption += f"; greedy: {GREEDY_PROMPTS} prompts × {GREEDY_TOKENS} tokens"
    table = Table(title=title, caption=caption)
    compared = len(rows) > 1  # agreement and Δ columns only say something with a reference row
    columns = ["model", "nats/token", "nats/char", "perplexity"]
    columns += ["Δ perplexity", "top-1 agreement", "greedy agreement"] if compared else []
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    if verdicts is not None:
        table.add_column("gate")
    base = rows[0].perplexity if rows else 1.0
    for i, m in enumerate(rows):
        cells = [m.name, f"{m.nats_per_token:.4f}", f"{m.nats_per_char:.4f}", f"{m.perplexity:.3f}"]
        if compared:
            delta = "—" if i == 0 else f"{m.perplexity / base - 1:+.2%}"
            cells += [delta, _pct(m.top1_agreement), _pct(m.greedy_agreement)]
        table.add_row(*cells, *([verdicts[i]] if verdicts is not None else []))
    return table


def metrics_json(rows: Sequence[Metrics], text: EvalText) -> str:
    return json.dumps({"source": text.source, "capped": text.capped, "window": text.window,
                       "stride": window_stride(text.window), "models": [m.to_dict() for m in rows]})


def open_scorer(path: Path, threads: int | None = None,
                window: int | None = None) -> tuple[Scorable, Tokenizer, int, int]:
    """A package (runtime, no torch) or a checkpoint (PyTorch): scorer, tokenizer, vocab size, context.
    A package's cache holds windows of `window` tokens (default DEFAULT_WINDOW), not the whole context;
    run_eval checks the window against the context."""
    path = Path(path)
    if not path.exists():
        raise EdgeGPTError(f"{path} does not exist; pass a model package or a checkpoint directory")
    if is_package(path):
        from edgegpt.runtime import Generator

        context = declared_context(path)
        max_length = None if context is None else min(context, window or DEFAULT_WINDOW)
        # float16 packages need CUDA ("auto" finds it)
        generator = Generator.load(path, provider="auto", threads=threads, max_length=max_length)
        spec = generator.config
        return PackageScorer(generator), generator.package.tokenizer, spec.vocab_size, spec.max_len
    if is_checkpoint(path):
        from edgegpt.checkpoint import load_checkpoint
        from edgegpt.reference import TorchReference

        model, tokenizer = load_checkpoint(path)
        return TorchReference(model), tokenizer, model.cfg.vocab_size, model.cfg.max_len
    raise EdgeGPTError(f"{path} is neither a model package (model.onnx) nor a checkpoint (model.safetensors)")


def declared_context(package: Path) -> int | None:
    """The context (max_len) a package's config.json declares, read before loading it; None when the file
    cannot be read, and loading the package then says what is wrong with it."""
    from edgegpt.runtime.package import parse_config

    try:
        return parse_config(read_json(package / CONFIG), str(package / CONFIG))[0].max_len
    except (EdgeGPTError, OSError):
        return None


def run_eval(path: Path, data: Path | None, reference: Path | None, max_tokens: int = DEFAULT_EVAL_TOKENS,
             threads: int | None = None, window: int | None = None) -> tuple[list[Metrics], EvalText]:
    """`edgegpt eval`: score `path` (and first `reference`, when given) on `data`, in windows of `window`
    tokens (default min(context, 1,024), stride half a window)."""
    if threads is not None and threads < 1:  # checked here too: a checkpoint would ignore it silently
        raise EdgeGPTError(f"--threads must be at least 1, got {threads}")
    if window is not None:  # a bad --window is refused before anything is loaded
        resolve_window(window, sys.maxsize)
    scorer, tokenizer, vocab_size, max_len = open_scorer(path, threads, window)
    window = resolve_window(window, max_len)
    if data is not None:
        documents, source = read_eval_documents(data, path)
    elif is_checkpoint(path):
        documents, source = validation_documents(path)
    else:
        raise EdgeGPTError(f"{path} is a model package, which holds no text to evaluate on; pass --data PATH")
    text = prepare_eval_text(documents, source, tokenizer, vocab_size, window, max_tokens)
    rows: list[Metrics] = []
    if reference is not None:
        ref_scorer, ref_tokenizer, _, ref_len = open_scorer(reference, threads, window)
        if ref_tokenizer.to_str() != tokenizer.to_str() or ref_len != max_len:
            raise EdgeGPTError(f"{reference} has another tokenizer or context than {path}; they cannot be compared")
        rows.append(evaluate(str(reference), ref_scorer, text))
    rows.append(evaluate(str(path), scorer, text, rows[0].predictions if rows else None))
    return rows, text
