"""Weight quantization of an exported graph: dynamic int8 via onnxruntime.quantization.

    MatMul(x, W)  ─►  DynamicQuantizeLinear(x) ─► MatMulInteger(x_u8, W_s8) ─► Cast ─► Mul(scale_x · scale_W)

Weights are int8 with one scale per output channel; activations are quantized to uint8 per call, per
tensor (that is what "dynamic" means: no calibration data). onnxruntime fuses the chain into
DynamicQuantizeMatMul when it loads the graph.

Policy for the tied embedding / LM head (one [vocab, dim] matrix in PyTorch):
- LM head: quantized. torch.onnx emits it as MatMul(x, Transpose(embed.weight)) and the quantizer only
  touches a MatMul whose weight is an initializer, so `materialize_transposed_weights` first gives the
  head its own pre-transposed [dim, vocab] initializer. Per-channel then means one scale per vocab
  entry, which keeps rare tokens' logits from being crushed by the largest row's range.
- Embedding (Gather): kept in float32. A lookup does no arithmetic, so int8 would save bytes but no
  time, and quantize_dynamic quantizes a Gather's table per tensor (one uint8 scale for the whole
  table), which puts its error into every token's input. Measured on the test suite's tiny trained
  nano model: quantizing the Gather too shrank the file from 0.40x to 0.35x of float32 but doubled
  max |Δlogits| (0.13 -> 0.27) and cut greedy agreement with PyTorch from 88% to 59%. The price is
  vocab·dim·4 bytes, which grows with the vocabulary (45% of an int8 `base` file); a block-wise
  quantized embedding (GatherBlockQuantized) is the way to win it back.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgegpt.export.onnx_export import MAX_IR_VERSION, quiet

# Settings recorded in the manifest; quantize_int8 passes exactly these to quantize_dynamic.
INT8_SETTINGS: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "activation_type": "QUInt8 (dynamic, per tensor)",
    "per_channel": True,
    "reduce_range": False,
    "op_types": ["MatMul"],
    "embedding": "float32",
    "lm_head": "int8 (own transposed copy of the tied embedding)",
}


def materialize_transposed_weights(proto: onnx.ModelProto) -> list[str]:
    """Replace MatMul(x, Transpose(W_initializer)) by MatMul(x, W^T) with W^T stored as its own initializer.

    Returns the names of the MatMul nodes rewritten. The original W stays for its other users (the
    embedding's Gather); a Transpose left without consumers is removed.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    rewritten = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{transpose.input[0]}.transposed"
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(initializers[name])
        node.input[1] = name
        rewritten.append(node.name)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    return rewritten


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 weight quantization of the float32 graph at `src`, written to `dst` (one file).

    Returns the settings for the manifest.
    """
    proto = onnx.load_model(str(src))
    materialize_transposed_weights(proto)
    with tempfile.TemporaryDirectory(prefix="edgegpt-quantize-", dir=Path(dst).parent) as tmp:
        untied = Path(tmp) / "untied.onnx"
        onnx.save_model(proto, str(untied))
        del proto
        # quantize_dynamic logs advice ("consider pre-processing") through the root logger.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            with quiet():
                quantize_dynamic(
                    untied,
                    dst,
                    op_types_to_quantize=INT8_SETTINGS["op_types"],
                    per_channel=INT8_SETTINGS["per_channel"],
                    reduce_range=INT8_SETTINGS["reduce_range"],
                    weight_type=QuantType.QInt8,
                )
        finally:
            root.setLevel(level)
    quantized = onnx.load_model(str(dst))
    if quantized.ir_version > MAX_IR_VERSION:
        quantized.ir_version = MAX_IR_VERSION
        onnx.save_model(quantized, str(dst))
    return dict(INT8_SETTINGS)
