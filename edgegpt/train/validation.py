"""Validation loss of the PyTorch model, in nats per token and nats per character.

Nats per character (total nats ÷ characters covered) compares models with different tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgegpt.train.data import strided_windows  # lives in data.py: the torch-free package evaluation shares it
from edgegpt.model import GPT


@dataclass
class EvalResult:
    nats_per_token: float
    nats_per_char: float
    tokens: int
    chars: int


def _score(model: GPT, windows: list[tuple[int, int, int]], tokens: np.ndarray, char_table: np.ndarray,
           device: torch.device, batch_size: int) -> EvalResult:
    """windows: (start, length, first_scored) — inputs tokens[start : start+length], targets shifted by
    one; only targets at offsets >= first_scored count."""
    total_nats, total_tokens, total_chars = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        length = chunk[0][1]
        batch = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s, _, _ in chunk])
        x = torch.from_numpy(batch[:, :-1]).to(device)
        y = torch.from_numpy(batch[:, 1:]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        for row, (_, _, first) in enumerate(chunk):
            total_nats += nats[row, first:].sum().item()
            total_tokens += length - first
            total_chars += int(char_table[batch[row, 1 + first :]].sum())
    return EvalResult(total_nats / max(total_tokens, 1), total_nats / max(total_chars, 1), total_tokens, total_chars)


@torch.no_grad()
def evaluate_sample(model: GPT, tokens: np.ndarray, char_table: np.ndarray, block_size: int, n_windows: int,
                    device: torch.device, batch_size: int = 8) -> EvalResult:
    """Quick estimate for progress reports: n evenly spaced full windows, every target scored."""
    length = min(block_size, len(tokens) - 1)
    starts = np.linspace(0, len(tokens) - length - 1, num=n_windows).astype(int)
    windows = [(int(s), length, 0) for s in sorted(set(starts.tolist()))]
    was_training = model.training
    model.eval()
    try:
        return _score(model, windows, tokens, char_table, device, batch_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_split(model: GPT, tokens: np.ndarray, char_table: np.ndarray, block_size: int,
                   device: torch.device, batch_size: int = 8, progress=None) -> EvalResult:
    """The whole split, every token scored once (the reported validation figure)."""
    windows = strided_windows(len(tokens), block_size)
    model.eval()
    result_parts = []
    for i in range(0, len(windows), batch_size * 16):
        result_parts.append(_score(model, windows[i : i + batch_size * 16], tokens, char_table, device, batch_size))
        if progress:
            progress(min(i + batch_size * 16, len(windows)), len(windows))
    nats = sum(r.nats_per_token * r.tokens for r in result_parts)
    n_tokens = sum(r.tokens for r in result_parts)
    n_chars = sum(r.chars for r in result_parts)
    return EvalResult(nats / n_tokens, nats / n_chars, n_tokens, n_chars)
