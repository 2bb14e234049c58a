"""Block quantization of one weight matrix into onnxruntime's MatMulNBits layout (numpy only).

A MatMul weight W [K, N] (y = x @ W) is cut along K into blocks of `block_size`; each block of each output
column n gets a float32 scale s and a zero point z, and its values are stored as codes c in [0, 2^bits):

    W[k, n] ≈ (c[n, k] - z[n, k // block_size]) · s[n, k // block_size]

    data         uint8 [N, K/block_size, block_size·bits/8]   codes packed low-first along K
    scales       float32 [N, K/block_size]
    zero_points  uint8 [N, ⌈(K/block_size)·bits/8⌉] packed the same way (asymmetric), or None: z = 2^(bits-1)

Zero points are integers: onnxruntime 1.32 also accepts float zero points, but its CPU kernel then
dequantizes every weight on every call, an order of magnitude slower than integer zero points
(`python benchmarks/formats.py kernels`).

Three roundings:
    "rtn"     round to nearest over the block's range (symmetric: largest magnitude ↦ -2^(bits-1);
              asymmetric: [min(w, 0), max(w, 0)] onto the codes).
    "search"  for each block, the (scale, zero point) that minimises the importance-weighted squared error
              Σ_k i_k (W[k, n] - Ŵ[k, n])², with i_k the mean square of input channel k on calibration text
              (how much an error on that weight reaches the output; uniform without calibration). Tried
              from several clipped ranges (1.0 … 0.7 of the block's range: clipping a rare outlier buys
              precision for the rest), each refined by two steps of weighted least squares for the scale
              with the codes fixed. The importance weighting is the point (the idea behind llama.cpp's
              importance matrix and AWQ).
    "gptq"    GPTQ (Frantar et al., 2022): quantize K one row at a time and spread each row's error over the
              rows not yet quantized, through the inverse of the input's second moment H = Σ xᵀx, so the
              layer's output error, not the weights', is what is kept small; each block's grid is the
              "search" one, chosen when the walk reaches the block. Needs calibration text.

How much each method keeps of a real model's perplexity at 4 bits (`benchmarks/formats.py quantization`):
docs/benchmarks.md, section Quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (32, 64, 128)
ROUNDINGS = ("rtn", "search", "gptq")
GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, added to it: keeps the inverse stable
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFINE_STEPS = 2


@dataclass(frozen=True)
class BlockFormat:
    bits: int  # 4 or 8
    block_size: int = 32
    symmetric: bool = False

    @property
    def levels(self) -> int:
        return 2**self.bits

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric (zero points)"
        return f"{self.bits}-bit, blocks of {self.block_size}, {kind}"

    def bytes_per_weight(self) -> float:
        """Stored bytes per weight: codes, a float32 scale and (asymmetric) a zero point per block."""
        return self.bits / 8 + 4 / self.block_size + (0 if self.symmetric else self.bits / 8 / self.block_size)


@dataclass
class QuantizedMatrix:
    """One weight in MatMulNBits form; `dequantized()` is exactly what onnxruntime computes with."""

    fmt: BlockFormat
    k: int  # rows of the original weight (K, before padding to whole blocks)
    codes: np.ndarray  # uint8 [N, blocks, block_size], unpacked
    scales: np.ndarray  # float32 [N, blocks]
    zeros: np.ndarray  # uint8 [N, blocks] (symmetric: all 2^(bits-1))

    def dequantized(self) -> np.ndarray:
        """float32 [K, N]."""
        values = (self.codes.astype(np.float32) - self.zeros[..., None]) * self.scales[..., None]
        return values.reshape(values.shape[0], -1)[:, : self.k].T.copy()

    def packed_data(self) -> np.ndarray:
        return pack(self.codes, self.fmt.bits)

    def packed_zero_points(self) -> np.ndarray | None:
        return None if self.fmt.symmetric else pack(self.zeros, self.fmt.bits)

    @property
    def nbytes(self) -> int:
        zero_points = self.packed_zero_points()
        return self.packed_data().nbytes + self.scales.nbytes + (0 if zero_points is None else zero_points.nbytes)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes, low-first: 4 bits put two codes per byte (n padded to even)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


# Weights quantized at once (a slice of output columns): bounds the rounding's temporaries.
CHUNK_VALUES = 1 << 22


def quantize_matrix(weight: np.ndarray, fmt: BlockFormat, rounding: str = "search",
                    importance: np.ndarray | None = None, hessian: np.ndarray | None = None) -> QuantizedMatrix:
    """Quantize W [K, N]; importance [K] (mean square of each input channel), or None for uniform;
    hessian [K, K] (Σ xᵀx, for "gptq", which falls back to "search" without one)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    if rounding == "gptq" and hessian is not None:
        return _gptq(weight, fmt, hessian)
    k, n = weight.shape
    blocks = -(-k // fmt.block_size)
    weights = np.ones(blocks * fmt.block_size, np.float32)
    if importance is not None:
        weights[:k] = np.maximum(np.asarray(importance, np.float32), 0) / max(float(np.mean(importance)), 1e-30)
    weights[k:] = 0  # padding carries no error
    weights = weights.reshape(1, blocks, fmt.block_size)
    # Every output column's blocks are quantized on their own, so columns go in slices: the grid search's
    # temporaries are several times the slice, never several times a whole LM head.
    step = max(1, CHUNK_VALUES // (blocks * fmt.block_size))
    parts = [_quantize_columns(weight[:, start:start + step], fmt, rounding, weights) for start in range(0, n, step)]
    codes, scales, zeros = (np.concatenate(arrays) if len(parts) > 1 else arrays[0] for arrays in zip(*parts))
    return QuantizedMatrix(fmt, k, codes, scales[..., 0].astype(np.float32), zeros[..., 0].astype(np.uint8))


def _quantize_columns(weight: np.ndarray, fmt: BlockFormat, rounding: str,
                      weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [n, blocks, block], scales and zero points [n, blocks, 1]) of the columns W [K, n]."""
    k, n = weight.shape
    blocks = weights.shape[1]
    padded = np.zeros((blocks * fmt.block_size, n), np.float32)
    padded[:k] = weight
    w = padded.T.reshape(n, blocks, fmt.block_size)  # [n, blocks, block]
    if rounding == "rtn":
        scales, zeros = _rtn_grid(w, fmt)
    else:
        scales, zeros = _searched_grid(w, fmt, weights)
    return _codes(w, scales, zeros, fmt), scales, zeros


def _codes(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    return np.clip(np.rint(w / scales + zeros), 0, fmt.levels - 1).astype(np.uint8)


def _safe(scales: np.ndarray) -> np.ndarray:
    """A block of zeros gets scale 1 (its codes all land on the zero point)."""
    return np.where(np.abs(scales) < 1e-30, np.float32(1.0), scales).astype(np.float32)


def _rtn_grid(w: np.ndarray, fmt: BlockFormat) -> tuple[np.ndarray, np.ndarray]:
    half, top = fmt.levels // 2, fmt.levels - 1
    if fmt.symmetric:
        high, low = w.max(-1, keepdims=True), w.min(-1, keepdims=True)
        extreme = np.where(np.abs(high) >= np.abs(low), high, low)
        return _safe(extreme / -half), np.full_like(extreme, half)
    low, high = np.minimum(w.min(-1, keepdims=True), 0), np.maximum(w.max(-1, keepdims=True), 0)
    scales = _safe((high - low) / top)
    return scales, np.clip(np.rint(-low / scales), 0, top)


def _searched_grid(w: np.ndarray, fmt: BlockFormat, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    base_scales, base_zeros = _rtn_grid(w, fmt)
    best_scales, best_zeros, best_error = None, None, None
    for factor in CLIP_FACTORS:
        # Shrinking the range [min, max] by `factor` scales s and keeps z = round(-min / s).
        scales, zeros = base_scales * np.float32(factor), base_zeros
        for _ in range(REFINE_STEPS):
            levels = _codes(w, scales, zeros, fmt).astype(np.float32) - zeros
            # With the codes fixed, the scale minimising Σ i (w - s·levels)² is Σ i·levels·w / Σ i·levels².
            numerator = (weights * levels * w).sum(-1, keepdims=True)
            denominator = (weights * levels * levels).sum(-1, keepdims=True)
            refit = np.divide(numerator, denominator, out=scales.copy(), where=denominator > 0)
            scales = np.where(refit * scales > 0, refit, scales).astype(np.float32)  # symmetric scales are negative
        error = (weights * ((_codes(w, scales, zeros, fmt).astype(np.float32) - zeros) * scales - w) ** 2).sum(
            -1, keepdims=True)
        if best_error is None:
            best_scales, best_zeros, best_error = scales, zeros, error
        else:
            better = error < best_error
            best_scales = np.where(better, scales, best_scales)
            best_zeros = np.where(better, zeros, best_zeros)
            best_error = np.minimum(error, best_error)
    return best_scales, best_zeros


def _gptq(weight: np.ndarray, fmt: BlockFormat, hessian: np.ndarray) -> QuantizedMatrix:
    k, n = weight.shape
    size = fmt.block_size
    blocks = -(-k // size)
    w = np.zeros((blocks * size, n), np.float64)  # rows are K: the walk goes down them
    w[:k] = weight
    h = np.zeros((blocks * size, blocks * size), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) <= 0  # an input that is always zero (or padding): its weights cannot matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices_from(h)] += GPTQ_DAMPING * np.mean(np.diag(h))
    # The upper Cholesky factor of H⁻¹ gives, row by row, how one row's error moves the rows after it.
    inverse = np.linalg.inv(h)
    inverse += inverse.T  # symmetric again after inv's rounding; in place: a 1B model's K² float64s are 512 MiB
    inverse /= 2
    u = np.linalg.cholesky(inverse).T
    del inverse
    importance = np.diag(h) / np.mean(np.diag(h))
    codes = np.zeros((n, blocks, size), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    for b in range(blocks):
        rows = slice(b * size, (b + 1) * size)
        block = w[rows].T.astype(np.float32)[:, None, :]  # [N, 1, size]
        grid_scales, grid_zeros = _searched_grid(block, fmt, importance[rows].astype(np.float32)[None, None, :])
        s, z = grid_scales[:, 0, 0].astype(np.float64), grid_zeros[:, 0, 0].astype(np.float64)
        scales[:, b], zeros[:, b] = s, z
        errors = np.zeros((size, n))
        for j in range(size):
            row = b * size + j
            c = np.clip(np.rint(w[row] / s + z), 0, fmt.levels - 1)
            codes[:, b, j] = c
            error = (w[row] - (c - z) * s) / u[row, row]
            w[row:(b + 1) * size] -= np.outer(u[row, row:(b + 1) * size], error)
            errors[j] = error
        w[(b + 1) * size:] -= u[rows, (b + 1) * size:].T @ errors
    return QuantizedMatrix(fmt, k, codes, scales, zeros)
