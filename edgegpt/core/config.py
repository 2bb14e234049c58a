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
OPTIONAL_FIELDS = frozenset({"qkv_bias"})


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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgeGPTError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise EdgeGPTError(f"config: {name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeGPTError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise EdgeGPTError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise EdgeGPTError(f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise EdgeGPTError(f"config: head_dim {self.head_dim} must be even for rotary embeddings")

    def num_parameters(self) -> int:
        """Parameter count without building the model (tied head counted once)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * self.ffn_dim + 2 * d
        per_layer += (d + 2 * kv) if self.qkv_bias else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
