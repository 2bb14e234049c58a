"""What quantization learns from calibration text, by running the PyTorch model over it.

    inputs   Σ xᵀx over every token, for each projection's input x [K]: its diagonal is the importance
             of each input channel (blockquant's "search" rounding), the whole matrix is GPTQ's Hessian.
    fisher   Σ over windows of (∂ loss / ∂ W)², the diagonal Fisher information of every projection weight:
             ½ Σ F·(W - Ŵ)² estimates how much quantizing W to Ŵ raises the loss (the auto plan's
             sensitivity; the same second-order estimate HAWQ and OBD use).

Both are keyed by the graph's weight initializer names (export/fused.py names them after the PyTorch
parameters; Q, K and V packed as `layers.i.attn.qkv_proj.weight` share one input) and laid out as the
graph stores the weight: [K, N].

GPTQ's Hessians are K² values per projection, more than the weights for a wide MLP (a 1B model's 16 down
projections, K = 8192: 4 GiB in float32), so without Fisher information they are gathered a group of layers
at a time, as the quantizer asks for them (it walks the layers in order): each group's pass runs the model
only up to the group's last layer and holds only its own Hessians (HESSIAN_BUDGET).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgegpt.model import GPT

CALIBRATION_WINDOW = 512  # tokens per forward; the statistics need many tokens, not long contexts
# The Hessians held at once, as a fraction of the model's float32 weight bytes (at least one layer's): half
# keeps export --quantize --bits 4 within 3x the weights with the PyTorch model beside them, in two or three
# passes for a 1B model and one for a small one.
HESSIAN_BUDGET = 0.5


@dataclass
class Calibration:
    tokens: int
    source: str
    # graph weight name -> float64 Σ xᵀx [K, K], or only its diagonal [K] when no GPTQ needs the whole
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)  # graph weight name -> float32 [K, N]
    # Hessians still to gather, a group of layers per call: weight name -> the loader of its group
    pending: dict[str, Callable[[], dict[str, np.ndarray]]] = field(default_factory=dict, repr=False)

    def _statistic(self, name: str) -> np.ndarray | None:
        if name not in self.inputs and name in self.pending:
            self.inputs = {}  # the group before is dropped first: one group's Hessians are held at a time
            self.inputs = self.pending[name]()
        return self.inputs.get(name)

    def importance(self, name: str) -> np.ndarray | None:
        xtx = self._statistic(name)
        if xtx is None:
            return None
        return (xtx if xtx.ndim == 1 else np.diag(xtx)) / max(self.tokens, 1)

    def hessian(self, name: str) -> np.ndarray | None:
        """GPTQ's Σ xᵀx for the weight, or None when it was not kept (calibrate(hessians=False))."""
        xtx = self._statistic(name)
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
    """Statistics for `weight_names` from `model` run over `tokens` in windows of CALIBRATION_WINDOW.

    hessians: keep each projection's whole Σ xᵀx (GPTQ's Hessian) rather than only its diagonal, the importance
    the "search" rounding reads. Without Fisher information they are gathered later, a group of layers per
    pass, when the quantizer first asks for one of the group's (module docstring); progress then counts the
    first group's pass."""
    windows = [tokens[i : i + CALIBRATION_WINDOW + 1] for i in range(0, len(tokens) - 1, CALIBRATION_WINDOW)]
    windows = [np.asarray(w, np.int64) for w in windows if len(w) > 1]
    calibration = Calibration(tokens=sum(len(w) - 1 for w in windows), source=source)
    if hessians and not fisher:
        groups = hessian_groups(model, weight_names)
        for group in groups:
            def gather(group=group, report=progress if group is groups[0] else None) -> dict[str, np.ndarray]:
                return _gather(model, windows, group, fisher=False, hessians=True, progress=report)[0]
            for name in group:
                calibration.pending[name] = gather
        calibration.inputs = calibration.pending[groups[0][0]]() if groups else {}
        return calibration
    calibration.inputs, calibration.fisher = _gather(model, windows, weight_names, fisher, hessians, progress)
    return calibration


def hessian_groups(model: GPT, weight_names: list[str]) -> list[list[str]]:
    """`weight_names` (projections) in groups of whole, consecutive layers whose Hessians fit HESSIAN_BUDGET."""
    modules = dict(model.named_modules())
    budget = HESSIAN_BUDGET * 4 * sum(p.numel() for p in model.parameters())
    by_layer: dict[int, list[str]] = {}
    for name in weight_names:
        if module_of(name) in modules:
            by_layer.setdefault(_layer_of(name), []).append(name)
    groups: list[list[str]] = []
    held = budget  # starts a group at the first layer
    for layer in sorted(by_layer):
        size = sum(4 * modules[module_of(n)].in_features ** 2 for n in by_layer[layer])
        if held + size > budget:
            groups.append([])
            held = 0
        groups[-1].extend(by_layer[layer])
        held += size
    return groups


def _layer_of(weight_name: str) -> int:
    parts = weight_name.split(".")
    return int(parts[1]) if parts[0] == "layers" and parts[1].isdigit() else -1


class _GroupDone(Exception):
    """Raised past a group's last layer: the layers after it, and the LM head, need not run."""


def _gather(model: GPT, windows: list[np.ndarray], weight_names: list[str], fisher: bool, hessians: bool,
            progress: Callable[[int, int], None] | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass over `windows`: ({weight: Σ xᵀx or its diagonal}, {weight: Fisher diagonal} when fisher)."""
    wanted = {module_of(n) for n in weight_names} - {None}
    graded = {m for n in weight_names for m in _parts(n)} if fisher else set()
    modules = {n: m for n, m in model.named_modules() if n in wanted | graded}
    sums: dict[str, torch.Tensor] = {}
    squared_grads: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            # float32 sums: what GPTQ's solver reads, at half the bytes of float64
            product = x.T @ x if hessians else (x * x).sum(dim=0).double()
            sums[name] = sums[name] + product if name in sums else product
        return hook

    def stop(module, args, output):
        raise _GroupDone

    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, m in modules.items() if n in wanted]
    last_layer = max((_layer_of(n) for n in weight_names), default=-1)
    if not fisher and 0 <= last_layer < len(model.layers) - 1:
        hooks.append(model.layers[last_layer].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        for done, window in enumerate(windows, 1):
            ids = torch.from_numpy(window)[None]
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
                    try:
                        model.hidden_states(ids[:, :-1])
                    except _GroupDone:
                        pass
            if progress:
                progress(done, len(windows))
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    inputs, fisher_stats = {}, {}
    for weight in weight_names:
        module = module_of(weight)
        if module in sums:
            inputs[weight] = sums[module].numpy()
        if fisher:
            stat = _graph_layout(weight, squared_grads)
            if stat is not None:
                fisher_stats[weight] = stat.astype(np.float32)
    return inputs, fisher_stats
