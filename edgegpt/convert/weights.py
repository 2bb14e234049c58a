"""The converted weights as a model to write, without a second copy of them.

A conversion's float32 weights are the largest thing it holds. Building GPT(cfg) and loading them into it
would hold them twice (its own randomly initialized parameters, then the copies); here the model's
parameters are the converted tensors themselves. The model is a vessel for save_checkpoint, never run: it
is built on the meta device, so its non-persistent buffers (rotary frequencies, which a checkpoint does not
store) are never made. Peak memory of `edgegpt convert`: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Callable

import torch

from edgegpt.core.config import ModelConfig
from edgegpt.model import GPT

# progress(done, total): called after each tensor a conversion has read, done rising to total.
TensorProgress = Callable[[int, int], None]


def model_holding(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> GPT:
    """A GPT of `cfg` whose parameters are `weights` (float32, checked against expected_shapes) themselves."""
    return GPT.holding(cfg, weights).eval()
