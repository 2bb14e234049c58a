"""Weight quantization of a float32 graph: every projection, the LM head and the embedding.

Two formats for the layers' projections (q, k, v, o, gate, up, down):

    "nbits"    weight-only block quantization (export/blockquant.py), 4 or 8 bits, per projection:
               MatMul(x, W) ─► MatMulNBits(x, codes[N, K/b, b·bits/8], scales[N, K/b][, zero_points])
               blocks of b along K, asymmetric by default (a zero point per block); accuracy_level 4 lets
               the CPU kernel quantize x to int8 per block and use integer dot products (VNNI). A plan
               may give each projection its own bits, or keep it in float32 (export/plan.py).
    "dynamic"  dynamic int8 (onnxruntime's quantize_dynamic), 8 bits only:
               MatMul(x, W) ─► DynamicQuantizeLinear(x) ─► MatMulInteger(x_u8, W_s8) ─► Cast ─► Mul
               W int8 with one scale per output channel; x to uint8 per call, per tensor (onnxruntime
               fuses the chain into DynamicQuantizeMatMul at load).

The tied embedding / LM head, one [vocab, dim] matrix in PyTorch, is a large share of a compact model
(14% of `small`'s parameters, 21% of SmolLM2-135M's), so it is quantized too, and stored once:

    LM head    MatMulNBits at table_format (8-bit, symmetric blocks of b = 128, 64 or 32, the largest dividing dim,
               whatever the projections' format): its B is [vocab, dim/b, b], i.e. row v is token v's
               embedding, with the default zero point.
    embedding  GatherBlockQuantized(B, input_ids, scales[vocab, dim/b, 1]) ─► Reshape [.., dim]
               reads those same bytes: GatherBlockQuantized's uint8 data with the same default zero
               point dequantizes them exactly as MatMulNBits does. Only the scales are stored twice
               (MatMulNBits insists on [N, k_blocks], GatherBlockQuantized on data's rank): 1/8 byte per
               weight. The float table is dropped.

Why blocks for the embedding: a lookup does no arithmetic, so the win is bytes, and the price must be
small. quantize_dynamic quantizes a Gather's table per tensor (one scale for every row), which on the
tiny trained nano model doubled the largest logit error and cost a third of the greedy agreement with
PyTorch. Blocks of 32 give every row its own scales (one per 32
values), so a rare token's small row keeps its own range; the quality gate (export/gates.py) is the judge on real text.
An untied model's embedding gets the same block format from its own table.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.blockquant import BLOCK_SIZES, ROUNDINGS, BlockFormat, QuantizedMatrix, quantize_matrix
from edgegpt.export.external_data import external_locations, load_remaining, read_tensor, save_model
from edgegpt.export.onnx_export import MAX_IR_VERSION, quiet
from edgegpt.export.plan import FLOAT

if TYPE_CHECKING:
    from edgegpt.export.calibration import Calibration

BITS = (8, 4)
METHODS = ("nbits", "dynamic")
# The 8-bit default: MatMulNBits decodes as fast as dynamic int8 (MatMulInteger) within noise and loses far
# less perplexity, on a small trained model and much more so on SmolLM2 (docs/benchmarks.md, quantization;
# `python benchmarks/formats.py quantization`).
DEFAULT_METHOD_8BIT = "nbits"
# accuracy_level 4: int8 activations inside MatMulNBits on the CPU. The float alternatives are no choice
# for 8-bit weights: onnxruntime has no fast float kernel for them, and at 4 bits float compute is slower
# for a small gain in perplexity (`python benchmarks/formats.py kernels`; docs/quantization.md).
ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 4)  # 0: the kernel's choice (float32 on the CPU), 1: float32, 4: int8
# Defaults per bits: asymmetric blocks of 32 with the importance-weighted search at 8 bits, GPTQ at 4.
DEFAULT_ROUNDING = {8: "search", 4: "gptq"}
DEFAULT_BLOCK_SIZE = {8: 32, 4: 32}
# The shared embedding / LM head table: 8-bit whatever --bits, as llama.cpp's 4-bit presets keep the output
# matrix at 6 bits (Q6_K). Symmetric: GatherBlockQuantized reads the head's bytes with the default zero
# point. On `small`, an int4 table changed several times more next-token choices than an 8-bit one.
# Blocks as large as the width allows (TABLE_BLOCK_SIZES, the first that divides it): the head is read whole at
# every decode step, and a large vocabulary makes it most of the bytes a step reads (Gemma 3 270M: 63% of the
# weights), so a scale per 128 values rather than per 32 is a tenth fewer bytes per step for a small loss
# (docs/benchmarks.md, Real models).
TABLE_BLOCK_SIZES = (128, 64, 32)
TABLE_FORMAT = BlockFormat(bits=8, block_size=32, symmetric=True)


def table_format(dim: int) -> BlockFormat:
    """The table's format for an embedding width `dim` (GatherBlockQuantized needs whole blocks)."""
    block = next((b for b in TABLE_BLOCK_SIZES if dim % b == 0), TABLE_FORMAT.block_size)
    return replace(TABLE_FORMAT, block_size=block)


@dataclass(frozen=True)
class QuantOptions:
    """How `--quantize` quantizes; None fields take the defaults for the bits (resolved())."""

    bits: int = 8
    method: str | None = None
    rounding: str | None = None
    block_size: int | None = None
    symmetric: bool = False
    accuracy_level: int = ACCURACY_LEVEL

    def resolved(self) -> "QuantOptions":
        """Checked, with the defaults filled in (the nbits settings stay None for the dynamic method)."""
        method = resolve_method(self.bits, self.method)
        if method == "dynamic":
            if self.rounding or self.block_size or self.symmetric or self.accuracy_level != ACCURACY_LEVEL:
                raise EdgeGPTError("--rounding, --block-size, --symmetric and --accuracy-level apply to the nbits "
                                   "method; dynamic quantization has one int8 scale per output channel")
            return replace(self, method=method)
        rounding = self.rounding or DEFAULT_ROUNDING[self.bits]
        if rounding not in ROUNDINGS:
            raise EdgeGPTError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        block_size = self.block_size or DEFAULT_BLOCK_SIZE[self.bits]
        if block_size not in BLOCK_SIZES:
            raise EdgeGPTError(f"--block-size {block_size} is not supported; choose "
                               f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise EdgeGPTError(f"--accuracy-level {self.accuracy_level} is not supported; choose "
                               f"{', '.join(map(str, ACCURACY_LEVELS))}")
        return replace(self, method=method, rounding=rounding, block_size=block_size)

    def format(self, bits: int) -> BlockFormat:
        return BlockFormat(bits=bits, block_size=self.block_size or DEFAULT_BLOCK_SIZE[bits], symmetric=self.symmetric)


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


@dataclass
class PreparedGraph:
    """A float graph made ready for quantization: nodes named, the head's weight its own initializer."""

    proto: onnx.ModelProto
    embedding: onnx.NodeProto | None
    head: onnx.NodeProto | None
    tied: bool
    untied_table: np.ndarray | None
    projections: dict[str, str]  # weight initializer name -> MatMul node name (the head excluded)
    base_dir: Path | None = None  # where the graph's external data lies (None: every tensor is in the proto)

    def weight(self, name: str) -> np.ndarray:
        return read_tensor(initializer(self.proto, name), self.base_dir)


def prepare_graph(src: Path) -> PreparedGraph:
    """The graph at `src`, its external data left on disk: each weight is read when it is quantized, so the
    float graph is never held in memory whole (export/external_data.py)."""
    src = Path(src)
    proto = onnx.load_model(str(src), load_external_data=False)
    base_dir = src.parent if external_locations(proto) else None
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"/{node.op_type}_{i}"
    materialize_transposed_weights(proto, base_dir)
    embedding, head = find_embedding_and_head(proto)
    tied = embedding is not None and head is not None and is_tied(proto, embedding, head, base_dir)
    untied_table = None
    if embedding is not None and not tied:
        untied_table = read_tensor(initializer(proto, embedding.input[0]), base_dir)
    weights = {t.name for t in proto.graph.initializer}
    projections = {n.input[1]: n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                   and (head is None or n.name != head.name)}
    return PreparedGraph(proto, embedding, head, tied, untied_table, projections, base_dir)


def quantize_weights(graph: PreparedGraph, options: QuantOptions, bits: set[int],
                     calibration: "Calibration | None" = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, int], QuantizedMatrix]:
    """Every projection at each of `bits`, in the options' format and rounding: what plans choose from."""
    done, total, out = 0, len(graph.projections) * len(bits), {}
    for name in graph.projections:
        weight = graph.weight(name)
        importance = calibration.importance(name) if calibration is not None else None
        hessian = calibration.hessian(name) if calibration is not None else None
        for b in sorted(bits):
            out[name, b] = quantize_matrix(weight, options.format(b), options.rounding, importance, hessian)
            done += 1
            if progress:
                progress(done, total)
    return out


def quantize_graph(src: Path, dst: Path, bits: int = 8, method: str | None = None, *,
                   options: QuantOptions | None = None, plan: dict[str, int] | None = None,
                   calibration: "Calibration | None" = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Quantize the float32 graph at `src` into `dst` (one file); returns the manifest's settings;
    progress(done, total) after each projection is quantized.

    `options` (else QuantOptions(bits, method)) say how; `plan` maps projection weight names to their bits
    (4, 8, or FLOAT), every projection not in it taking options.bits; `calibration` feeds the "search"
    and "gptq" roundings (without it, "search" weighs every input channel alike and "gptq" is "search").
    """
    options = (options or QuantOptions(bits=bits, method=method)).resolved()
    graph = prepare_graph(src)
    if options.method == "dynamic" and plan:
        raise EdgeGPTError("a per-projection plan needs the nbits method")
    full_plan = {name: (plan or {}).get(name, options.bits) for name in graph.projections}
    needed = {b for b in full_plan.values() if b != FLOAT} if options.method == "nbits" else set()
    quantized = quantize_weights(graph, options, needed, calibration, progress)
    proto = write_quantized(graph, options, full_plan, quantized, Path(dst).parent)
    tied = graph.tied
    del graph, quantized  # the float weights' last references
    save_model(proto, Path(dst))  # one file, or with model.onnx.data above the threshold
    return settings(options, tied, full_plan if options.method == "nbits" else None, calibration)


def write_quantized(graph: PreparedGraph, options: QuantOptions, plan: dict[str, int],
                    quantized: dict[tuple[str, int], QuantizedMatrix], workdir: Path) -> onnx.ModelProto:
    """A copy of the prepared graph with the plan applied (the prepared graph is left as it was), every
    tensor in memory (a prepared graph's external data stays on disk until the projections are replaced:
    the copy is then small)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(graph.proto)
    nodes = {n.name: n for n in proto.graph.node}
    if graph.head is not None:
        head = head_matrix(graph)
        replace_with_nbits(proto, nodes[graph.head.name],
                           quantize_matrix(head, table_format(head.shape[0]), "rtn"), ACCURACY_LEVEL)
    if options.method == "nbits":
        for name, node_name in graph.projections.items():
            if plan[name] != FLOAT:
                replace_with_nbits(proto, nodes[node_name], quantized[name, plan[name]], options.accuracy_level)
    if graph.embedding is not None:
        head = nodes[graph.head.name] if graph.tied else None
        quantize_embedding(proto, graph.embedding, head, graph.untied_table)
    load_remaining(proto, graph.base_dir)  # the float tensors left (norms, rotary tables; dynamic's projections)
    if options.method == "dynamic":
        with quiet():  # the quantizer logs advice and progress through the root logger
            root, level = logging.getLogger(), logging.getLogger().level
            root.setLevel(logging.ERROR)
            try:
                proto = dynamic_quantize(proto, workdir)
            finally:
                root.setLevel(level)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    if not any(d.domain == "com.microsoft" for d in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    check_all_quantized(proto, {name for name, b in plan.items() if b == FLOAT})
    return proto


def replace_with_nbits(proto: onnx.ModelProto, node: onnx.NodeProto, matrix: QuantizedMatrix,
                       accuracy_level: int) -> None:
    """MatMul(x, W) ─► MatMulNBits(x, codes, scales[, zero_points]) in place, named after the MatMul's path."""
    graph, weight = proto.graph, node.input[1]
    fmt, n = matrix.fmt, matrix.scales.shape[0]
    data, scales = f"{weight}_Q{fmt.bits}", f"{weight}_scales"
    graph.initializer.append(numpy_helper.from_array(matrix.packed_data(), data))
    graph.initializer.append(numpy_helper.from_array(matrix.scales, scales))
    inputs = [node.input[0], data, scales]
    zero_points = matrix.packed_zero_points()
    if zero_points is not None:
        inputs.append(f"{weight}_zero_points")
        graph.initializer.append(numpy_helper.from_array(zero_points, inputs[-1]))
    suffix = next((op for op in ("FusedMatMul", "MatMul") if node.name.endswith(op)), None)
    prefix = node.name[: -len(suffix)] if suffix else f"{node.name}/"
    attributes = {"accuracy_level": accuracy_level} if accuracy_level else {}
    nbits = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{prefix}MatMulNBits",
                             domain="com.microsoft", K=matrix.k, N=n, bits=fmt.bits, block_size=fmt.block_size,
                             **attributes)
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, nbits)
    if not any(weight in other.input for other in graph.node):
        graph.initializer.remove(initializer(proto, weight))


def settings(options: QuantOptions, tied: bool, plan: dict[str, int] | None,
             calibration: "Calibration | None") -> dict[str, Any]:
    """What the manifest records about the quantization."""
    if options.method == "nbits":
        fmt = options.format(options.bits)
        projections = f"MatMulNBits {fmt.describe()}, {options.rounding}, accuracy_level {options.accuracy_level}"
    else:
        projections = "MatMulInteger via quantize_dynamic: int8 weights per output channel, uint8 activations per call"
    recorded = {
        "bits": options.bits,
        "method": options.method,
        "tool": f"edgegpt block quantizer; onnxruntime {onnxruntime.__version__}",
        "projections": projections,
        "rounding": options.rounding if options.method == "nbits" else None,
        "block_size": options.block_size if options.method == "nbits" else None,
        "symmetric": options.symmetric if options.method == "nbits" else None,
        "accuracy_level": options.accuracy_level if options.method == "nbits" else None,
        "lm_head": f"MatMulNBits 8-bit, symmetric, blocks of {'/'.join(map(str, TABLE_BLOCK_SIZES))} (the largest "
                   f"dividing the width), rtn, accuracy_level {ACCURACY_LEVEL}",
        "embedding": "GatherBlockQuantized over "
        + ("the LM head’s bytes (tied, stored once)" if tied else "its own table"),
        "calibration": None if calibration is None else {"source": calibration.source, "tokens": calibration.tokens},
    }
    if plan is not None:
        recorded["plan"] = dict(plan)
    return recorded


def initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in proto.graph.initializer if t.name == name), None)


def materialize_transposed_weights(proto: onnx.ModelProto, base_dir: Path | None = None) -> list[str]:
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
        weight = read_tensor(initializers[transpose.input[0]], base_dir)
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
    """The token embedding (a Gather on a 2-D initializer, indexed by input_ids) and the LM head: a MatMul whose
    2-D weight is [dim, vocab] (vocab being the embedding's row count), or a FusedMatMul by the transpose of a
    [vocab, dim] weight (the fused float32 graph's, export/fused.py lm_head)."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    inputs = {i.name for i in proto.graph.input}
    embedding = next((n for n in proto.graph.node if n.op_type == "Gather" and len(shapes.get(n.input[0], ())) == 2
                      and n.input[1] in inputs), None)
    if embedding is None:
        return None, None
    vocab, dim = shapes[embedding.input[0]]
    head = next((n for n in proto.graph.node if (n.op_type == "MatMul" and shapes.get(n.input[1]) == (dim, vocab))
                 or (is_transposed_product(n) and shapes.get(n.input[1]) == (vocab, dim))), None)
    return embedding, head


def is_transposed_product(node: onnx.NodeProto) -> bool:
    """A FusedMatMul computing x · Wᵀ and nothing else (no scaling, no transposed x)."""
    if node.op_type != "FusedMatMul":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0


def head_matrix(graph: "PreparedGraph") -> np.ndarray:
    """The LM head's weight as the quantizers take a MatMul's, [dim, vocab] (a transposed view of a
    FusedMatMul's [vocab, dim] weight: quantize_matrix copies a slice of it at a time)."""
    weight = graph.weight(graph.head.input[1])
    return weight.T if is_transposed_product(graph.head) else weight


def is_tied(proto: onnx.ModelProto, embedding: onnx.NodeProto, head: onnx.NodeProto, base_dir: Path | None) -> bool:
    """Whether the head multiplies by the embedding's own table: the same initializer (the fused float32 graph),
    or a MatMul weight equal to its transpose (the plain graph's materialized Transpose)."""
    if is_transposed_product(head):
        return head.input[1] == embedding.input[0]
    return is_transpose_of(proto, head.input[1], embedding.input[0], base_dir)


def is_transpose_of(proto: onnx.ModelProto, head_weight: str, table: str, base_dir: Path | None = None) -> bool:
    a, b = initializer(proto, head_weight), initializer(proto, table)
    return (a is not None and b is not None and tuple(a.dims) == tuple(reversed(b.dims))
            and np.array_equal(read_tensor(a, base_dir).T, read_tensor(b, base_dir)))


def quantize_embedding(proto: onnx.ModelProto, embedding: onnx.NodeProto, head: onnx.NodeProto | None,
                       table: np.ndarray | None) -> None:
    """Replace the embedding's Gather by GatherBlockQuantized over the tied head's MatMulNBits bytes
    (head given) or over its own block-quantized `table` (untied); see the module docstring."""
    graph = proto.graph
    embedding = next(n for n in graph.node if n.name == embedding.name)  # the graph may be a copy
    bits = TABLE_FORMAT.bits
    if head is not None:
        nbits = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == head.output[0])
        data_name, scales = nbits.input[1], numpy_helper.to_array(initializer(proto, nbits.input[2]))
        attrs = {a.name: a.i for a in nbits.attribute if a.name in ("K", "block_size")}
        dim, block = attrs["K"], attrs["block_size"]
    else:
        dim = table.shape[1]
        fmt = table_format(dim)
        matrix = quantize_matrix(np.ascontiguousarray(table.T), fmt, "rtn")
        packed, scales, block = matrix.packed_data(), matrix.scales, fmt.block_size
        data_name = f"{embedding.input[0]}_Q{bits}"
        graph.initializer.append(numpy_helper.from_array(packed, data_name))
    if dim % block:
        # GatherBlockQuantized would return the zero padding of the last block: keep the float table.
        return
    vocab, blocks = scales.shape[0], dim // block
    scales_name = f"{embedding.input[0]}_gather_scales"
    graph.initializer.append(numpy_helper.from_array(scales.reshape(vocab, blocks, 1), scales_name))
    shape_name = f"{embedding.input[0]}_gather_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, dim], np.int64), shape_name))
    blocked = f"{embedding.output[0]}_blocks"
    name = embedding.name[: -len("Gather")] if embedding.name.endswith("Gather") else f"{embedding.name}/"
    gather = helper.make_node("GatherBlockQuantized", [data_name, embedding.input[1], scales_name], [blocked],
                              name=f"{name}GatherBlockQuantized", domain="com.microsoft", bits=bits,
                              block_size=block, gather_axis=0, quantize_axis=2)
    # [batch, seq, blocks, block] -> [batch, seq, dim]; 0 copies batch and seq from the input.
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


def check_all_quantized(proto: onnx.ModelProto, planned_float: set[str] = frozenset()) -> None:
    """A projection left in float32 that no plan asked for would ship silently slower and bigger: that is
    an edgegpt bug."""
    weights = {t.name for t in proto.graph.initializer} - set(planned_float)
    projections = ("MatMul", "Gemm", "FusedMatMul")
    left = [n.name for n in proto.graph.node if n.op_type in projections and n.input[1] in weights]
    if left:
        raise RuntimeError(f"quantization left {len(left)} float projections: {left[:4]}")


def census(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())
