"""LoRA: low-rank adapters on a frozen model's projections (Hu et al., 2021, "LoRA").

    y = x·Wᵀ (+ b)  +  (alpha / rank) · dropout(x)·Aᵀ·Bᵀ        A [rank, in], B [out, rank]

W and b stay frozen; only A and B train and only they have optimizer state. B starts at zero, so training
starts from the base model exactly; A starts random (as nn.Linear's weights do), or every gradient of B
would be zero. The adapters are a sum beside W, so merging is W + (alpha / rank)·B·A, a plain weight:

- model.safetensors (what export reads) always holds the merged weights, a checkpoint like any other;
- the resume state keeps W, A and B apart (and A's and B's moments), so a resumed run is the run;
- adapter/ holds A and B alone in PEFT's layout (adapter_config.json + adapter_model.safetensors, keys named
  for the Hugging Face module paths), which transformers + PEFT load onto the Hugging Face folder that
  `edgegpt convert CHECKPOINT OUT` writes from the base checkpoint.

Written here rather than built on PEFT, which needs transformers and accelerate (and imports them), neither
of which the [train] extra carries; what that costs: docs/training.md#fine-tuning. An adapter is one small
module: a LoRALinear keeps the projection's own `weight` (and `bias`) parameters under their names, so the
state dict is the base checkpoint's plus `lora_A` and `lora_B` per adapted projection.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from edgegpt.checkpoint import save_weights
from edgegpt.convert.huggingface import _translate, is_gemma
from edgegpt.core.config import ModelConfig
from edgegpt.core.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from edgegpt.core.io import atomic_path, write_json_atomic
from edgegpt.model import GPT, state_dict_for_saving

# Which block module holds each projection.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class InputDropout(nn.Module):
    """Dropout on an adapter's input, one mask per input tensor: the projections that read the same input
    (q, k and v; gate and up) share one draw: 4 draws a layer instead of 7, and on a CPU drawing masks is a
    large share of a LoRA step. The last input and its dropped copy are held only
    until the layer's forward returns (forget_inputs), so nothing outlives the layer and a recomputed layer
    (gradient checkpointing, which restores the RNG) draws the same masks in the same order."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.last is not None and self.last[0] is x:
            return self.last[1]
        dropped = F.dropout(x, self.p, training=True)
        self.last = (x, dropped)
        return dropped


def forget_inputs(layer: nn.Module, args: object, output: object) -> None:
    """A layer's forward hook: its adapters' InputDropouts let go of the tensors of this pass."""
    for module in layer.modules():
        if isinstance(module, InputDropout):
            module.last = None


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias, plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: InputDropout) -> None:
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.scaling = alpha / rank
        out_features, in_features = base.weight.shape
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged_weight(self) -> Tensor:
        return (self.weight + self.scaling * (self.lora_B @ self.lora_A)).to(self.weight.dtype)


def add_adapters(model: GPT, rank: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Freeze every weight of `model` and put adapters on the `targets` projections of every layer (in place,
    from the torch seed); returns the number of trainable parameters."""
    model.requires_grad_(False)
    for layer in model.layers:
        shared = {"attn": InputDropout(dropout), "mlp": InputDropout(dropout)}  # q, k, v's input; gate and up's
        for name in targets:
            parent = layer.attn if name in _ATTENTION else layer.mlp
            reads_shared = name not in ("o_proj", "down_proj")
            drop = shared["attn" if name in _ATTENTION else "mlp"] if reads_shared else InputDropout(dropout)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, drop))
        layer.register_forward_hook(forget_inputs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapters(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Each adapted projection, by its module path (`layers.0.attn.q_proj`)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merged_weights(model: GPT) -> dict[str, Tensor]:
    """The weights a plain checkpoint of the model stores, the adapters merged into their projections."""
    with torch.no_grad():
        weights = state_dict_for_saving(model)
        for name, module in adapters(model):
            weights[f"{name}.weight"] = module.merged_weight().detach().contiguous()
            del weights[f"{name}.lora_A"], weights[f"{name}.lora_B"]
    return weights


def save_merged_weights(path: Path, model: GPT) -> None:
    """model.safetensors with the adapters merged: a model holding the merged tensors is saved as any model is."""
    save_weights(path, GPT.holding(model.cfg, merged_weights(model)))


def peft_name(name: str, cfg: ModelConfig, matrix: str) -> str:
    """The key PEFT gives `matrix` (lora_A or lora_B) of the adapter at module path `name` in its
    causal-LM wrapper: base_model.model + the Hugging Face module path + .lora_A.weight."""
    hf_module = _translate(f"{name}.weight", to_hf=True, gemma=is_gemma(cfg)).removesuffix(".weight")
    return f"base_model.model.{hf_module}.{matrix}.weight"


def save_adapter(directory: Path, model: GPT, rank: int, alpha: float, dropout: float, targets: list[str],
                 base: str) -> None:
    """The adapters alone, as PEFT saves a LoRA adapter for a causal LM (`PeftModel.from_pretrained(model,
    directory)` loads them onto the Hugging Face form of `base`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in adapters(model):
        for matrix in ("lora_A", "lora_B"):
            tensors[peft_name(name, model.cfg, matrix)] = getattr(module, matrix).detach().float().contiguous().cpu()
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # how safetensors reports a failed write (a full disk): an I/O error
            raise OSError(str(e)) from None
    write_json_atomic(directory / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    })
