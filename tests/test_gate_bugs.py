"""The float32 gate against export bugs: each bug below is injected into what the exporter emits (the
fused graph's file, or the rotary tables export/fused.py computes), the exported package runs through
the runtime, and the gate must refuse it; the real export of the same checkpoints must pass.

The bugs are the ones an exporter of this architecture actually makes: the rotary base read from the
wrong place, K and V swapped in the packed projection, the cache position off by one (seqlens_k given as
the total length instead of total - 1, the op's documented convention), a norm exported without its
weight. The float32 tolerance is relative (export/verify.py), so these tests are what keeps it honest:
a looser metric would let one of them through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edgegpt.export import GateFailed, export_package
from edgegpt.export.verify import FLOAT32_TOLERANCE

# -- the injected bugs: each edits the fused graph's ModelProto in place, or patches fused.py's input --


def _initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    (tensor,) = [t for t in proto.graph.initializer if t.name == name]
    return tensor


def _replace(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _initializer(proto, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def swap_k_and_v(proto: onnx.ModelProto, cfg) -> None:
    """Every layer's K and V projections trade places (columns of the packed QKV weight and bias, or the
    two separate weights)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    names = {t.name for t in proto.graph.initializer}
    for i in range(cfg.n_layers):
        prefix = f"layers.{i}.attn"
        for suffix in ("weight", "bias"):
            packed = f"{prefix}.qkv_proj.{suffix}"
            if packed in names:
                w = numpy_helper.to_array(_initializer(proto, packed))
                k, v = w[..., q : q + kv].copy(), w[..., q + kv :].copy()
                _replace(proto, packed, np.concatenate([w[..., :q], v, k], axis=-1))
            elif f"{prefix}.k_proj.{suffix}" in names:
                k = numpy_helper.to_array(_initializer(proto, f"{prefix}.k_proj.{suffix}"))
                v = numpy_helper.to_array(_initializer(proto, f"{prefix}.v_proj.{suffix}"))
                _replace(proto, f"{prefix}.k_proj.{suffix}", v)
                _replace(proto, f"{prefix}.v_proj.{suffix}", k)


def position_off_by_one(proto: onnx.ModelProto, cfg) -> None:
    """GroupQueryAttention gets seqlens_k + 1: the total length where the op wants total - 1, so each new
    token sits one position later than PyTorch puts it and attends to one slot too many."""
    one = numpy_helper.from_array(np.array([1], np.int32), "bug.one")
    proto.graph.initializer.append(one)
    shifted = "bug.seqlens_k_plus_one"
    proto.graph.node.insert(0, helper.make_node("Add", ["seqlens_k", one.name], [shifted], name="/bug/Add"))
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[node.input[:].index("seqlens_k")] = shifted


def missing_norm_weight(proto: onnx.ModelProto, cfg) -> None:
    """The final RMSNorm exported without its learned scale (all ones)."""
    w = numpy_helper.to_array(_initializer(proto, "norm.weight"))
    _replace(proto, "norm.weight", np.ones_like(w))


GRAPH_BUGS: dict[str, Callable[[onnx.ModelProto, object], None]] = {
    "swapped K and V": swap_k_and_v,
    "position off by one": position_off_by_one,
    "missing norm weight": missing_norm_weight,
}


def wrong_theta_rotary_caches(rotary, max_len: int, factor: float = 10.0):
    """fused.rotary_caches as it would be with rope_theta read wrong (factor times the config's): theta^(-2j/D)
    becomes (factor · theta)^(-2j/D)."""
    pairs = rotary.inv_freq.numel()
    inv_freq = rotary.inv_freq * factor ** (-torch.arange(pairs, dtype=torch.float32) / pairs)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def inject(monkeypatch, bug: str) -> None:
    """Make the next export_package emit its fused graph with `bug`."""
    import edgegpt.export.fused as fused
    import edgegpt.export.package as package

    if bug == "wrong rotary theta":
        monkeypatch.setattr(fused, "rotary_caches", wrong_theta_rotary_caches)
        return
    original = package.build_graph

    def build_with_bug(model, path, fuse, precision):
        contract = original(model, path, fuse, precision)
        proto = onnx.load_model(str(path))
        GRAPH_BUGS[bug](proto, model.cfg)
        onnx.save_model(proto, str(path))
        return contract

    monkeypatch.setattr(package, "build_graph", build_with_bug)


BUGS = ["wrong rotary theta", *GRAPH_BUGS]


# -- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", BUGS)
def test_the_float32_gate_fails_an_injected_export_bug(tiny_checkpoint, tmp_path, monkeypatch, bug):
    inject(monkeypatch, bug)
    with pytest.raises(GateFailed, match="float32 graph") as failed:
        export_package(tiny_checkpoint, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    verification = failed.value.report.verification
    # Not a near miss: every injected bug lands orders of magnitude above the limit (export/verify.py).
    assert verification.relative_error > 100 * FLOAT32_TOLERANCE, verification.to_dict()


def test_the_real_exports_pass_with_room(tiny_package, plain_package):
    import json

    for package in (tiny_package, plain_package):
        verification = json.loads((Path(package) / "manifest.json").read_text())["verification"]
        assert verification["passed"] and verification["metric"] == "max |Δ log-probability| / max |logit|"
        assert verification["relative_error"] < FLOAT32_TOLERANCE / 10, verification
