"""Check an exported graph against the PyTorch model it came from.

Two measures, both with onnxruntime on the CPU:
- max |Δlogits| at past lengths 0, 1 and 37: prefill `past` random tokens, then run a few more
  tokens on top of the returned cache, and compare every logit of both calls with PyTorch's.
- greedy agreement: continue a few prompts greedily for N tokens with PyTorch (`GPT.forward_cached`)
  and with the graph (feeding `present` back as `past`), and count the positions where they chose
  the same token. Once two continuations diverge they see different text, so this measures how
  long they stay together as much as how often they agree.

The float32 graph must match (`check_float32`); for a quantized graph the numbers are informative.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch

from edgegpt.errors import EdgeGPTError
from edgegpt.model import GPT

PAST_LENGTHS = (0, 1, 37)
NEW_TOKENS = 8  # tokens run on top of each past when measuring Δlogits
GREEDY_TOKENS = 64
# float32 graph vs PyTorch, relative to the largest |logit|: reordered float32 sums differ by ~1e-6
# per layer, so 1e-4 leaves room for deep models and still catches any real mistake (which shows up
# as differences of order 1).
FLOAT32_TOLERANCE = 1e-4

# A KV cache as the graph sees it: one (key, value) per layer, each [batch, n_kv_heads, past, head_dim].
NumpyCache = list[tuple[np.ndarray, np.ndarray]]


class VerificationFailed(EdgeGPTError):
    """The exported graph disagrees with PyTorch; no package is written."""


class OnnxLM:
    """A package graph in an onnxruntime session, called like `GPT.forward_cached` but with numpy."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.n_layers = sum(name.startswith("past_key.") for name in shapes)
        _, self.n_kv_heads, _, self.head_dim = shapes["past_key.0"]  # [batch, n_kv_heads, past, head_dim]

    def empty_cache(self, batch: int = 1) -> NumpyCache:
        empty = np.zeros((batch, self.n_kv_heads, 0, self.head_dim), np.float32)
        return [(empty, empty) for _ in range(self.n_layers)]

    def __call__(
        self, input_ids: np.ndarray, past: NumpyCache, attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, NumpyCache]:
        """input_ids [B, S] int64 -> logits [B, S, vocab] and present (past ++ new) per layer."""
        B, S = input_ids.shape
        P = past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((B, P + S), np.int64)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        for i, (key, value) in enumerate(past):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = key, value
        logits, *flat = self.session.run(self.output_names, feeds)
        return logits, [(flat[2 * i], flat[2 * i + 1]) for i in range(self.n_layers)]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run PyTorch on `n` threads for a while. Batch-1 decode steps of a small model are too short to
    share between threads: on a busy 2-core machine two threads made them ~50x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def greedy_torch(model: GPT, prompt: Sequence[int], n_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` with PyTorch's KV cache: prefill, then one token per step."""
    logits, past = model.forward_cached(torch.tensor([list(prompt)]), model.empty_cache())
    tokens = []
    for _ in range(n_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits, past = model.forward_cached(torch.tensor([[tokens[-1]]]), past)
    return tokens


def greedy_onnx(lm: OnnxLM, prompt: Sequence[int], n_tokens: int) -> list[int]:
    """The same continuation with the graph, feeding each step's present back as the next past."""
    logits, past = lm(np.array([list(prompt)], np.int64), lm.empty_cache())
    tokens = []
    for _ in range(n_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits, past = lm(np.array([[tokens[-1]]], np.int64), past)
    return tokens


@dataclass
class Reference:
    """PyTorch's answers, computed once and compared with every graph an export produces."""

    # past length -> the calls made: (input_ids [1, S], logits [1, S, vocab]); the first call starts
    # from an empty cache, each later one continues from the previous call's cache.
    calls: dict[int, list[tuple[np.ndarray, np.ndarray]]]
    greedy: list[tuple[list[int], list[int]]]  # (prompt, PyTorch's greedy continuation)

    @property
    def logit_scale(self) -> float:
        return max(float(np.abs(logits).max()) for calls in self.calls.values() for _, logits in calls)


@torch.no_grad()
def torch_reference(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    n_tokens: int = GREEDY_TOKENS,
    past_lengths: Sequence[int] = PAST_LENGTHS,
    seed: int = 0,
) -> Reference:
    """Run `model` on random tokens at each past length (prefill `past`, then NEW_TOKENS more on top of
    the cache) and greedily continue each prompt, as far as the context length allows."""
    rng = np.random.default_rng(seed)
    calls: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    with torch_threads(1):
        for past_len in past_lengths:
            if past_len + NEW_TOKENS > model.cfg.max_len:
                continue
            ids = rng.integers(0, model.cfg.vocab_size, (1, past_len + NEW_TOKENS), dtype=np.int64)
            chunks = [ids[:, :past_len], ids[:, past_len:]] if past_len else [ids]
            past, calls[past_len] = model.empty_cache(), []
            for chunk in chunks:
                logits, past = model.forward_cached(torch.from_numpy(chunk), past)
                if not torch.isfinite(logits).all():
                    raise EdgeGPTError("the checkpoint produces NaN/inf logits; retrain it or export an earlier checkpoint")
                calls[past_len].append((chunk, logits.numpy()))
        greedy = []
        for prompt in prompts:
            n = max(0, min(n_tokens, model.cfg.max_len - len(prompt)))
            greedy.append((list(prompt), greedy_torch(model, prompt, n)))
    return Reference(calls=calls, greedy=greedy)


@dataclass
class Verification:
    """One graph checked against PyTorch."""

    max_abs_logit_diff: dict[int, float]  # by past length
    logit_scale: float  # the largest |logit| PyTorch produced in those runs
    greedy_agreement: float  # fraction of positions where both chose the same token
    greedy_compared: list[int]  # per prompt, tokens generated by both
    greedy_matches: list[int]  # per prompt, positions where both chose the same token

    @property
    def max_diff(self) -> float:
        return max(self.max_abs_logit_diff.values(), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_abs_logit_diff"] = {str(k): v for k, v in self.max_abs_logit_diff.items()}
        return d


def verify_onnx(reference: Reference, path: Path) -> Verification:
    """Compare the graph at `path` with PyTorch's answers (logits at several past lengths, greedy text)."""
    lm = OnnxLM(path)
    diffs = {}
    for past_len, calls in reference.calls.items():
        past, worst = lm.empty_cache(), 0.0
        for ids, expected in calls:
            got, past = lm(ids, past)
            worst = max(worst, float(np.abs(got - expected).max()))
        diffs[past_len] = worst
    compared, matches = [], []
    for prompt, expected in reference.greedy:
        got = greedy_onnx(lm, prompt, len(expected))
        compared.append(len(expected))
        matches.append(sum(a == b for a, b in zip(expected, got)))
    return Verification(
        max_abs_logit_diff=diffs,
        logit_scale=reference.logit_scale,
        greedy_agreement=sum(matches) / sum(compared) if sum(compared) else 1.0,
        greedy_compared=compared,
        greedy_matches=matches,
    )


def check_float32(result: Verification) -> None:
    """The float32 graph is the reference export: it must reproduce PyTorch's logits."""
    limit = FLOAT32_TOLERANCE * max(1.0, result.logit_scale)
    if not result.max_diff <= limit:
        raise VerificationFailed(
            f"the exported float32 graph differs from PyTorch (max |Δlogits| {result.max_diff:.2e} > {limit:.2e}); "
            "no package was written. This is an edgegpt bug: please report it with the checkpoint's config.json"
        )
