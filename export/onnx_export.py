"""The plain torch.onnx export: the portable reference graph and the oracle fused graphs are tested against.

    input_ids [batch, sequence] ─┐
    attention_mask [batch, total_sequence] ─┼─► GPT.forward_cached ─► logits [batch, sequence, vocab]
    past_key.{i} / past_value.{i} ─┘                               └─► present_key.{i} / present_value.{i}
        [batch, n_kv_heads, past_sequence, head_dim]                    [batch, n_kv_heads, total_sequence, head_dim]

The cache layout is "concat": present = past ++ new, so total_sequence = past_sequence + sequence.
`graph_contract` states that interface once; config.json publishes it and `check_contract` holds the
exported graph to it, so the runtime can trust the file rather than the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from onnx.external_data_helper import uses_external_data
from torch import Tensor, nn
from torch.export import Dim

from edgegpt.core.config import ModelConfig
from edgegpt.export.external_data import data_path, save_model
from edgegpt.model import GPT

# Pinned rather than torch's default so a torch upgrade cannot silently move the graph to an opset (or
# IR version) that the onnxruntime builds apps ship with do not accept yet.
OPSET = 20
MAX_IR_VERSION = 10

KV_NAMES = {
    "past_key": "past_key.{layer}",
    "past_value": "past_value.{layer}",
    "present_key": "present_key.{layer}",
    "present_value": "present_value.{layer}",
}


def graph_contract(cfg: ModelConfig) -> dict[str, Any]:
    """The graph's inputs and outputs as docs/FORMATS.md fixes them (the `graph` block of config.json)."""
    kv = lambda length: {"dtype": "float32", "shape": ["batch", cfg.n_kv_heads, length, cfg.head_dim]}  # noqa: E731
    inputs: dict[str, Any] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "total_sequence"]},
    }
    outputs: dict[str, Any] = {"logits": {"dtype": "float32", "shape": ["batch", "sequence", cfg.vocab_size]}}
    for i in range(cfg.n_layers):
        inputs[f"past_key.{i}"] = inputs[f"past_value.{i}"] = kv("past_sequence")
        outputs[f"present_key.{i}"] = outputs[f"present_value.{i}"] = kv("total_sequence")
    return {"kv_layout": "concat", "dtype": "float32", "inputs": inputs, "outputs": outputs, **KV_NAMES}


class CachedForward(nn.Module):
    """forward_cached with flat tensor outputs, in the order the graph's outputs are named."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past: list[tuple[Tensor, Tensor]]):
        logits, present = self.model.forward_cached(input_ids, past, attention_mask)
        return (logits, *[t for key_value in present for t in key_value])


def example_inputs(cfg: ModelConfig) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    # Batch and sequence are 2+ because torch.export turns a size-1 sample dimension into a constant
    # (ONNX-NOTES); the past is nonzero so the concat path is traced with real data.
    batch, seq, past_len = 2, 3, 4
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    shape = (batch, cfg.n_kv_heads, past_len, cfg.head_dim)
    past = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layers)]
    return ids, mask, past


def dynamic_shapes(cfg: ModelConfig) -> dict[str, Any]:
    batch, seq, past_len = Dim("batch"), Dim("sequence"), Dim("past_sequence", min=0)
    # The mask length is sequence + past_sequence, but Dims cannot be added: leave it to the tracer.
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},
        "past": [({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(cfg.n_layers)],
    }


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Capture torch.onnx's progress prints, warnings and log lines; replay them only if the export fails."""
    captured = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("always")
            try:
                yield captured
            finally:
                for w in caught:
                    captured.write(f"{w.category.__name__}: {w.message}\n")
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_plain_onnx(model: GPT, path: Path) -> None:
    """Export `model.forward_cached` to one self-contained ONNX file at `path` (graph per graph_contract)."""
    cfg = model.cfg
    contract = graph_contract(cfg)
    was_training = model.training
    try:  # eval mode, or dropout would be traced into the graph
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                CachedForward(model).eval(),
                example_inputs(cfg),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(cfg),
                input_names=list(contract["inputs"]),
                output_names=list(contract["outputs"]),
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
    finally:
        model.train(was_training)
    proto = program.model_proto
    name_dims(proto, contract)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    check_contract(proto, contract)
    path = Path(path)
    del program  # its tensors, beside the proto's copy
    save_model(proto, path)  # a large graph keeps its weights in model.onnx.data (export/external_data.py)
    del proto
    onnx.checker.check_model(str(path))  # by path: the checker refuses an in-memory model over 2 GB
    check_self_contained(path)


def name_dims(proto: onnx.ModelProto, contract: dict[str, Any]) -> None:
    """Rename the tracer's symbols (`s53`, `past_sequence + sequence`) to the contract's axis names."""
    rename: dict[str, str] = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        spec = contract["inputs"].get(value.name) or contract["outputs"].get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec["shape"]):
            if isinstance(want, str) and dim.dim_param and dim.dim_param != want:
                rename[dim.dim_param] = want
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


_DTYPES = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
}


def check_contract(proto: onnx.ModelProto, contract: dict[str, Any]) -> None:
    """Raise if the graph's inputs/outputs differ from the contract in name, order, dtype or shape."""
    for kind, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        found = {}
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            found[value.name] = {"dtype": _DTYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": shape}
        if found != contract[kind] or list(found) != list(contract[kind]):
            raise RuntimeError(f"exported graph {kind} do not match the package contract: {found}")


def check_self_contained(path: Path) -> None:
    """Raise if the saved model points at external data anywhere but its own data file beside it
    (export/external_data.py): a package must stay relocatable."""
    proto = onnx.load_model(str(path), load_external_data=False)
    allowed = data_path(Path(path)).name
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)
                and any(e.key == "location" and e.value != allowed for e in t.external_data)]
    if external:
        raise RuntimeError(f"{path} stores {len(external)} tensors as external data outside {allowed} "
                           f"(e.g. {external[0]})")


@dataclass(frozen=True)
class GraphInfo:
    opset: int
    ir_version: int
    census: dict[str, int]  # node count by op type, most common first

    @property
    def op_count(self) -> int:
        return sum(self.census.values())


def describe_graph(path: Path) -> GraphInfo:
    proto = onnx.load_model(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    census = Counter(node.op_type for node in proto.graph.node)
    return GraphInfo(opset=opset, ir_version=proto.ir_version, census=dict(census.most_common()))
