"""Validation loss of the PyTorch model during and after training, through the one scoring path
(edgegpt.scoring): nats per token and per character (total nats ÷ characters covered, which compares
models with different tokenizers)."""

from __future__ import annotations

import numpy as np
import torch

from edgegpt.model import GPT
from edgegpt.reference import TorchReference
from edgegpt.scoring import Score, sample_windows, score, strided_windows


def evaluate_sample(model: GPT, tokens: np.ndarray, char_table: np.ndarray, block_size: int, n_windows: int,
                    device: torch.device, batch_size: int = 8) -> Score:
    """Quick estimate for progress reports: n evenly spaced full windows, every target scored."""
    was_training = model.training
    try:
        return score(TorchReference(model, device).logit_chunks, tokens,
                     sample_windows(len(tokens), block_size, n_windows), char_table, batch_size)
    finally:
        model.train(was_training)


def evaluate_split(model: GPT, tokens: np.ndarray, char_table: np.ndarray, block_size: int,
                   device: torch.device, batch_size: int = 8, progress=None) -> Score:
    """The whole split in strided windows of the training context, every token scored once (the reported
    validation figure, comparable with DESIGN.md's; `edgegpt eval` defaults to windows of at most 1,024)."""
    return score(TorchReference(model, device).logit_chunks, tokens, strided_windows(len(tokens), block_size),
                 char_table, batch_size, progress)
