"""The KV cache's precision (`edgegpt export --kv-cache`, export/cache_precision.py): an int8 cache tracks
the float32 one through prefill, decode, growth and rollback; the package records it; bad combinations are
one line and write nothing; a provider that cannot run a cache says so at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import EVAL_TOKENS, assert_one_line_error, grow_beside_a_full_cache
from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export import GateLimits, export_package
from edgegpt.export.cache_precision import (
    CACHE_PERPLEXITY_LIMIT,
    MARGIN,
    cache_perplexity_check,
    calibrate,
    resolve_kv_cache,
)
from edgegpt.export.fused import CacheScales, build_fused_graph, fused_graph_contract
from edgegpt.export.writer import write_package_metadata
from edgegpt.runtime import Generator, ModelPackage
from edgegpt.scoring import log_softmax

runner = CliRunner()
# The int8 cache against the float32 one, on the tiny trained model: the largest |Δ log-probability| of
# any token at any step, and its mean over steps: both stay near half these bounds over a prefill and 110 decode
# steps (steps are max/127 of each channel: an error of at most 0.4% of the channel's range per value).
MAX_LOGPROB_DELTA, MEAN_LOGPROB_DELTA = 0.15, 0.04


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, tiny_checkpoint, corpus_file) -> Path:
    """The tiny checkpoint with float32 weights and an int8 cache, calibrated and gated on the corpus."""
    directory = tmp_path_factory.mktemp("int8-cache") / "model"
    export_package(tiny_checkpoint, directory, kv_cache="int8", eval_data=corpus_file, eval_tokens=EVAL_TOKENS)
    return directory


@pytest.fixture(scope="module")
def fp32(tiny_package) -> Generator:
    return Generator.load(tiny_package, provider="cpu")


@pytest.fixture(scope="module")
def int8(int8_package) -> Generator:
    return Generator.load(int8_package, provider="cpu")


@pytest.fixture(scope="module")
def scales(tiny_checkpoint, corpus_file) -> tuple:
    """(model, tokenizer, CacheScales) calibrated on the corpus as the exporter does."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import prepare_eval_text, read_eval_documents

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    documents, source = read_eval_documents(corpus_file, tiny_checkpoint)
    text = prepare_eval_text(documents, source, tokenizer, model.cfg.vocab_size, model.cfg.max_len, EVAL_TOKENS)
    return model, tokenizer, text, calibrate(model, text)


# -- parity with the float32 cache --------------------------------------------------------------------


def test_int8_cache_tracks_the_float32_cache_across_growths_and_a_rollback(fp32, int8, monkeypatch):
    """Greedy tokens of the float32 package fed to both: the log-probabilities stay within the stated
    tolerance after the prefill and at every one of 110 decode steps, while the int8 buffers grow 8 -> 128
    and, halfway, take a rejected draft that is rolled back."""
    from edgegpt.runtime import kv_cache

    monkeypatch.setattr(kv_cache, "FIRST_POSITIONS", 8)  # read at each allocation: growths at 8, 16, 32, 64
    ids = fp32.encode("The import statement")
    expected, reference = fp32.prefill(ids)
    got, cache = int8.prefill(ids)
    deltas, capacities = [np.abs(log_softmax(got) - log_softmax(expected)).max()], set()
    for step in range(110):
        token = int(np.argmax(expected))
        if step == 55:  # a drafted run the target rejects, then rolled back
            length = cache.length
            _, cache = int8.forward([7, 8, 9, 10], cache)
            cache = cache.truncated(length)
        expected, reference = fp32.decode_step(token, reference)
        got, cache = int8.decode_step(token, cache)
        deltas.append(np.abs(log_softmax(got) - log_softmax(expected)).max())
        capacities.add(cache.capacity)
    assert {8, 16, 32, 64, 128} <= capacities, capacities  # crossed every growth up to max_length
    assert {array.dtype for array in cache.step.arrays.values()} == {np.dtype(np.int8)}
    assert max(deltas) <= MAX_LOGPROB_DELTA and np.mean(deltas) <= MEAN_LOGPROB_DELTA, (max(deltas), np.mean(deltas))
    assert max(deltas) > 0  # the cache is quantized: a difference of exactly 0 would mean it is not


def test_a_rolled_back_int8_cache_continues_exactly_as_a_fresh_prefill(int8):
    """Quantizing is per value with fixed steps, so the int8 positions a rollback leaves are what a fresh
    prefill writes: the continuation matches it to float32 rounding, as a chunk and token by token."""
    prompt, real, bogus = [5, 17, 42, 99, 7], [12, 250, 3], [400, 401, 402, 403]
    expected = int8.score(prompt + real)[len(prompt):]
    _, cache = int8.forward(prompt, int8.empty_cache())
    _, cache = int8.forward(bogus, cache)
    cache = cache.truncated(len(prompt))
    as_chunk, _ = int8.forward(real, cache)
    np.testing.assert_allclose(as_chunk, expected, atol=1e-4, rtol=0)
    cache = cache.truncated(len(prompt))
    for i, token in enumerate(real):
        logits, cache = int8.forward([token], cache)
        np.testing.assert_allclose(logits[-1], expected[i], atol=1e-4, rtol=0)


def test_a_growing_int8_cache_gives_the_logits_of_a_full_one(int8):
    """Growth copies int8 bytes: by single steps and by chunks that cross a boundary, the logits equal
    those of a cache allocated at max_length from the start."""
    capacities, _ = grow_beside_a_full_cache(int8)
    assert sorted(set(capacities)) == [4, 8, 16, 32, 64, 128]


def test_int8_cache_is_a_quarter_of_float32_per_token(fp32, int8):
    """Bytes per token, from the buffers themselves: same capacity, a quarter of the bytes."""
    capacity = 64
    nbytes = {name: sum(a.nbytes for a in g.empty_cache(capacity=capacity).step.arrays.values())
              for name, g in (("fp32", fp32), ("int8", int8))}
    assert nbytes["int8"] * 4 == nbytes["fp32"]
    spec = int8.config
    assert nbytes["int8"] == capacity * 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim  # one byte a value
    assert int8.package.cache_bytes_per_token * capacity == nbytes["int8"]
    assert fp32.package.cache_bytes_per_token * capacity == nbytes["fp32"]


def test_packed_and_separate_projections_quantize_the_same_cache(scales, tmp_path):
    """PACK_QKV or three MatMuls: the same K and V reach the op, so the same int8 cache and logits."""
    model, tokenizer, _, steps = scales
    logits = {}
    for packed in (True, False):
        directory = tmp_path / f"packed-{packed}"
        directory.mkdir()
        build_fused_graph(model, directory / "model.onnx", scales=steps, pack_qkv=packed)
        write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer,
                               graph=fused_graph_contract(model.cfg, "fp32", steps))
        generator = Generator.load(directory, provider="cpu")
        logits[packed] = generator.score(list(range(1, 60)))
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["nbits", "dynamic"])
def test_weight_quantization_keeps_the_int8_cache(scales, tmp_path, method):
    """quantize_graph rewrites MatMuls only: the quantized graph keeps the int8 cache, loads, and stays
    close to the unquantized one."""
    from edgegpt.export.quantize import quantize_graph

    model, tokenizer, _, steps = scales
    contract = fused_graph_contract(model.cfg, "fp32", steps)
    source, quantized = tmp_path / "int8-cache", tmp_path / method
    for directory in (source, quantized):
        directory.mkdir()
        write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract)
    build_fused_graph(model, source / "model.onnx", scales=steps)
    quantize_graph(source / "model.onnx", quantized / "model.onnx", 8, method)
    proto = onnx.load(str(quantized / "model.onnx"))
    attention = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == model.cfg.n_layers
    assert all({a.name: a for a in n.attribute}["k_quant_type"].s == b"PER_CHANNEL" for n in attention)
    assert proto.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.INT8
    ids = list(range(1, 60))
    got = Generator.load(quantized, provider="cpu").score(ids)
    expected = Generator.load(source, provider="cpu").score(ids)
    assert np.abs(log_softmax(got) - log_softmax(expected)).max() < 0.5


# -- calibration ----------------------------------------------------------------------------------------


def test_steps_cover_every_cached_value_with_the_margin_at_any_position(scales):
    """K's steps bound |K| after the rotary at every position the cache can hold (below max_len), not only
    at the positions calibration saw; V's are the channel's max; both times MARGIN / 127. Checked on the
    first calibration window's PyTorch cache, its keys turned on to every later position they fit
    (rotations compose: turning position p's key by position q's angles gives position p + q's), and the
    slow pairs' steps are tighter than the pair norm (they never turn half a circle)."""
    import torch

    from edgegpt.model import rotate_half

    model, _, text, steps = scales
    cfg, span = model.cfg, 32
    window = torch.as_tensor(text.tokens[:span])[None]
    with torch.no_grad():
        _, present = model.forward_cached(window, model.empty_cache())
    slack = 1 + 1e-5  # PyTorch's cached and uncached forwards round differently
    shifts = torch.arange(cfg.max_len - span + 1)
    cos, sin = model.rotary(shifts[:, None].expand(-1, span))  # [shifts, 1, span, head_dim]
    for layer, (k, v) in enumerate(present):
        turned = (k * cos + rotate_half(k) * sin).abs().amax(dim=(0, 2)).numpy()  # [n_kv_heads, head_dim]
        assert np.all(turned <= steps.k[layer][0, :, 0] * 127 / MARGIN * slack)
        assert np.all(v[0].abs().amax(dim=1).numpy() <= steps.v[layer][0, :, 0] * 127 / MARGIN * slack)
    per_tensor = calibrate(model, text, "PER_TENSOR")
    assert {s.shape for s in per_tensor.k + per_tensor.v} == {(1,)}
    assert all(float(t[0]) == pytest.approx(float(c.max())) for t, c in zip(per_tensor.k, steps.k))


def test_the_rotated_bound_is_the_largest_key_over_the_positions():
    """rotated_bound against brute force over every integer position: never below it, at most a hair
    above (the bound is over continuous angles), and for a pair that turns little, well under the pair
    norm that a fully turning pair needs."""
    import torch

    from edgegpt.export.cache_precision import rotated_bound

    head_dim, positions = 16, 300
    keys = torch.randn(400, 2, head_dim, generator=torch.Generator().manual_seed(0))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    bound = rotated_bound(keys, (positions - 1) * inv_freq)
    angles = torch.arange(positions).double()[:, None] * inv_freq  # [positions, head_dim / 2]
    a, b = keys[..., : head_dim // 2].double(), keys[..., head_dim // 2:].double()
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    brute = torch.cat(((a * cos - b * sin).abs().amax(0), (b * cos + a * sin).abs().amax(0)), dim=-1)
    assert bool((bound >= brute - 1e-12).all()) and float(((bound - brute) / brute).max()) < 1e-3
    slow = head_dim // 2 - 1  # turns (positions - 1) · inv_freq ≈ 0.1 rad in all
    norm = torch.sqrt(a[..., slow] ** 2 + b[..., slow] ** 2)
    assert float((bound[..., slow] / norm).mean()) < 0.8


# -- what the package records ---------------------------------------------------------------------------


def test_config_and_manifest_record_the_cache(int8_package, tiny_package, corpus_file):
    config = json.loads((int8_package / "config.json").read_text())["graph"]
    assert config["dtype"] == "int8" and config["inputs"]["past_key.0"]["dtype"] == "int8"
    assert config["outputs"]["present_value.3"]["dtype"] == "int8"
    block = config["kv_cache"]
    assert block["dtype"] == "int8" and block["quantization"] == "PER_CHANNEL" and block["bit_width"] == 8
    assert block["calibration"]["source"] == str(corpus_file) and block["calibration"]["margin"] == MARGIN
    manifest = json.loads((int8_package / "manifest.json").read_text())
    assert manifest["precision"] == "float32" and manifest["kv_cache"]["dtype"] == "int8"
    calibration = manifest["kv_cache"]["calibration"]
    assert calibration["source"] == str(corpus_file) and calibration["tokens"] == EVAL_TOKENS + 1
    assert len(calibration["max_abs_k"]) == len(calibration["max_abs_v"]) == 4  # nano's layers
    checks = {c["name"]: c for c in manifest["gates"]["checks"]}
    cache_gate = checks["float32 + int8 cache perplexity vs PyTorch"]
    assert cache_gate["limit"] == CACHE_PERPLEXITY_LIMIT and cache_gate["passed"]
    assert "float32 graph max |Δlog p| / max |logit| vs PyTorch" in checks  # the float32 cache's graph
    names = [m["name"] for m in manifest["gates"]["models"]]
    assert names == ["PyTorch float32", "package (fused, float32, int8 cache)"]
    proto = onnx.load(str(int8_package / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["k_quant_type"] == attributes["v_quant_type"] == b"PER_CHANNEL"
    assert attributes["kv_cache_bit_width"] == 8
    assert list(node.input[9:]) == ["", "", "", "layers.0.attn.k_scale", "layers.0.attn.v_scale"]
    scale = next(t for t in proto.graph.initializer if t.name == "layers.0.attn.k_scale")
    assert scale.data_type == onnx.TensorProto.FLOAT and list(scale.dims) == [1, 2, 1, 32]
    # A float package says its cache too.
    assert json.loads((tiny_package / "manifest.json").read_text())["kv_cache"] == {"dtype": "float32"}
    assert ModelPackage.load(int8_package).graph.kv_cache["quantization"] == "PER_CHANNEL"


def test_info_shows_the_cache(int8_package):
    result = runner.invoke(app, ["info", str(int8_package)])
    assert result.exit_code == 0, result.output
    for fragment in ("int8 KV cache", "PER_CHANNEL", "bytes per token", "512", "calibrated on"):
        assert fragment in result.stdout, fragment  # 2 × 4 layers × 2 heads × 32 × 1 byte per token = 512


def test_generate_through_the_cli(int8_package):
    result = runner.invoke(app, ["generate", "The import statement", "--model", str(int8_package),
                                 "--max-new-tokens", "12", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The import statement") and len(result.stdout) > len("The import statement")


@pytest.mark.slow  # a second export with its gate (seconds); the fast tests cover each half of it
def test_export_quantized_with_an_int8_cache_and_generate_through_the_cli(tiny_checkpoint, corpus_file, tmp_path):
    out = tmp_path / "model"
    options = ["--quantize", "--kv-cache", "int8", "--eval-data", str(corpus_file), "--eval-tokens", str(EVAL_TOKENS)]
    exported = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(out), *options, "--json"])
    assert exported.exit_code == 0, exported.output
    report = json.loads(exported.stdout)
    assert report["precision"] == "int8" and report["kv_cache"]["dtype"] == "int8"
    check = next(c for c in report["gates"]["checks"] if "cache" in c["name"])
    # int8 weights and the int8 cache: the two limits add up (export/cache_precision.py).
    assert check["name"] == "int8 + int8 cache perplexity vs PyTorch" and check["passed"]
    assert check["limit"] == pytest.approx(0.015 + CACHE_PERPLEXITY_LIMIT)
    generated = runner.invoke(app, ["generate", "The import statement", "--model", str(out), "--max-new-tokens", "12",
                                    "--seed", "1"])
    assert generated.exit_code == 0, generated.output
    # The package's own sampling defaults and an int8 cache, through the command line: the API's text.
    expected = Generator.load(out).generate("The import statement", max_new_tokens=12, seed=1)
    assert generated.stdout == "The import statement" + expected + "\n"


# -- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, fragments", [
    (["--kv-cache", "int8", "--no-fuse"], ["--kv-cache int8 needs the fused graph"]),
    (["--kv-cache", "fp16"], ["--kv-cache fp16 is for CUDA", "--precision fp16"]),
    (["--kv-cache", "int4"], ["--kv-cache int4 is not supported"]),
    (["--precision", "fp16", "--kv-cache", "int8"], ["keeps its cache in float16"]),
    (["--precision", "fp16", "--kv-cache", "fp32"], ["keeps its cache in float16"]),
    (["--kv-cache", "int8"], ["no train_state.json", "--eval-data"]),  # nothing to calibrate on
])
def test_bad_combinations_are_one_line_and_write_nothing(tiny_checkpoint, tmp_path, options, fragments):
    out = tmp_path / "model"
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(out), *options])
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_the_option_resolves_per_precision():
    from edgegpt.core.config import preset

    assert resolve_kv_cache(None, True, "float32") == "fp32" and resolve_kv_cache(None, True, "float16") == "fp16"
    assert resolve_kv_cache("int8", True, "float32") == "int8" and resolve_kv_cache("fp32", False, "float32") == "fp32"
    with pytest.raises(EdgeGPTError, match="float32 graph"):
        fused_graph_contract(preset("nano"), "fp16", CacheScales("PER_TENSOR", (), ()))


def test_the_gate_adds_the_cache_share_to_the_weights_limit():
    class Scored:
        def __init__(self, perplexity: float) -> None:
            self.perplexity = perplexity

    reference, package = Scored(10.0), Scored(10.03)
    limits = GateLimits()
    alone = cache_perplexity_check("float32", "int8", reference, package, limits)
    assert alone.limit == CACHE_PERPLEXITY_LIMIT and alone.value == pytest.approx(0.003) and alone.passed
    with_weights = cache_perplexity_check("int4", "int8", reference, package, limits)
    assert with_weights.limit == pytest.approx(0.05 + CACHE_PERPLEXITY_LIMIT)
    strict = GateLimits(perplexity_increase={**limits.perplexity_increase, "int8 cache": 0.001})
    assert not cache_perplexity_check("float32", "int8", reference, package, strict).passed
    assert cache_perplexity_check("float32", "fp32", reference, package, limits) is None  # the logit check's job


def test_a_cache_the_provider_cannot_run_is_refused_at_load(tiny_checkpoint, int8_package, tmp_path):
    """float16 caches are CUDA's, int8 the CPU's: each is one line at load, whichever way it is reached."""
    from edgegpt.runtime.session import create_session, cuda_available

    fp16 = tmp_path / "fp16"
    export_package(tiny_checkpoint, fp16, precision="fp16", gate=False)
    assert json.loads((fp16 / "config.json").read_text())["graph"]["kv_cache"] == {"dtype": "float16"}
    with pytest.raises(EdgeGPTError, match="float16") as refused:
        Generator.load(fp16, provider="cpu")
    assert "\n" not in str(refused.value)
    if not cuda_available():
        with pytest.raises(EdgeGPTError, match="CUDA"):
            Generator.load(int8_package, provider="cuda")
    # Below Generator.load (a session made by hand): the runner refuses the cache itself.
    session, _ = create_session(int8_package / "model.onnx", provider="cpu")
    with pytest.raises(EdgeGPTError, match="keeps its KV cache in int8, which provider 'cuda' cannot run"):
        Generator(ModelPackage.load(int8_package), session, "cuda")


def test_a_config_that_contradicts_the_graph_cache_is_refused(int8_package, tmp_path):
    copy = Path(shutil.copytree(int8_package, tmp_path / "model"))
    (copy / "manifest.json").unlink()  # edited files would fail the sha256 check first
    config = json.loads((copy / "config.json").read_text())
    graph = config["graph"]
    inputs = {name: {**spec, "dtype": "float32"} if name.startswith("past") else spec
              for name, spec in graph["inputs"].items()}
    as_float = {**graph, "dtype": "float32", "kv_cache": {"dtype": "float32"}, "inputs": inputs}
    (copy / "config.json").write_text(json.dumps({**config, "graph": as_float}))
    with pytest.raises(EdgeGPTError, match=r"takes a tensor\(int8\) cache but config.json says float32"):
        Generator.load(copy, provider="cpu")
    (copy / "config.json").write_text(json.dumps({**config, "graph": {**graph, "kv_layout": "concat"}}))
    with pytest.raises(EdgeGPTError, match="an int8 cache needs kv_layout 'static'"):
        Generator.load(copy, provider="cpu")
    (copy / "config.json").write_text(json.dumps({**config, "graph": {**graph, "kv_cache": {"dtype": "float16"}}}))
    with pytest.raises(EdgeGPTError, match="contradicts dtype"):
        Generator.load(copy, provider="cpu")
