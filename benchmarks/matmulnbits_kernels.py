"""onnxruntime's MatMulNBits CPU kernels by format: what each bits / accuracy_level / zero-point choice costs.

    python benchmarks/matmulnbits_kernels.py [--threads 2] [--layers 30] [--runs 30]

One graph holds the projections of `--layers` transformer layers of SmolLM2-135M's shapes (q, o: 576 → 576;
k, v: 576 → 192; gate, up: 576 → 1,536; down: 1,536 → 576), each a MatMulNBits node over random codes, all
fed the same input; a run is one token (M = 1, a decode step's matrix work) or 16 (a short prefill).
Median milliseconds per run. The quantizer's choices (export/quantize.py, export/blockquant.py) rest on
this table: which combinations have a fast kernel on this CPU and which fall back to dequantizing the
weights on every call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from common import machine

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
# bits, accuracy_level, zero points (None, "uint8" packed integers, "float32"), block size
CASES = [(8, 4, None, 32), (8, 4, "uint8", 32), (8, 0, None, 32), (4, 4, None, 32), (4, 4, "uint8", 32),
         (4, 0, "uint8", 32), (4, 4, "float32", 32), (4, 4, "uint8", 64), (4, 4, "uint8", 128)]


def build(bits: int, accuracy_level: int, zero_points: str | None, block: int, layers: int) -> bytes:
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for layer in range(layers):
        for j, (k, n) in enumerate(SHAPES):
            blocks = -(-k // block)
            name = f"l{layer}.{j}"
            weights.append(numpy_helper.from_array(
                rng.integers(0, 256, (n, blocks, block * bits // 8)).astype(np.uint8), f"{name}.codes"))
            weights.append(numpy_helper.from_array((rng.random((n, blocks)) * 0.01).astype(np.float32),
                                                   f"{name}.scales"))
            inputs = ["x" if k == 576 else "x_wide", f"{name}.codes", f"{name}.scales"]
            if zero_points == "uint8":
                packed = rng.integers(0, 256, (n, -(-blocks * bits // 8))).astype(np.uint8)
                weights.append(numpy_helper.from_array(packed, f"{name}.zero_points"))
                inputs.append(f"{name}.zero_points")
            elif zero_points == "float32":
                weights.append(numpy_helper.from_array((rng.random((n, blocks)) * 15).astype(np.float32),
                                                       f"{name}.zero_points"))
                inputs.append(f"{name}.zero_points")
            level = {"accuracy_level": accuracy_level} if accuracy_level else {}
            nodes.append(helper.make_node("MatMulNBits", inputs, [name], domain="com.microsoft", K=k, N=n,
                                          bits=bits, block_size=block, **level))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "projections", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 576]),
        helper.make_tensor_value_info("x_wide", TensorProto.FLOAT, ["m", 1536])], outputs, weights)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def time_runs(model: bytes, threads: int, m: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((m, 576)).astype(np.float32),
            "x_wide": rng.standard_normal((m, 1536)).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    title = f"MatMulNBits, {args.layers} layers of SmolLM2-135M's projections, onnxruntime {ort.__version__}"
    table = Table(title=title,
                  caption=f"{machine()}, {args.threads} threads, median of {args.runs} runs")
    for column in ("bits", "accuracy_level", "zero points", "block", "ms, 1 token", "ms, 16 tokens"):
        table.add_column(column, justify="right")
    for bits, level, zero_points, block in CASES:
        model = build(bits, level, zero_points, block, args.layers)
        one, sixteen = (time_runs(model, args.threads, m, args.runs if m == 1 else args.runs // 3) for m in (1, 16))
        table.add_row(str(bits), str(level), zero_points or "none (symmetric)", str(block), f"{one:.2f}",
                      f"{sixteen:.2f}")
    Console(width=max(Console().width, 120)).print(table)


if __name__ == "__main__":
    main()
