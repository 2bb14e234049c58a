"""What quantization learns from calibration text, by running the PyTorch model over it once.

    inputs   Σ xᵀx over every token, for each projection's input x [K]: its diagonal is the importance
             of each input channel (blockquant's "search" rounding), the whole matrix is GPTQ's Hessian.
    fisher   Σ over windows of (∂ loss / ∂ W)², the diagonal Fisher information of every projection weight:
             ½ Σ F·(W - Ŵ)² estimates how much quantizing W to Ŵ raises the loss (the auto plan's
             sensitivity; the same second-order estimate HAWQ and OBD use).

Both are keyed by the graph's weight initializer names (export/fused.py names them after the PyTorch
parameters; Q, K and V packed as `layers.i.attn.qkv_proj.weight` share one input) and laid out as the
graph stores the weight: [K, N].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgegpt.model import GPT

CALIBRATION_WINDOW = 512  # tokens per forward; the statistics need many tokens, not long contexts


@dataclass
class Calibration:
    tokens: int
    source: str
    # graph weight name -> float64 Σ xᵀx [K, K], or only its diagonal [K] when no GPTQ needs the whole
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)  # graph weight name -> float32 [K, N]

    def importance(self, name: str) -> np.ndarray | None:
        xtx = self.inputs.get(name)
        if xtx is None:
            return None
        return (xtx if xtx.ndim == 1 else np.diag(xtx)) / max(self.tokens, 1)

    def hessian(self, name: str) -> np.ndarray | None:
        """GPTQ's Σ xᵀx for the weight, or None when it was not kept (calibrate(hessians=False))."""
        xtx = self.inputs.get(name)
        return xtx if xtx is not None and xtx.ndim == 2 else None


def module_of(weight_name: str) -> str | None:
    """The PyTorch Linear whose input feeds the graph weight `weight_name` (None: not a projection)."""
    name = weight_name.removesuffix(".transposed").removesuffix(".weight")
    if name.endswith(".qkv_proj"):
        return name.removesuffix(".qkv_proj") + ".q_proj"
    return name if name.rsplit(".", 1)[-1].endswith("_proj") else None


def _parts(weight_name: str) -> list[str]:
    """The PyTorch Linears a graph weight holds (three for a packed QKV)."""
    name = weight_name.removesuffix(".transposed").removesuffix(".weight")
    if name.endswith(".qkv_proj"):
        return [name.removesuffix(".qkv_proj") + f".{p}_proj" for p in "qkv"]
    return [name] if module_of(weight_name) else []


def _graph_layout(weight_name: str, per_module: dict[str, torch.Tensor]) -> np.ndarray | None:
    """A [N, K] PyTorch-layout statistic as the graph stores the weight: [K, N] (Q, K, V concatenated)."""
    parts = [per_module.get(name) for name in _parts(weight_name)]
    if not parts or any(p is None for p in parts):
        return None
    return torch.cat(parts, dim=0).T.numpy()


def calibrate(model: GPT, tokens: np.ndarray, source: str, weight_names: list[str], *, fisher: bool,
              progress: Callable[[int, int], None] | None = None, hessians: bool = True) -> Calibration:
    """Run `model` over `tokens` in windows of CALIBRATION_WINDOW; statistics for `weight_names`.

    hessians: keep each projection's whole Σ xᵀx (GPTQ's Hessian: K² float64 values per projection, more
    than the weights themselves for a wide MLP) rather than only its diagonal, the importance the "search"
    rounding reads."""
    wanted = {module_of(n) for n in weight_names} - {None}
    graded = {m for n in weight_names for m in _parts(n)} if fisher else set()
    modules = {n: m for n, m in model.named_modules() if n in wanted | graded}
    sums: dict[str, torch.Tensor] = {}
    squared_grads: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            product = (x.T @ x).double() if hessians else (x * x).sum(dim=0).double()
            sums[name] = sums[name] + product if name in sums else product
        return hook

    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, m in modules.items() if n in wanted]
    was_training = model.training
    model.eval()
    windows = [tokens[i : i + CALIBRATION_WINDOW + 1] for i in range(0, len(tokens) - 1, CALIBRATION_WINDOW)]
    windows = [w for w in windows if len(w) > 1]
    counted = 0
    try:
        for done, window in enumerate(windows, 1):
            ids = torch.from_numpy(np.asarray(window, np.int64))[None]
            counted += ids.shape[1] - 1
            if fisher:
                model.zero_grad(set_to_none=True)
                logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:], reduction="mean")
                loss.backward()
                for name in graded:
                    g = modules[name].weight.grad.detach() ** 2
                    squared_grads[name] = squared_grads[name] + g if name in squared_grads else g
            else:
                with torch.no_grad():
                    model(ids[:, :-1])
            if progress:
                progress(done, len(windows))
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    calibration = Calibration(tokens=counted, source=source)
    for weight in weight_names:
        module = module_of(weight)
        if module in sums:
            calibration.inputs[weight] = sums[module].numpy()
        if fisher:
            stat = _graph_layout(weight, squared_grads)
            if stat is not None:
                calibration.fisher[weight] = stat.astype(np.float32)
    return calibration
