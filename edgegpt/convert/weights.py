"""What a conversion reports as it reads tensors.

A conversion's float32 weights are the largest thing it holds, so the converters hand the tensors they read
to GPT.holding (edgegpt/model.py), which makes them the model's parameters rather than copying them into a
randomly initialized one. Peak memory of `edgegpt convert`: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Callable

# progress(done, total): called after each tensor a conversion has read, done rising to total.
TensorProgress = Callable[[int, int], None]
