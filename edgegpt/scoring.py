"""The one scoring path: held-out tokens in strided windows -> nats per token and per character.

Numpy only; the model plugs in as a function from a batch of windows to logits.
"""

from __future__ import annotations

# `edgegpt eval` and the export's gates score this many held-out tokens by default: with it `edgegpt
# export --quantize` of `small` (1,024-token context) took 28 s in all on 2 cores (PyTorch 17 s, the int4
# package 7 s). Quantization error is systematic (both models score the same text), so this many tokens
# resolve a change far below 1%.
DEFAULT_EVAL_TOKENS = 16384
