"""The plain ONNX export (the oracle) and the model package: parity with PyTorch, the package files,
atomicity. Quantization: test_quantize.py; gates and eval: test_gates.py; the fused graph: test_fused.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.errors import EdgeGPTError
from edgegpt.tokenizer import end_of_text_id

PACKAGE_FILES = {"model.onnx", "config.json", "tokenizer.json", "generation_config.json", "manifest.json"}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]



def session(package: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run(sess, cfg, ids: np.ndarray, past=None, mask=None):
    """One call of the graph by its contract names: logits [B, S, vocab] and present per layer."""
    B, S = ids.shape
    if past is None:
        empty = np.zeros((B, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
        past = [(empty, empty)] * cfg.n_layers
    P = past[0][0].shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((B, P + S), np.int64) if mask is None else mask}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = k, v
    names = ["logits"] + [f"present_{kv}.{i}" for i in range(cfg.n_layers) for kv in ("key", "value")]
    logits, *flat = sess.run(names, feeds)
    return logits, list(zip(flat[0::2], flat[1::2]))


@pytest.mark.parametrize("past_len", [0, 1, 37])
def test_float32_logits_match_pytorch(plain_package, model, past_len):
    cfg, sess = model.cfg, session(plain_package)
    ids = np.random.default_rng(past_len).integers(0, cfg.vocab_size, (1, past_len + 5))
    with torch.no_grad():
        expected, _ = model.forward_cached(torch.from_numpy(ids), model.empty_cache())
    past = None
    if past_len:  # prefill, then continue on top of the graph's own cache
        first, past = run(sess, cfg, ids[:, :past_len])
        np.testing.assert_allclose(first, expected[:, :past_len].numpy(), atol=1e-4, rtol=0)
    got, present = run(sess, cfg, ids[:, past_len:], past)
    assert np.abs(got - expected[:, past_len:].numpy()).max() <= 1e-4
    assert present[0][0].shape == (1, cfg.n_kv_heads, past_len + 5, cfg.head_dim)


def test_left_padded_batch_equals_unpadded_rows(plain_package, model):
    cfg, sess = model.cfg, session(plain_package)
    rng = np.random.default_rng(1)
    long, short = rng.integers(1, cfg.vocab_size, (1, 9)), rng.integers(1, cfg.vocab_size, (1, 5))
    ids = np.concatenate([long, np.pad(short, ((0, 0), (4, 0)))])
    mask = np.concatenate([np.ones((1, 9)), np.pad(np.ones((1, 5)), ((0, 0), (4, 0)))]).astype(np.int64)
    logits, past = run(sess, cfg, ids, mask=mask)
    alone_long, past_long = run(sess, cfg, long)
    alone_short, past_short = run(sess, cfg, short)
    np.testing.assert_allclose(logits[0], alone_long[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 4:], alone_short[0], atol=1e-4, rtol=0)
    # One decode step on top of the padded cache still matches each row decoded alone.
    step = np.array([[7], [11]])
    logits, _ = run(sess, cfg, step, past, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1))
    np.testing.assert_allclose(logits[0], run(sess, cfg, step[:1], past_long)[0][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], run(sess, cfg, step[1:], past_short)[0][0], atol=1e-4, rtol=0)


def test_greedy_continuation_is_identical(plain_package, model, tiny_checkpoint):
    from edgegpt.reference import TorchReference

    cfg, sess = model.cfg, session(plain_package)
    prompt = load_checkpoint(tiny_checkpoint)[1].encode("The value of").ids
    expected = TorchReference(model).greedy(prompt, 64)
    logits, past = run(sess, cfg, np.array([prompt]))
    got = []
    for _ in range(64):
        got.append(int(logits[0, -1].argmax()))
        logits, past = run(sess, cfg, np.array([[got[-1]]]), past)
    assert got == expected
    assert len(set(got)) > 1  # a constant continuation would make this comparison weak


@pytest.mark.parametrize("kind", ["fused", "plain"])
def test_package_files_and_manifest(tiny_package, plain_package, model, tiny_checkpoint, kind):
    package = tiny_package if kind == "fused" else plain_package
    assert {p.name for p in package.iterdir()} == PACKAGE_FILES
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["files"]) == PACKAGE_FILES - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((package / name).read_bytes()).hexdigest() == digest
    proto = onnx.load(str(package / "model.onnx"))
    assert manifest["ir_version"] == proto.ir_version <= 10
    assert manifest["opset"] == 20
    assert manifest["graph"] == kind and manifest["precision"] == "float32" and manifest["quantization"] is None
    assert manifest["operator_census"] == dict(Counter(n.op_type for n in proto.graph.node).most_common())
    if kind == "fused":
        assert manifest["operator_census"]["GroupQueryAttention"] == model.cfg.n_layers
    verification = manifest["verification"]
    assert verification["passed"] and verification["relative_error"] <= verification["tolerance"]
    # No held-out text (the fixture checkpoint has no train_state.json): the float32 gate is the logits.
    assert manifest["gates"]["enabled"] and manifest["gates"]["passed"] and manifest["gates"]["eval"] is None
    assert set(manifest["versions"]) >= {"onnx", "onnxruntime", "torch"}

    config = json.loads((package / "config.json").read_text())
    assert config["format"] == "edgegpt-package" and config["model"] == model.cfg.to_dict()
    graph = config["graph"]
    assert graph["kv_layout"] == {"fused": "static", "plain": "concat"}[kind]
    assert list(graph["inputs"]) == [i.name for i in proto.graph.input]
    assert list(graph["outputs"]) == [o.name for o in proto.graph.output]
    assert graph["inputs"]["past_key.3"]["shape"][1::2] == [2, 32]  # [batch, n_kv_heads, length, head_dim]

    tokenizer = load_checkpoint(tiny_checkpoint)[1]
    generation = json.loads((package / "generation_config.json").read_text())
    assert generation == {
        "max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
        "eos_token_id": end_of_text_id(tokenizer),
    }
    assert (package / "tokenizer.json").read_text() == (tiny_checkpoint / "tokenizer.json").read_text()


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from edgegpt.export import export_package

    with pytest.raises(EdgeGPTError, match="no checkpoint"):
        export_package(tmp_path / "nothing-here", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_package(tiny_checkpoint, tmp_path):
    from edgegpt.export import export_package

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(EdgeGPTError, match="not an edgegpt model package"):
        export_package(tiny_checkpoint, precious)
    assert (precious / "todo.txt").read_text() == "keep me"


def test_failed_export_keeps_the_old_package(tiny_checkpoint, tiny_package, tmp_path, monkeypatch):
    import edgegpt.export.package as package

    out = tmp_path / "model"
    shutil.copytree(tiny_package, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("verification crashed")

    monkeypatch.setattr(package, "verify_generator", broken)
    with pytest.raises(RuntimeError, match="verification crashed"):
        package.export_package(tiny_checkpoint, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or .old directory left


def test_report_is_json_and_export_is_quiet(tiny_checkpoint, tmp_path, capfd):
    from rich.console import Console

    from edgegpt.export import export_package, render_report

    steps = []
    report = export_package(tiny_checkpoint, tmp_path / "model", progress=steps.append)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # torch.onnx's progress lines and warnings are captured
    assert steps and all(isinstance(s, str) for s in steps)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["precision"] == "float32" and data["graph"] == "fused" and data["sizes"]["float_bytes"] > 0
    assert data["verification"]["max_abs_logit_diff"]["37"] <= 1e-4 and data["written"]
    console = Console(record=True, width=120)
    console.print(render_report(report))
    text = console.export_text()
    for fragment in ("float graph size", "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "quality gates"):
        assert fragment in text, fragment
