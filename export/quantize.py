"""Weight quantization of a float32 graph: every projection, the LM head and the embedding.

Two formats for the layers' projections (q, k, v, o, gate, up, down), both from onnxruntime.quantization:

    "nbits"    weight-only block quantization (MatMulNBitsQuantizer), 8 or 4 bits:
               MatMul(x, W) ─► MatMulNBits(x, W_q[N, K/32, 32·bits/8], scales[N, K/32])
               symmetric blocks of 32 along K; accuracy_level 4 lets the CPU kernel quantize x to int8
               per block and use integer dot products (VNNI), dequantizing nothing ahead of time.
    "dynamic"  dynamic int8 (quantize_dynamic), 8 bits only:
               MatMul(x, W) ─► DynamicQuantizeLinear(x) ─► MatMulInteger(x_u8, W_s8) ─► Cast ─► Mul
               W int8 with one scale per output channel; x to uint8 per call, per tensor (onnxruntime
               fuses the chain into DynamicQuantizeMatMul at load).

The tied embedding / LM head, one [vocab, dim] matrix in PyTorch, is a large share of a compact model
(14% of `small`'s parameters, 21% of `base`'s), so it is quantized too, and stored once:

    LM head    MatMulNBits at TABLE_BITS (8, whatever the projections' format and bits): its B is
               [vocab, dim/32, 32·bits/8], i.e. row v is token v's embedding, block-quantized along dim,
               with the default zero point 2^(bits-1).
    embedding  GatherBlockQuantized(B, input_ids, scales[vocab, dim/32, 1]) ─► Reshape [.., dim]
               reads those same bytes: GatherBlockQuantized's uint8 data with the same default zero
               point dequantizes them exactly as MatMulNBits does. Only the scales are stored twice
               (MatMulNBits insists on [N, k_blocks], GatherBlockQuantized on data's rank): 1/8 byte per
               weight. The float table is dropped.

Why blocks for the embedding: a lookup does no arithmetic, so the win is bytes, and the price must be
small. quantize_dynamic quantizes a Gather's table per tensor (one scale for every row), which the
previous exporter measured on the tiny trained nano model: max |Δlogits| doubled (0.13 -> 0.27) and greedy
agreement with PyTorch fell from 88% to 59%. Blocks of 32 give every row its own scales (one per 32
values), so a rare token's small row keeps its own range; the quality gate (export/gates.py) is the judge on real text.
An untied model's embedding gets the same block format from its own table.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
    MatMulNBitsQuantizer,
)

from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.onnx_export import MAX_IR_VERSION, quiet

BITS = (8, 4)
METHODS = ("nbits", "dynamic")
# The 8-bit default. Measured by benchmarks/quantization.py on `small` trained 10 min on tinyshakespeare
# (AMD EPYC, 2 threads, batch 1, 128 greedy tokens after 32, fused graph, 8,192 validation tokens):
#   nbits    725 tok/s decode, 6.9 ms prefill, 0.252x the float32 file, perplexity +0.01%, greedy 99.8%
#   dynamic  692 tok/s decode, 5.0 ms prefill, 0.230x,                    perplexity +0.39%, greedy 94.7%
# Both pass the int8 gate (+1.5%). Decode, what generation spends its time on, was 4.5% faster with
# nbits (median of 30 paired runs on a quiet machine; one pass on a busy machine had it the other way
# round, so call it a tie), and nbits loses ~40x less perplexity: nbits is the default.
DEFAULT_METHOD_8BIT = "nbits"
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on the CPU
# Bits of the shared embedding / LM head table for each --bits. int4 keeps this table at 8 bits, as
# llama.cpp's 4-bit presets keep the output matrix at 6 bits (Q6_K): measured on the same `small`, an int4
# table made 4.5% of next-token choices differ from PyTorch's (8-bit table: 1.7%) and greedy text agree
# on 70% of tokens (8-bit: 86%), for a file 8% smaller (0.143x vs 0.158x float32) and decode 5% faster.
# Perplexity moved by less than 0.1% either way; the 8-bit table keeps int4 closer to the model.
TABLE_BITS = {8: 8, 4: 8}


def resolve_method(bits: int, method: str | None) -> str:
    """Check --bits / method and return the method to use (None: the default for those bits)."""
    if bits not in BITS:
        raise EdgeGPTError(f"--bits {bits} is not supported; choose 8 or 4")
    if method is None:
        return DEFAULT_METHOD_8BIT if bits == 8 else "nbits"
    if method not in METHODS:
        raise EdgeGPTError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dynamic" and bits != 8:
        raise EdgeGPTError("dynamic quantization is int8 only; use --bits 8, or the nbits method for 4 bits")
    return method


def settings(bits: int, method: str, tied: bool) -> dict[str, Any]:
    """What the manifest records about the quantization."""
    table = f"MatMulNBits {TABLE_BITS[bits]}-bit, blocks of {BLOCK_SIZE}, symmetric"
    return {
        "bits": bits,
        "method": method,
        "tool": f"onnxruntime.quantization {onnxruntime.__version__}",
        "projections": (
            f"MatMulNBits {bits}-bit, blocks of {BLOCK_SIZE}, symmetric, accuracy_level {ACCURACY_LEVEL}"
            if method == "nbits" else
            "MatMulInteger via quantize_dynamic: int8 weights per output channel, uint8 activations per call"
        ),
        "block_size": BLOCK_SIZE,
        "symmetric": True,
        "lm_head": f"{table}, accuracy_level {ACCURACY_LEVEL}",
        "embedding": "GatherBlockQuantized over "
        + ("the LM head’s bytes (tied, stored once)" if tied else "its own table"),
    }


def quantize_graph(src: Path, dst: Path, bits: int = 8, method: str | None = None) -> dict[str, Any]:
    """Quantize the float32 graph at `src` into `dst` (one file); returns the manifest's settings."""
    method = resolve_method(bits, method)
    proto = onnx.load_model(str(src))
    for i, node in enumerate(proto.graph.node):  # the quantizers select nodes by name
        node.name = node.name or f"/{node.op_type}_{i}"
    materialize_transposed_weights(proto)
    embedding, head = find_embedding_and_head(proto)
    tied = embedding is not None and head is not None and is_transpose_of(proto, head.input[1], embedding.input[0])
    untied_table = None
    if embedding is not None and not tied:
        untied_table = numpy_helper.to_array(initializer(proto, embedding.input[0]))

    with quiet():  # the quantizers log advice and progress through the root logger
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        try:
            matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
            nbits_nodes = matmuls if method == "nbits" else [head.name] if head is not None else []
            if nbits_nodes:
                proto = nbits_quantize(proto, nbits_nodes, bits, TABLE_BITS[bits], head)
            if embedding is not None:
                quantize_embedding(proto, embedding, head if tied else None, untied_table, TABLE_BITS[bits])
            if method == "dynamic":
                proto = dynamic_quantize(proto, Path(dst).parent)
        finally:
            root.setLevel(level)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    check_all_quantized(proto)
    onnx.save_model(proto, str(dst))
    return settings(bits, method, tied)


def initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in proto.graph.initializer if t.name == name), None)


def materialize_transposed_weights(proto: onnx.ModelProto) -> list[str]:
    """Replace MatMul(x, Transpose(W_initializer)) by MatMul(x, W^T) with W^T stored as its own initializer.

    The plain torch.onnx graph computes the tied LM head that way, and the quantizers only reach a
    MatMul whose weight is an initializer. Returns the rewritten MatMuls; a Transpose left without
    consumers is removed (W stays for its other user, the embedding's Gather).
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
    for node in [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]:
        graph.node.remove(node)
    return rewritten


def find_embedding_and_head(proto: onnx.ModelProto) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """The token embedding (a Gather on a 2-D initializer, indexed by input_ids) and the LM head (the
    MatMul whose 2-D weight is [dim, vocab], vocab being the embedding's row count)."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    inputs = {i.name for i in proto.graph.input}
    embedding = next((n for n in proto.graph.node if n.op_type == "Gather" and len(shapes.get(n.input[0], ())) == 2
                      and n.input[1] in inputs), None)
    if embedding is None:
        return None, None
    vocab, dim = shapes[embedding.input[0]]
    head = next((n for n in proto.graph.node if n.op_type == "MatMul" and shapes.get(n.input[1]) == (dim, vocab)), None)
    return embedding, head


def is_transpose_of(proto: onnx.ModelProto, head_weight: str, table: str) -> bool:
    a, b = initializer(proto, head_weight), initializer(proto, table)
    return a is not None and b is not None and np.array_equal(numpy_helper.to_array(a).T, numpy_helper.to_array(b))


def nbits_quantize(proto: onnx.ModelProto, nodes: list[str], bits: int, head_bits: int,
                   head: onnx.NodeProto | None) -> onnx.ModelProto:
    """MatMulNBits for `nodes` (the head at head_bits, the rest at bits)."""
    groups = {bits: [n for n in nodes if head is None or n != head.name]}
    if head is not None and head.name in nodes:
        groups.setdefault(head_bits, []).append(head.name)
    for group_bits, names in groups.items():
        if not names:
            continue
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in names]
        quantizer = MatMulNBitsQuantizer(proto, bits=group_bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=others,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        proto = quantizer.model.model
    return proto


def quantize_embedding(proto: onnx.ModelProto, embedding: onnx.NodeProto, head: onnx.NodeProto | None,
                       table: np.ndarray | None, bits: int) -> None:
    """Replace the embedding's Gather by GatherBlockQuantized over the tied head's MatMulNBits bytes
    (head given) or over its own block-quantized `table` (untied); see the module docstring."""
    graph = proto.graph
    embedding = next(n for n in graph.node if n.name == embedding.name)  # the quantizers copied the nodes
    if head is not None:
        nbits = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == head.output[0])
        data_name, scales = nbits.input[1], numpy_helper.to_array(initializer(proto, nbits.input[2]))
        dim = next(a.i for a in nbits.attribute if a.name == "K")
    else:
        dim = table.shape[1]
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=bits)
        packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(table.T))
        data_name = f"{embedding.input[0]}_Q{bits}"
        graph.initializer.append(numpy_helper.from_array(packed, data_name))
    if dim % BLOCK_SIZE:
        # GatherBlockQuantized would return the zero padding of the last block: keep the float table.
        return
    vocab, blocks = scales.shape[0], dim // BLOCK_SIZE
    scales_name = f"{embedding.input[0]}_gather_scales"
    graph.initializer.append(numpy_helper.from_array(scales.reshape(vocab, blocks, 1), scales_name))
    shape_name = f"{embedding.input[0]}_gather_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, dim], np.int64), shape_name))
    blocked = f"{embedding.output[0]}_blocks"
    name = embedding.name[: -len("Gather")] if embedding.name.endswith("Gather") else f"{embedding.name}/"
    gather = helper.make_node("GatherBlockQuantized", [data_name, embedding.input[1], scales_name], [blocked],
                              name=f"{name}GatherBlockQuantized", domain="com.microsoft", bits=bits,
                              block_size=BLOCK_SIZE, gather_axis=0, quantize_axis=2)
    # [batch, seq, blocks, 32] -> [batch, seq, dim]; 0 copies batch and seq from the input.
    reshape = helper.make_node("Reshape", [blocked, shape_name], [embedding.output[0]], name=f"{name}Reshape")
    index = list(graph.node).index(embedding)
    graph.node.remove(embedding)
    graph.node.insert(index, reshape)
    graph.node.insert(index, gather)
    if not any(embedding.input[0] in n.input for n in graph.node):
        graph.initializer.remove(initializer(proto, embedding.input[0]))
    if not any(d.domain == "com.microsoft" for d in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def dynamic_quantize(proto: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
    """quantize_dynamic on the float MatMuls left (the projections), per output channel."""
    with tempfile.TemporaryDirectory(prefix="edgegpt-quantize-", dir=workdir) as tmp:
        out = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(
            proto, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
            weight_type=QuantType.QInt8,
            # Shape inference cannot type through contrib ops (MatMulNBits, GatherBlockQuantized, GQA):
            # untyped tensors are float32 here.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load_model(str(out))


def check_all_quantized(proto: onnx.ModelProto) -> None:
    """A projection left in float32 would ship silently slower and bigger: that is an edgegpt bug."""
    weights = {t.name for t in proto.graph.initializer}
    projections = ("MatMul", "Gemm", "FusedMatMul")
    left = [n.name for n in proto.graph.node if n.op_type in projections and n.input[1] in weights]
    if left:
        raise RuntimeError(f"quantization left {len(left)} float projections: {left[:4]}")


def census(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())
