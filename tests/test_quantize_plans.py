"""Block formats, roundings and mixed-precision plans (export/blockquant.py, export/plan.py, --quantize auto)."""

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
from edgegpt.export.blockquant import BlockFormat, quantize_matrix
from edgegpt.export.plan import FLOAT, Upgrade, ordered_upgrades, plan_after, search_plan
from edgegpt.export.quantize import QuantOptions, prepare_graph, quantize_graph

FORMATS = [BlockFormat(bits, size, symmetric)
           for bits in (4, 8) for size in (32, 64, 128) for symmetric in (False, True)]


def run_matmulnbits(x: np.ndarray, matrix, accuracy_level: int = 0) -> np.ndarray:
    """onnxruntime's MatMulNBits over the matrix's packed bytes."""
    fmt, n = matrix.fmt, matrix.scales.shape[0]
    inits = [numpy_helper.from_array(matrix.packed_data(), "B"), numpy_helper.from_array(matrix.scales, "S")]
    inputs = ["x", "B", "S"]
    if matrix.packed_zero_points() is not None:
        inits.append(numpy_helper.from_array(matrix.packed_zero_points(), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=matrix.k, N=n, bits=fmt.bits,
                            block_size=fmt.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, matrix.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.bits}b-{f.block_size}-{'sym' if f.symmetric else 'asym'}")
@pytest.mark.parametrize("rounding", ["rtn", "search"])
def test_packed_bytes_compute_what_dequantized_says(fmt, rounding):
    """onnxruntime reads our packing exactly as dequantized() describes it, K a multiple of the block or not."""
    rng = np.random.default_rng(1)
    for k in (192, 96 + 32):  # 128 does not divide 160: the last block is padding
        weight = rng.standard_normal((k, 48)).astype(np.float32)
        matrix = quantize_matrix(weight, fmt, rounding)
        x = rng.standard_normal((3, k)).astype(np.float32)
        expected = x @ matrix.dequantized()
        np.testing.assert_allclose(run_matmulnbits(x, matrix), expected, rtol=1e-4, atol=1e-4)
        # and it is a quantization of the weight: a 4-bit step is at most ~1/7 of a block's range
        step = np.abs(weight).max() / (2 if fmt.bits == 4 else 60)
        assert np.abs(matrix.dequantized() - weight).max() <= step


def test_search_and_gptq_each_lower_the_error_they_aim_at():
    """search: the importance-weighted weight error; gptq: the layer's output error on the calibration inputs."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((256, 96)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.01] *= 8  # outliers: clipping them pays
    # channels of very different scales (as a layer's inputs are): what the importance weighting exploits
    importance = np.exp(2 * rng.standard_normal(256))
    # correlated input channels (as they are too): what GPTQ's error compensation exploits
    x = (rng.standard_normal((2048, 64)) @ rng.standard_normal((64, 256)) + 0.1 * rng.standard_normal((2048, 256))
         ).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    fmt = BlockFormat(4, 32)

    def weighted(m):
        return float(((m.dequantized() - weight) ** 2 * importance[:, None]).sum())

    def output(m):
        return float(((x @ (m.dequantized() - weight)) ** 2).sum())

    rtn = quantize_matrix(weight, fmt, "rtn")
    search = quantize_matrix(weight, fmt, "search", importance)
    gptq = quantize_matrix(weight, fmt, "gptq", np.diag(hessian), hessian)
    search_for_x = quantize_matrix(weight, fmt, "search", np.diag(hessian))
    assert weighted(search) < 0.9 * weighted(rtn)
    assert output(gptq) < 0.9 * output(search_for_x)


def test_sizes_follow_the_format():
    weight = np.ones((256, 64), np.float32)
    for fmt in FORMATS:
        assert quantize_matrix(weight, fmt, "rtn").nbytes == pytest.approx(256 * 64 * fmt.bytes_per_weight())


# -- plans -------------------------------------------------------------------------------------------------


def test_upgrades_go_to_the_most_loss_per_byte_first():
    names = ["a", "b", "c"]
    sensitivity = {("a", 4): 10.0, ("a", 8): 1.0, ("a", FLOAT): 0.0, ("b", 4): 2.0, ("b", 8): 0.1, ("b", FLOAT): 0.0,
                   ("c", 4): 5.0, ("c", 8): 4.9, ("c", FLOAT): 0.0}
    sizes = {(n, b): s for n in names for b, s in ((4, 100), (8, 200), (FLOAT, 800))}
    upgrades = ordered_upgrades(names, sensitivity, sizes)
    assert [(u.weight, u.to_bits) for u in upgrades[:2]] == [("a", 8), ("b", 8)]
    assert all(isinstance(u, Upgrade) for u in upgrades)
    assert plan_after(names, upgrades, 1) == {"a": 8, "b": 4, "c": 4}
    # c's second step is worth more per byte than its first: they are taken together, to float32
    assert ("c", FLOAT) in [(u.weight, u.to_bits) for u in upgrades] and ("c", 8) not in [
        (u.weight, u.to_bits) for u in upgrades]


def test_plan_search_finds_the_fewest_upgrades_within_budget_and_refuses_the_impossible():
    names = [f"w{i}" for i in range(8)]
    upgrades = [Upgrade(n, 8, 1.0, 100) for n in names]
    sizes = {(n, b): s for n in names for b, s in ((4, 100), (8, 200), (FLOAT, 800))}

    def measure(plan):  # each upgrade removes 1% of a 10% loss
        return 0.10 - 0.01 * sum(bits == 8 for bits in plan.values())

    plan, trials = search_plan(names, upgrades, sizes, 0.055, measure)
    assert sum(b == 8 for b in plan.values()) == 5 and len(trials) <= 6
    with pytest.raises(EdgeGPTError, match="no quantization plan stays within"):
        search_plan(names, upgrades, sizes, 0.01, measure)


# -- packages ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(tiny_checkpoint, tiny_package, corpus_file):
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.export.calibration import calibrate
    from edgegpt.export.quantize_package import calibration_text

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    text = calibration_text(tiny_checkpoint, corpus_file, tokenizer, tokens=1024)
    names = list(prepare_graph(tiny_package / "model.onnx").projections)
    return calibrate(model, text.tokens, text.source, names, fisher=True)


def package_with(tiny_package: Path, directory: Path, **kwargs) -> tuple[Path, dict]:
    import shutil

    package = Path(shutil.copytree(tiny_package, directory))
    (package / "manifest.json").unlink()  # the graph changes; the runtime loads a package without one
    recorded = quantize_graph(tiny_package / "model.onnx", package / "model.onnx", **kwargs)
    return package, recorded


@pytest.mark.parametrize("options", [
    QuantOptions(8, rounding="rtn"), QuantOptions(8, rounding="search"), QuantOptions(8, symmetric=True),
    QuantOptions(4, rounding="rtn"), QuantOptions(4, rounding="search"), QuantOptions(4, rounding="gptq"),
    QuantOptions(4, block_size=64), QuantOptions(4, block_size=128, symmetric=True), QuantOptions(4, accuracy_level=1),
], ids=lambda o: f"{o.bits}b-{o.rounding}-{o.block_size}-{'sym' if o.symmetric else 'asym'}-acc{o.accuracy_level}")
def test_every_format_runs_close_to_float32(options, tiny_package, calibration, tmp_path, corpus_text):
    """Each option set makes a package whose next-token log-probabilities stay near float32's (8 bits:
    within 0.1 nats at the 99th percentile; 4 bits: 0.6), and the manifest settings say what was done."""
    package, recorded = package_with(tiny_package, tmp_path / "model", options=options, calibration=calibration)
    resolved = options.resolved()
    assert (recorded["bits"], recorded["rounding"], recorded["block_size"], recorded["symmetric"],
            recorded["accuracy_level"]) == (resolved.bits, resolved.rounding, resolved.block_size,
                                            resolved.symmetric, resolved.accuracy_level)
    assert set(recorded["plan"].values()) == {options.bits}
    proto = onnx.load(str(package / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert nbits and all((a["bits"], a["block_size"]) == (resolved.bits, resolved.block_size) for a in attrs)
    assert all(len(n.input) == (3 if resolved.symmetric else 4) for n in nbits)

    assert logprob_gap(tiny_package, package, corpus_text) < (0.1 if options.bits == 8 else 0.6)


def logprob_gap(reference_package: Path, package: Path, corpus_text: str) -> float:
    """The 99th percentile over 96 corpus positions of the largest next-token log-probability difference
    between `package` and the float32 reference."""
    from edgegpt.quality import PackageScorer
    from edgegpt.runtime import Generator
    from edgegpt.scoring import log_softmax

    reference, quantized = Generator.load(reference_package), Generator.load(package)
    ids = np.asarray([reference.package.tokenizer.encode(corpus_text[:600]).ids[:96]])
    want, got = (PackageScorer(g).logits(ids, 0)[0] for g in (reference, quantized))
    return float(np.quantile(np.abs(log_softmax(got) - log_softmax(want)).max(-1), 0.99))


def projection_bits(proto) -> list[int]:
    """The bits of each MatMulNBits node, sorted (the logits projection's included)."""
    return sorted(helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "bits")


def test_a_mixed_plan_loads_generates_and_is_recorded(tiny_package, calibration, tmp_path, corpus_text):
    from edgegpt.runtime import Generator

    names = list(prepare_graph(tiny_package / "model.onnx").projections)
    plan = {name: (4, 8, FLOAT)[i % 3] for i, name in enumerate(names)}
    package, recorded = package_with(tiny_package, tmp_path / "model", options=QuantOptions(4), plan=plan,
                                     calibration=calibration)
    assert recorded["plan"] == plan
    proto = onnx.load(str(package / "model.onnx"))
    weights = {t.name for t in proto.graph.initializer}
    floats = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    assert floats == {name for name, bits in plan.items() if bits == FLOAT}
    bits = projection_bits(proto)
    assert bits.count(4) == list(plan.values()).count(4) and bits.count(8) == list(plan.values()).count(8) + 1
    # It generates, as near to float32 as its 4-bit projections allow (the bound every 4-bit format meets above).
    assert len(Generator.load(package).generate_ids("The import statement", max_new_tokens=12, seed=0,
                                                    stop_at_eos=False)) == 12
    assert logprob_gap(tiny_package, package, corpus_text) < 0.6


@pytest.mark.slow  # over half a second on two cores
def test_quantize_auto_meets_its_budget_and_records_the_plan(tiny_checkpoint, tiny_package, corpus_file, tmp_path,
                                                            corpus_text):
    from rich.console import Console

    from edgegpt.cli.inspect import describe
    from edgegpt.export import export_package, render_report
    from edgegpt.runtime import Generator

    report = export_package(tiny_checkpoint, tmp_path / "model", quantize="auto", max_ppl_increase=2.0,
                            eval_data=corpus_file, calibration_data=corpus_file, eval_tokens=EVAL_TOKENS)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["precision"] == "mixed" and q["bits"] == "auto" and q["budget"]["max_ppl_increase"] == 0.02
    assert set(q["plan"].values()) <= {4, 8, FLOAT} and q["search"]
    check = next(c for c in manifest["gates"]["checks"] if c["name"].startswith("mixed"))
    assert check["passed"] and check["value"] <= 0.02 and check["limit"] == 0.02
    chosen = next(t for t in q["search"] if t["projection_bytes"] == q["projection_bytes"])
    assert chosen["ppl_increase"] <= 0.02
    # The graph holds the recorded plan (one MatMulNBits per 4- or 8-bit projection, and the 8-bit logits
    # projection), and it runs as near to float32 as every 4-bit format does.
    plan_bits = list(q["plan"].values())
    bits = projection_bits(onnx.load(str(tmp_path / "model" / "model.onnx")))
    assert bits.count(4) == plan_bits.count(4) and bits.count(8) == plan_bits.count(8) + 1
    assert len(Generator.load(tmp_path / "model").generate_ids("The import", max_new_tokens=8, seed=0,
                                                               stop_at_eos=False)) == 8
    assert logprob_gap(tiny_package, tmp_path / "model", corpus_text) < 0.6
    console = Console(width=200, record=True)
    console.print(render_report(report))
    console.print(describe(tmp_path / "model"))
    mixed = len(set(q["plan"].values())) > 1  # a uniform plan is said in the summary, not as a grid
    assert console.export_text().count("quantization plan") == (2 if mixed else 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(quantize="auto", max_ppl_increase=-1.0), "--max-ppl-increase is a percentage"),
    (dict(quantize=True, max_ppl_increase=1.0), "--max-ppl-increase is the budget of --quantize auto"),
    (dict(quantize="auto", method="dynamic"), "drop --method dynamic"),
    (dict(quantize="auto", fuse=False), "drop --no-fuse"),
    (dict(quantize=True, rounding="best"), "unknown rounding"),
    (dict(quantize=True, block_size=48), "--block-size 48 is not supported"),
    (dict(quantize=True, accuracy_level=2), "--accuracy-level 2 is not supported"),
    (dict(quantize=True, method="dynamic", block_size=64), "apply to the nbits method"),
    (dict(rounding="gptq"), "--rounding applies to --quantize"),
    (dict(quantize=True, bits=8, method="dynamic", calibration_data=Path("x.txt")), "--calibration-data is read"),
])
def test_bad_quantization_options_are_one_line_and_write_nothing(tiny_checkpoint, corpus_file, tmp_path, kwargs,
                                                                 message):
    from edgegpt.export import export_package

    with pytest.raises(EdgeGPTError, match=message) as raised:
        export_package(tiny_checkpoint, tmp_path / "model", eval_data=corpus_file, eval_tokens=EVAL_TOKENS, **kwargs)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow  # over half a second on two cores
def test_an_impossible_budget_is_refused_after_measuring_writing_nothing(tiny_checkpoint, corpus_file, tmp_path,
                                                                        monkeypatch):
    """A budget even float32 projections miss: one line, no package (the measurement is faked to be sure
    that the all-float32 plan misses; the real one on this tiny model can land either side of 0)."""
    import edgegpt.export.quantize_package as step
    from edgegpt.export import export_package

    real = step.search_plan
    monkeypatch.setattr(step, "search_plan", lambda names, upgrades, sizes, budget, measure, say:
                        real(names, upgrades, sizes, budget, lambda plan: measure(plan) + 1.0, say))
    with pytest.raises(EdgeGPTError, match="no quantization plan stays within --max-ppl-increase 0.10%"):
        export_package(tiny_checkpoint, tmp_path / "model", quantize="auto", max_ppl_increase=0.1,
                       eval_data=corpus_file, calibration_data=corpus_file, eval_tokens=EVAL_TOKENS)
    assert not (tmp_path / "model").exists()


def test_cli_reads_quantize_auto(tmp_path):
    from edgegpt.cli.app import with_quantize_auto

    assert with_quantize_auto(["export", "ck", "--quantize", "auto", "--max-ppl-increase", "1"]) == [
        "export", "ck", "--quantize", "--bits", "auto", "--max-ppl-increase", "1"]
    assert with_quantize_auto(["export", "--quantize=auto"]) == ["export", "--quantize", "--bits", "auto"]
    assert with_quantize_auto(["generate", "--quantize", "auto"]) == ["generate", "--quantize", "auto"]
    assert with_quantize_auto(["export", "auto", "--quantize"]) == ["export", "auto", "--quantize"]


def test_hessians_gathered_a_group_of_layers_at_a_time_equal_one_pass(tiny_checkpoint, tiny_package, corpus_file,
                                                                       monkeypatch):
    """GPTQ's Hessians, gathered per group of layers (each pass stopping after its group) and held a group at a
    time, are the one-pass sums; a name of a dropped group asked for again is gathered again, not lost."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.export import calibration as calibration_module
    from edgegpt.export.quantize_package import calibration_text

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    text = calibration_text(tiny_checkpoint, corpus_file, tokenizer, tokens=1024)
    names = list(prepare_graph(tiny_package / "model.onnx").projections)
    whole = calibration_module.calibrate(model, text.tokens, text.source, names, fisher=True)  # one pass
    monkeypatch.setattr(calibration_module, "HESSIAN_BUDGET", 1e-9)  # every layer a group of its own
    passes = []
    gather = calibration_module._gather
    monkeypatch.setattr(calibration_module, "_gather", lambda *args, **kwargs: (
        passes.append(args[2]), gather(*args, **kwargs))[1])
    grouped = calibration_module.calibrate(model, text.tokens, text.source, names, fisher=False)
    layers = model.cfg.n_layers
    assert len(calibration_module.hessian_groups(model, names)) == layers and len(passes) == 1
    for name in names + names[:1]:
        np.testing.assert_allclose(grouped.hessian(name), whole.hessian(name), rtol=1e-5, atol=1e-3)
        assert len(grouped.inputs) <= len(names) // layers  # one layer's Hessians held
    assert len(passes) == layers + 1  # each group once, then the first again
    assert grouped.tokens == whole.tokens


@pytest.mark.parametrize("rounding, freed_before_quantizing", [("search", True), ("gptq", False)])
def test_the_export_frees_the_model_before_quantizing_unless_gptq_still_reads_it(
        rounding, freed_before_quantizing, tiny_checkpoint, tiny_package, corpus_file, tmp_path, monkeypatch):
    """The PyTorch weights go as soon as nothing reads them: after calibration for "search" (its statistics are
    all gathered), but not before GPTQ has gathered its Hessians, a group of layers at a time, from the model."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.export import quantize_package
    from edgegpt.export.quantize_package import calibration_text, quantize_fixed

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    text = calibration_text(tiny_checkpoint, corpus_file, tokenizer, tokens=1024)
    freed, seen_at_quantizing = [], []
    quantize = quantize_package.quantize_graph
    monkeypatch.setattr(quantize_package, "quantize_graph", lambda *args, **kwargs: (
        seen_at_quantizing.append(bool(freed)), quantize(*args, **kwargs))[1])
    (tmp_path / "out").mkdir()
    quantize_fixed(model, tiny_package, tmp_path / "out", QuantOptions(4, rounding=rounding).resolved(), text,
                   lambda message: None,
                   done_with_model=lambda: freed.append(True))
    assert seen_at_quantizing == [freed_before_quantizing]
    assert freed == ([True] if freed_before_quantizing else [])
