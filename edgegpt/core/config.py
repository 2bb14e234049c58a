"""Model hyperparameters and the named presets.

One dataclass, saved as `config.json` beside the weights. Kept torch-free so the CLI's `info` and the
runtime can read a config without importing the training stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegpt.core.errors import EdgeGPTError

# Fields added after config.json's format was fixed: a file without them takes the dataclass default.
OPTIONAL_FIELDS = frozenset({
    "qkv_bias", "head_dim", "qk_norm", "rope_scaling", "post_norms", "activation", "embed_scale",
    "query_pre_attn_scalar", "sliding_window", "layer_types", "rope_local_theta", "attn_softcap", "final_softcap",
})

ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")

ROPE_SCALING_TYPES = ("llama3",)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x's rotary scaling (Hugging Face's `rope_scaling` with `rope_type: llama3`).

    Each rotary frequency is kept, divided by `factor`, or blended between the two, by how its wavelength
    compares with the context the model was first trained on (edgegpt.model.llama3_inverse_frequencies):
    wavelengths shorter than original_max_len / high_freq_factor keep their frequency, those longer than
    original_max_len / low_freq_factor are slowed down `factor` times.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise EdgeGPTError(f"config: rope_scaling type {self.rope_type!r} is not supported "
                               f"(edgegpt knows {', '.join(ROPE_SCALING_TYPES)})")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise EdgeGPTError(f"config: rope_scaling {name} must be a positive number, got {value!r}")
        if not _positive_int(self.original_max_len):
            raise EdgeGPTError(f"config: rope_scaling original_max_len must be a positive integer, "
                               f"got {self.original_max_len!r}")
        if not self.high_freq_factor > self.low_freq_factor:
            # the blend divides by their difference
            raise EdgeGPTError("config: rope_scaling high_freq_factor must be larger than low_freq_factor")

    @classmethod
    def from_dict(cls, data: Any) -> "RopeScaling":
        if not isinstance(data, dict):
            raise EdgeGPTError(f"config: rope_scaling must be an object or null, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(data.keys() - names), sorted(names - data.keys() - {"rope_type"})
        if unknown or missing:
            raise EdgeGPTError(f"config: rope_scaling has {'unknown' if unknown else 'no'} keys "
                               f"{', '.join(unknown or missing)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-compatible decoder: the same fields a Hugging Face `LlamaConfig` needs."""

    vocab_size: int = 1024
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    # Fewer KV heads than query heads (GQA) shrinks the cache the runtime carries per token.
    n_kv_heads: int = 3
    # SwiGLU hidden width; ~2.7x dim keeps the MLP's parameter count near a 4x GELU MLP.
    ffn_dim: int = 512
    # Context length: the KV cache is preallocated to this and rotary tables cover it.
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # A compact model spends a large share of its parameters on the embedding; tying it to the LM
    # head halves that cost.
    tie_embeddings: bool = True
    # Biases on the Q, K and V projections: off for Llama (and everything edgegpt trains), on for the
    # Qwen2 family, which is otherwise Llama's architecture. Added after the other fields, so it is optional
    # in config.json: checkpoints written before it existed load unchanged.
    qkv_bias: bool = False
    # Width of one attention head. None (Llama, and every preset) means dim // n_heads, and is replaced by
    # that value when the config is built, so `cfg.head_dim` is always a number (to_dict writes null again).
    # Qwen3 and Gemma 3 choose it on its own (Qwen3-0.6B: dim 1024, 16 heads of 128). Changing dim or n_heads
    # with dataclasses.replace keeps the old number: pass head_dim=None with them (`preset` does).
    head_dim: int | None = None
    # Qwen3's per-head RMSNorm of the queries and keys (weights [head_dim]), after the projections and
    # before the rotary.
    qk_norm: bool = False
    # Llama 3.x's rotary scaling; None: plain rotary with rope_theta. With rope_local_theta set it applies to
    # the full-attention layers only, as Gemma 3 scales its global rotary alone.
    rope_scaling: RopeScaling | None = None
    # Gemma 3 ------------------------------------------------------------------------------------------------
    # Gemma's norms multiply by (1 + w); edgegpt stores that sum as the weight when it converts (as llama.cpp's
    # GGUF files do), so every RMSNorm here multiplies by its weight and no field is needed for it.
    # A second RMSNorm on the attention's and the MLP's outputs before each residual add ("sandwich" norms:
    # post_attn_norm, post_mlp_norm), and the MLP's input norm is still mlp_norm.
    post_norms: bool = False
    # The gated MLP's activation: "silu" (SwiGLU, Llama/Qwen) or "gelu_tanh" (GeGLU with GELU's tanh form, Gemma).
    activation: str = "silu"
    # Embeddings multiplied by sqrt(dim) (rounded to the weights' dtype first, as Gemma's reference does).
    embed_scale: bool = False
    # Attention scores scaled by query_pre_attn_scalar^-1/2 rather than head_dim^-1/2 (Gemma); None: head_dim's.
    query_pre_attn_scalar: float | None = None
    # Sliding-window attention: a query at position p sees keys p - sliding_window < k <= p (sliding_window keys,
    # itself included). Which layers slide: layer_types, one "full_attention" / "sliding_attention" per layer
    # (Gemma 3: five sliding, one full); None with a window means every layer slides (Mistral's original form).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # Rotary base of the sliding layers (Gemma 3: 10,000 beside the full layers' 1,000,000); None: rope_theta.
    rope_local_theta: float | None = None
    # Soft-capping, cap * tanh(x / cap): of the attention scores before the softmax, and of the final logits.
    attn_softcap: float | None = None
    final_softcap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # as config.json holds it
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if isinstance(self.layer_types, list):  # as config.json holds it
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.head_dim is None and _positive_int(self.dim) and _positive_int(self.n_heads):
            if self.dim % self.n_heads:
                raise EdgeGPTError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()  # (a dim or n_heads that is not a number is reported here)

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len", "head_dim"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise EdgeGPTError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise EdgeGPTError(f"config: {name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeGPTError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise EdgeGPTError(f"config: rope_scaling must be an object or null, got {self.rope_scaling!r:.80}")
        if self.n_heads % self.n_kv_heads:
            raise EdgeGPTError(f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise EdgeGPTError(f"config: head_dim {self.head_dim} must be even for rotary embeddings")
        self._validate_gemma_fields()

    def _validate_gemma_fields(self) -> None:
        if not isinstance(self.post_norms, bool) or not isinstance(self.embed_scale, bool):
            raise EdgeGPTError("config: post_norms and embed_scale must be true or false")
        if self.activation not in ACTIVATIONS:
            raise EdgeGPTError(f"config: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("query_pre_attn_scalar", "rope_local_theta", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
                raise EdgeGPTError(f"config: {name} must be a positive number or null, got {value!r}")
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise EdgeGPTError(f"config: sliding_window must be a positive integer or null, "
                               f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.n_layers:
                raise EdgeGPTError(f"config: layer_types must list one type for each of the {self.n_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise EdgeGPTError(f"config: layer_types has {unknown[0]!r}; a layer is one of "
                                   f"{', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise EdgeGPTError("config: layer_types has sliding layers but sliding_window is null")
        if self.sliding_window is not None and self.sliding_window > self.max_len:
            raise EdgeGPTError(f"config: sliding_window {self.sliding_window} is larger than the context "
                               f"max_len {self.max_len}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within sliding_window positions only."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_sliding(i))

    @property
    def local_rotary(self) -> bool:
        """Whether the sliding layers have a rotary of their own (rope_local_theta, unscaled)."""
        return self.rope_local_theta is not None and bool(self.sliding_layers)

    def num_parameters(self) -> int:
        """Parameter count without building the model (tied head counted once)."""
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = d * q * 2 + d * kv * 2 + 3 * d * self.ffn_dim + (4 if self.post_norms else 2) * d
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        """config.json's content. head_dim is null when it is dim // n_heads, so a file edited to another dim or
        n_heads derives it again rather than keeping a stale one."""
        data = dataclasses.asdict(self)
        if self.layer_types is not None:
            data["layer_types"] = list(self.layer_types)
        if self.head_dim * self.n_heads == self.dim:
            data["head_dim"] = None
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise EdgeGPTError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - data.keys() - OPTIONAL_FIELDS)
        if missing:
            raise EdgeGPTError(f"{source}: missing keys {', '.join(missing)}")
        try:
            return cls(**{k: data[k] for k in fields if k in data})
        except EdgeGPTError as e:
            raise EdgeGPTError(f"{source}: {str(e).removeprefix('config: ')}") from None

    def save(self, path: Path) -> None:
        from edgegpt.core.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        from edgegpt.core.io import read_json

        return cls.from_dict(read_json(path), source=str(path))


PRESETS: dict[str, ModelConfig] = {
    # ~0.9M parameters: for tests, trains in seconds.
    "nano": ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_len=256),
    # ~2.8M: the laptop default. On 2 CPU cores this width/depth reaches its best validation loss within
    # the default time budget; a wider model learns more per step but takes too few steps to catch up
    # (docs/benchmarks.md, training quality).
    "micro": ModelConfig(vocab_size=1024, dim=192, n_layers=6, n_heads=6, n_kv_heads=3, ffn_dim=512, max_len=256),
    # ~30M: for a GPU or a patient laptop.
    "small": ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_len=1024),
    # The SmolLM2-135M shape, so its weights convert losslessly.
    "base": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_len=2048,
        rope_theta=100000.0,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise EdgeGPTError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes.keys() & {"dim", "n_heads"} and "head_dim" not in changes:
        changes["head_dim"] = None  # derived again from the new shape, not kept from the preset's
    return dataclasses.replace(PRESETS[name], **changes)
