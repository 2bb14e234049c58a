"""The KV cache's precision at export: `edgegpt export --kv-cache fp32|int8|fp16`.

    fp32  float32 buffers: the default of a float32 package (CPU)
    fp16  float16 buffers: the cache of a `--precision fp16` package (CUDA), the only one it takes. A float32
          package runs on the CPU, where a float16 cache is several times slower than float32 (ONNX-NOTES.md),
          so that combination is refused
    int8  onnxruntime 1.32's quantized cache (GroupQueryAttention k/v_quant_type, CPU, float32 graphs): a
          quarter of fp32's bytes per token, symmetric 8-bit with one step per KV head and channel

    checkpoint ─► PyTorch over CALIBRATION_TOKENS of the held-out text ─► max |K|, |V| per layer ─► steps
              ─► fused graph with an int8 cache (export/fused.py, CacheScales) ─► [weight quantization]
              ─► the perplexity gate: + CACHE_PERPLEXITY_LIMIT on top of the weights' own limit

Calibration. onnxruntime quantizes q = clamp(rint(x / step), -128, 127) and reads q · step (symmetric,
saturating), so the steps must cover what the cache will hold. The PyTorch model runs over the first
CALIBRATION_TOKENS of the held-out text the gates score (`--eval-data`, else the checkpoint's validation
split) and each layer's largest |V| and |K| per KV head and channel are recorded. K is stored after the
rotary, which turns channels j and j + head_dim/2 together by position · inv_freq_j: its bound is the
largest |K| the recorded keys reach at ANY position the cache can hold (below max_len; rotated_bound), so
a long generation cannot exceed what a short text calibrated. Fast pairs turn full circles (bound: the
pair's norm); slow ones, where large keys tend to sit, turn a fraction of a radian over the whole context
and keep close to their own values. step = MARGIN · max / 127. The statistic is a maximum, which barely
overfits the text it is also scored on; a value beyond it saturates at ±127 steps rather than wrapping.

Choices, measured on SmolLM2-135M against the float32 cache (the mean KL divergence of the next-token
distribution is the steadier figure; Δ perplexity is noisy on a few thousand tokens): PER_CHANNEL holds
quality better than PER_TENSOR (a fraction of its KL), and both run on the CPU at one byte per value (the
steps are per layer, not per token; the kernel wants k_quant_type == v_quant_type), so it is QUANT_TYPE.
Every margin added above the calibrated maximum cost more KL, so MARGIN is 1.0: no headroom beyond the
calibrated maximum, whose position-independent bound already covers every position. K causes most of the
loss; clipping each channel at its MSE-optimal range instead of its maximum gained nothing measurable, and
bounding K by the pair norm at every pair cost more. On the tiny test model both types cost a small
fraction of a percent of perplexity. The int8 cache's cost on real models: docs/benchmarks.md.

The gate. The int8 cache alone may cost at most CACHE_PERPLEXITY_LIMIT (+0.5%) perplexity against PyTorch
float32. With weight quantization the two losses add up (each rounds a different tensor), so the limit is
the sum: the weight format's own limit plus +0.5% (int8 weights and cache: +2.0%). GateLimits may set
the cache's share under the key "int8 cache".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.fused import KV_CACHE_DTYPES, CacheScales, build_fused_graph, fused_graph_contract, scale_shape
from edgegpt.export.gates import Check, GateLimits, perplexity_check
from edgegpt.model import GPT
from edgegpt.quality import EvalText, Metrics

KV_CACHES = ("fp32", "int8", "fp16")
# PER_CHANNEL: a fraction of PER_TENSOR's KL on SmolLM2-135M (module doc).
QUANT_TYPE = "PER_CHANNEL"
# Steps of calibrated max / 127, no headroom: every margin added cost more KL (module doc).
MARGIN = 1.0
CALIBRATION_TOKENS = 8192
INT8_MAX = 127
# The int8 cache's share of the perplexity gate, and its key in GateLimits.perplexity_increase.
CACHE_PERPLEXITY_LIMIT = 0.005
GATE_KEY = "int8 cache"


def resolve_kv_cache(kv_cache: str | None, fuse: bool, precision: str) -> str:
    """Check --kv-cache against the graph and its precision ("float32" or "float16", resolved); None means
    the precision's own float cache. Returns "fp32", "fp16" or "int8"."""
    own = "fp16" if precision == "float16" else "fp32"
    if kv_cache is None:
        return own
    if kv_cache not in KV_CACHES:
        raise EdgeGPTError(f"--kv-cache {kv_cache} is not supported; choose fp32, int8 or fp16")
    if kv_cache == "fp16" and precision != "float16":
        raise EdgeGPTError(
            "--kv-cache fp16 is for CUDA packages (add --precision fp16): a float32 package runs on the CPU, "
            "where a float16 cache is ~8x slower than float32; for a smaller CPU cache use --kv-cache int8"
        )
    if precision == "float16" and kv_cache != "fp16":
        raise EdgeGPTError(
            f"a --precision fp16 package keeps its cache in float16; drop --kv-cache {kv_cache} "
            "(the int8 cache is onnxruntime's CPU format, for float32 packages)"
        )
    if kv_cache == "int8" and not fuse:
        raise EdgeGPTError("--kv-cache int8 needs the fused graph (GroupQueryAttention quantizes the cache); "
                           "drop --no-fuse")
    return kv_cache


def cache_record(kv_cache: str, scales: CacheScales | None = None) -> dict[str, Any]:
    """The manifest's `kv_cache`: the dtype and, for int8, the quantization and its calibration, with each
    layer's max |K| (over rotary angles) and max |V| as the scales were made from."""
    record: dict[str, Any] = {"dtype": KV_CACHE_DTYPES[kv_cache]}
    if scales is not None:
        margin = float(scales.calibration.get("margin", 1.0))
        maxima = {f"max_abs_{kind}": [round(float(np.max(step)) * INT8_MAX / margin, 6)
                                      for step in getattr(scales, kind)] for kind in "kv"}
        record.update(quantization=scales.quant_type, bit_width=8,
                      calibration={**scales.calibration, **maxima})
    return record


def calibrate(model: GPT, text: EvalText, quant_type: str = QUANT_TYPE, margin: float = MARGIN,
              max_tokens: int = CALIBRATION_TOKENS) -> CacheScales:
    """The int8 cache's steps for `model`, from its K and V over the first `max_tokens` tokens of `text`
    (in windows of text.window tokens, each from position 0, as the gates score them); module doc."""
    import torch

    cfg = model.cfg
    tokens = torch.as_tensor(np.asarray(text.tokens[:max_tokens], np.int64))
    window = max(2, min(text.window, cfg.max_len))
    per_channel = (cfg.n_kv_heads, cfg.head_dim)
    k_max = [np.zeros(per_channel, np.float32) for _ in range(cfg.n_layers)]
    v_max = [np.zeros(per_channel, np.float32) for _ in range(cfg.n_layers)]

    # The largest angle each rotated pair reaches: the cache holds positions below max_len.
    reach = (cfg.max_len - 1) * model.rotary.inv_freq.double()

    def record(maxima: list[np.ndarray], layer: int, rotary: bool):
        def hook(module, inputs, output) -> None:
            x = output.detach().reshape(-1, cfg.n_kv_heads, cfg.head_dim)
            x = rotated_bound(x, reach) if rotary else x.abs()
            np.maximum(maxima[layer], x.amax(dim=0).float().numpy(), out=maxima[layer])
        return hook

    handles = []
    for i, block in enumerate(model.layers):
        # k_norm: the keys as the cache gets them, after Qwen3's q/k norm (an nn.Identity without one)
        handles.append(block.attn.k_norm.register_forward_hook(record(k_max, i, rotary=True)))
        handles.append(block.attn.v_proj.register_forward_hook(record(v_max, i, rotary=False)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(tokens), window):
                chunk = tokens[start:start + window]
                if len(chunk):
                    model(chunk[None])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    shape = scale_shape(cfg, quant_type)

    def steps(maximum: np.ndarray) -> np.ndarray:
        top = maximum.reshape(shape) if quant_type == "PER_CHANNEL" else np.max(maximum, keepdims=True).reshape(shape)
        # A channel that never moved in the text gets the layer's smallest nonzero step, not zero
        # (onnxruntime would quantize with 1.0 and dequantize to 0).
        floor = np.min(top[top > 0]) if np.any(top > 0) else 1.0
        return (margin * np.maximum(top, floor) / INT8_MAX).astype(np.float32)

    calibration = {"source": text.source, "tokens": int(len(tokens)), "window": int(window), "margin": margin,
                   "statistic": "max |V|; max |K| after the rotary at any position below max_len"}
    return CacheScales(quant_type, tuple(steps(m) for m in k_max), tuple(steps(m) for m in v_max), calibration)


def rotated_bound(k, reach):
    """|K| after the rotary, at its largest over every position the cache can hold: k [..., head_dim] before
    the rotary (torch), reach [head_dim / 2] the largest angle of each pair (max_len - 1 positions).

    The rotary turns channels (a, b) = (j, j + D/2) by θ = position · inv_freq_j:
        a' = a cos θ − b sin θ = R cos(θ + φ),   b' = b cos θ + a sin θ = R sin(θ + φ)
    with R = sqrt(a² + b²), φ = atan2(b, a). Over θ in [0, reach], |a'| is R if θ + φ meets a multiple of π,
    else its larger end value (|cos| has no other maximum); |b'| likewise at π/2 + multiples of π. A pair
    that turns half a circle or more is bounded by R; the slow pairs (low frequencies, where large keys
    tend to sit) turn a fraction of that over the whole context, and keep close to their own values.
    """
    import math

    import torch

    half = k.shape[-1] // 2
    a, b = k[..., :half].double(), k[..., half:].double()
    norm, phase = torch.sqrt(a * a + b * b), torch.atan2(b, a)
    cos, sin = torch.cos(reach), torch.sin(reach)
    a_end, b_end = a * cos - b * sin, b * cos + a * sin
    a_peak = torch.remainder(-phase, math.pi) <= reach
    b_peak = torch.remainder(math.pi / 2 - phase, math.pi) <= reach
    a_max = torch.where(a_peak, norm, torch.maximum(a.abs(), a_end.abs()))
    b_max = torch.where(b_peak, norm, torch.maximum(b.abs(), b_end.abs()))
    return torch.cat((a_max, b_max), dim=-1)


def build_int8_cache_graph(model: GPT, text: EvalText, path: Path,
                           quant_type: str = QUANT_TYPE) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate on `text` and write the float32 fused graph with an int8 cache at `path`; returns its
    config.json graph contract and the manifest's kv_cache record."""
    scales = calibrate(model, text, quant_type)
    build_fused_graph(model, path, "fp32", scales=scales)
    return fused_graph_contract(model.cfg, "fp32", scales), cache_record("int8", scales)


def cache_perplexity_check(label: str, kv_cache: str, reference: Metrics, package: Metrics,
                           limits: GateLimits) -> Check | None:
    """perplexity_check for the package's weights (`label`), with the int8 cache's share added (module
    doc); a float cache leaves it as it is."""
    check = perplexity_check(label, reference, package, limits)
    if kv_cache != "int8":
        return check
    share = limits.perplexity_increase.get(GATE_KEY, CACHE_PERPLEXITY_LIMIT)
    return Check(f"{label} + int8 cache perplexity vs PyTorch", package.perplexity / reference.perplexity - 1,
                 share + (check.limit if check is not None else 0.0), "relative")
