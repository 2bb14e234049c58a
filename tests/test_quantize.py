"""Quantization: every projection reached in every format, the embedding stored once in the LM head's
blocks, and the size budgets (int8 ≤ 30%, int4 ≤ 20% of the float32 package)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EVAL_TOKENS
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.quantize import TABLE_FORMAT, quantize_graph, resolve_method, table_format

FORMATS = [(8, "nbits"), (8, "dynamic"), (4, "nbits")]
SIZE_LIMITS = {8: 0.30, 4: 0.20}


def toy_graph(path: Path, tied: bool, vocab: int = 96, dim: int = 64) -> np.ndarray:
    """input_ids ─► Gather(embed) ─► MatMul(w1) ─► MatMul(lm_head) ─► logits: the shapes of a tied LM."""
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((vocab, dim)).astype(np.float32)
    head = embed.T.copy() if tied else rng.standard_normal((dim, vocab)).astype(np.float32)
    w1 = np.eye(dim, dtype=np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((embed, "embed.weight"), (w1, "w1"), (head, "lm_head.weight"))]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="/embed/Gather"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="/layers.0/MatMul"),
             helper.make_node("MatMul", ["h1", "lm_head.weight"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab]),
                               helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["b", "s", dim])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.save_model(proto, str(path))
    return embed


def run(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedded = sess.run(["logits", "h0"], {"input_ids": ids})
    return logits, embedded


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_embedding_reads_the_lm_heads_blocks(tmp_path, bits):
    embed = toy_graph(tmp_path / "f.onnx", tied=True)
    quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", bits, "nbits")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops and ops.count("MatMulNBits") == 2
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in proto.graph.node if n.output[0] == "logits")
    assert gather.input[0] == head.input[1]  # one table of bytes, two readers
    assert "embed.weight" not in {t.name for t in proto.graph.initializer}  # the float table is gone

    # w1 is the identity, so logits = embedding(ids) @ head: with the head's own dequantized rows as
    # input, the embedding's output must be exactly those rows, and both close to the float table.
    ids = np.arange(embed.shape[0])[None]
    _, embedded = run(tmp_path / "q.onnx", ids)
    # Symmetric blocks map a block's extreme to -2^(bits-1): one step is |extreme| / 2^(bits-1), and the
    # error is at most half a step (a whole one for values clipped at the other end, +2^(bits-1) - 1).
    block = table_format(embed.shape[1]).block_size
    step = np.abs(embed).reshape(len(embed), -1, block).max(-1) / 2 ** (bits - 1)
    error = np.abs(embedded[0] - embed).reshape(len(embed), -1, block).max(-1)
    assert (error <= step * 1.001).all()
    assert np.median(error / step) < 0.6 and (error > 0).any()  # mostly rounding, and really quantized


def test_untied_embedding_gets_its_own_blocks(tmp_path):
    embed = toy_graph(tmp_path / "f.onnx", tied=False)
    quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", 8, "nbits")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in proto.graph.node if n.output[0] == "logits")
    assert gather.input[0] != head.input[1]
    _, embedded = run(tmp_path / "q.onnx", np.array([[0, 5, 95]]))
    np.testing.assert_allclose(embedded[0], embed[[0, 5, 95]], atol=np.abs(embed).max() / 127)


def test_dynamic_format_keeps_the_head_in_blocks_for_the_embedding(tmp_path):
    toy_graph(tmp_path / "f.onnx", tied=True)
    quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", 8, "dynamic")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1


@pytest.mark.parametrize("bits,method,message", [
    (3, None, "--bits 3"), (4, "dynamic", "int8 only"), (8, "gptq", "unknown quantization method"),
])
def test_bad_quantization_options(bits, method, message):
    with pytest.raises(EdgeGPTError, match=message):
        resolve_method(bits, method)


# -- the tiny trained checkpoint, exported in every format ------------------------------------------


@pytest.fixture(scope="module")
def packages(tiny_checkpoint, tiny_package, tiny_package_int8, corpus_file, tmp_path_factory) -> dict:
    from edgegpt.export import export_package
    from edgegpt.export.quantize import DEFAULT_METHOD_8BIT

    made = {(8, DEFAULT_METHOD_8BIT): tiny_package_int8}
    for bits, method in FORMATS:
        if (bits, method) not in made:
            directory = tmp_path_factory.mktemp(f"int{bits}-{method}") / "model"
            export_package(tiny_checkpoint, directory, quantize=True, bits=bits, method=method,
                           eval_data=corpus_file, eval_tokens=EVAL_TOKENS)
            made[bits, method] = directory
    return made


def head_width(proto: onnx.ModelProto) -> int:
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    return next(a.i for a in head.attribute if a.name == "K")


def float_projections(proto: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "FusedMatMul") and n.input[1] in weights]


@pytest.mark.parametrize("bits,method", FORMATS)
def test_every_projection_is_quantized(packages, tiny_package, bits, method):
    float_graph = onnx.load(str(tiny_package / "model.onnx"))
    projections = float_projections(float_graph)  # q/k/v (packed or not), o, gate, up, down, lm_head
    assert "/lm_head/FusedMatMul" in projections and len(projections) >= 5 * 4 + 1

    proto = onnx.load(str(packages[bits, method] / "model.onnx"))
    census = json.loads((packages[bits, method] / "manifest.json").read_text())["operator_census"]
    assert float_projections(proto) == []
    # The export stores onnxruntime's optimized graph, in which a dynamic MatMulInteger chain is already
    # fused into DynamicQuantizeMatMul, or MatMulIntegerToFloat where two share one quantized input
    # (gate and up; export/package.py, optimize_offline): each counts as quantized.
    quantized = sum(census.get(op, 0) for op in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                                                 "MatMulIntegerToFloat"))
    assert quantized == len(projections)
    assert census.get("MatMulNBits") == (len(projections) if method == "nbits" else 1)  # dynamic: the head
    assert census["GatherBlockQuantized"] == 1 and "Gather" not in census
    assert census["GroupQueryAttention"] == 4 and "Softmax" not in census  # still the fused graph
    for node in proto.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            table = node.op_type == "GatherBlockQuantized" or node.output[0] == "logits"
            want = table_format(head_width(proto)).block_size if table else 32
            assert (attrs["bits"], attrs["block_size"]) == (TABLE_FORMAT.bits if table else bits, want)
            assert attrs.get("accuracy_level", 4) == 4


@pytest.mark.parametrize("bits,method", FORMATS)
def test_size_budget(packages, tiny_package, bits, method):
    ratio = (packages[bits, method] / "model.onnx").stat().st_size / (tiny_package / "model.onnx").stat().st_size
    print(f"int{bits} {method}: {ratio:.3f} of float32")
    assert ratio <= SIZE_LIMITS[bits]


@pytest.mark.parametrize("bits,method", FORMATS)
def test_manifest_records_quantization_and_gate(packages, bits, method):
    manifest = json.loads((packages[bits, method] / "manifest.json").read_text())
    assert manifest["precision"] == f"int{bits}" and manifest["graph"] == "fused"
    q = manifest["quantization"]
    nbits = method == "nbits"
    assert (q["bits"], q["method"], q["block_size"], q["symmetric"]) == (bits, method, 32 if nbits else None,
                                                                         False if nbits else None)
    gates = manifest["gates"]
    assert gates["enabled"] and gates["passed"]
    names = [c["name"] for c in gates["checks"]]
    assert names == ["float32 graph max |Δlog p| / max |logit| vs PyTorch", f"int{bits} perplexity vs PyTorch"]
    reference, package = gates["models"]
    assert package["tokens"] == reference["tokens"] == EVAL_TOKENS
    assert 0.5 < package["top1_agreement"] <= 1 and 0 < package["greedy_agreement"] <= 1
    assert reference["top1_agreement"] is None


@pytest.mark.parametrize("method", ["nbits", "dynamic"])
def test_plain_graph_quantizes_too(plain_package, tiny_checkpoint, tmp_path, method):
    """--no-fuse --quantize: the plain graph's head is MatMul(x, Transpose(embed)); it gets its own
    quantized weight, and the embedding reads it as in the fused graph."""
    import shutil

    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.runtime import Generator

    package = Path(shutil.copytree(plain_package, tmp_path / "model"))
    (package / "manifest.json").unlink()
    quantize_graph(plain_package / "model.onnx", package / "model.onnx", 8, method)
    proto = onnx.load(str(package / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert float_projections(proto) == [] and ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    ids = tokenizer.encode("The import statement").ids
    import torch

    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    got = Generator.load(package, provider="cpu").score(ids)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
