"""The fused graph (export/fused.py) against the plain torch.onnx graph, and the runtime on fused packages."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.config import preset
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.fused import build_fused_graph, fused_graph_contract
from edgegpt.export.onnx_export import export_plain_onnx, graph_contract
from edgegpt.export.writer import write_package_metadata
from edgegpt.model import GPT
from edgegpt.runtime import Generator

TOLERANCE = 1e-4


def write_package(checkpoint: Path, directory: Path, layout: str, precision: str = "fp32") -> Path:
    """A model package of the given kv_layout ("static": fused, "concat": plain) from a checkpoint,
    written without export_package's checks and gates, so a test picks exactly the graph it runs."""
    model, tokenizer = load_checkpoint(checkpoint)
    directory.mkdir(parents=True)
    if layout == "static":
        build_fused_graph(model, directory / "model.onnx", precision)
        contract = fused_graph_contract(model.cfg, precision)
    else:
        export_plain_onnx(model, directory / "model.onnx")
        contract = graph_contract(model.cfg)
    # No manifest.json: the runtime does not need one.
    write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract)
    return directory


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> GPT:
    return load_checkpoint(tiny_checkpoint)[0]


@pytest.fixture(scope="module")
def graphs(model, plain_package, tmp_path_factory) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """(plain, fused) sessions of the tiny checkpoint's model; the plain graph is the session's plain
    package (exporting it again would cost seconds and test nothing more)."""
    directory = tmp_path_factory.mktemp("graphs")
    build_fused_graph(model, directory / "fused.onnx")
    return session(plain_package / "model.onnx"), session(directory / "fused.onnx")


@pytest.fixture(scope="module")
def fused(tiny_checkpoint, tmp_path_factory) -> Generator:
    return Generator.load(write_package(tiny_checkpoint, tmp_path_factory.mktemp("fused") / "model", "static"), "cpu")


def run_plain(sess, cfg, ids, mask, past):
    """One call of the plain graph: logits [B, S, vocab] and its present (past ++ new) per layer."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = k, v
    logits, *flat = sess.run(None, feeds)
    return logits, list(zip(flat[0::2], flat[1::2]))


def run_fused(sess, ids, lengths, past):
    """One call of the fused graph; `lengths` [B] = valid tokens per row after this call. With run()
    (no IO binding) the cache comes back as a copy; the runtime's in-place path is tested below."""
    feeds = {
        "input_ids": ids,
        "seqlens_k": np.asarray(lengths, np.int32) - 1,
        "total_sequence_length": np.array(max(lengths), np.int32),
    }
    for i, (k, v) in enumerate(past):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = k, v
    logits, *flat = sess.run(None, feeds)
    return logits, list(zip(flat[0::2], flat[1::2]))


def empty(cfg, batch: int, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    zeros = np.zeros((batch, cfg.n_kv_heads, length, cfg.head_dim), np.float32)
    return [(zeros, zeros) for _ in range(cfg.n_layers)]


# -- the graph ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nano", pytest.param("small", marks=pytest.mark.slow)])  # small: a 29M graph
def test_operator_census_and_node_names(name, tmp_path):
    torch.manual_seed(0)
    cfg = preset(name)
    build_fused_graph(GPT(cfg), tmp_path / "fused.onnx")
    proto = onnx.load_model(str(tmp_path / "fused.onnx"))
    census = Counter(node.op_type for node in proto.graph.node)
    assert census["GroupQueryAttention"] == cfg.n_layers
    assert "Softmax" not in census
    assert census["SkipSimplifiedLayerNormalization"] == 2 * cfg.n_layers
    assert census["SimplifiedLayerNormalization"] == 1
    path = re.compile(r"^/(embed|norm|lm_head|layers\.\d+/(attn_norm|mlp_norm|attn|mlp)(/\w+_proj|/act)?)/[A-Za-z]+$")
    assert [n.name for n in proto.graph.node if not path.match(n.name)] == []
    names = {n.name: n for n in proto.graph.node}
    last = cfg.n_layers - 1
    assert f"/layers.{last}/attn/GroupQueryAttention" in names
    assert f"/layers.{last}/mlp/gate_proj/MatMul" in names
    # The LM head multiplies by the transpose of the embedding's own table (tied), stored once.
    head = names["/lm_head/FusedMatMul"]
    weights = {t.name: t for t in proto.graph.initializer}
    assert head.input[1] == "embed.weight" and "lm_head.weight" not in weights
    assert list(weights[head.input[1]].dims) == [cfg.vocab_size, cfg.dim]
    assert proto.ir_version <= 10


def test_contract_of_the_graph(model, graphs):
    _, fused_session = graphs
    contract = fused_graph_contract(model.cfg)
    assert [i.name for i in fused_session.get_inputs()] == list(contract["inputs"])
    assert [o.name for o in fused_session.get_outputs()] == list(contract["outputs"])
    assert contract["kv_layout"] == "static"
    with pytest.raises(EdgeGPTError, match="precision"):
        fused_graph_contract(model.cfg, "int3")


# -- parity with the plain graph ---------------------------------------------------------------------


@pytest.mark.parametrize("past_len", [0, 1, 100])
def test_fused_matches_plain_after_a_past(model, graphs, past_len):
    cfg, (plain, fused_session) = model.cfg, graphs
    ids = np.random.default_rng(past_len).integers(0, cfg.vocab_size, (1, past_len + 8))
    chunks = [ids[:, :past_len], ids[:, past_len:]] if past_len else [ids]
    plain_past, fused_past, seen = empty(cfg, 1, 0), empty(cfg, 1, cfg.max_len), 0
    for chunk in chunks:
        seen += chunk.shape[1]
        expected, plain_past = run_plain(plain, cfg, chunk, np.ones((1, seen), np.int64), plain_past)
        got, fused_past = run_fused(fused_session, chunk, [seen], fused_past)
        assert np.abs(got - expected).max() <= TOLERANCE


def test_fused_matches_plain_on_a_batch_of_different_lengths(model, graphs):
    """Right-padded rows in the fused graph, left-padded rows with a mask in the plain one."""
    cfg, (plain, fused_session) = model.cfg, graphs
    rng = np.random.default_rng(3)
    lengths = [9, 5, 2]
    rows = [rng.integers(1, cfg.vocab_size, n) for n in lengths]
    width = max(lengths)
    right = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
    left = np.stack([np.pad(r, (width - len(r), 0)) for r in rows])
    mask = np.stack([np.pad(np.ones(len(r), np.int64), (width - len(r), 0)) for r in rows])
    expected, plain_past = run_plain(plain, cfg, left, mask, empty(cfg, 3, 0))
    got, fused_past = run_fused(fused_session, right, lengths, empty(cfg, 3, cfg.max_len))
    for b, n in enumerate(lengths):
        assert np.abs(got[b, :n] - expected[b, width - n :]).max() <= TOLERANCE
    for step in range(2):  # decode steps on top of the padded caches: every row one new token
        tokens = rng.integers(1, cfg.vocab_size, (3, 1))
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        lengths = [n + 1 for n in lengths]
        expected, plain_past = run_plain(plain, cfg, tokens, mask, plain_past)
        got, fused_past = run_fused(fused_session, tokens, lengths, fused_past)
        assert np.abs(got - expected).max() <= TOLERANCE, f"step {step}"


# -- the runtime on a fused package ------------------------------------------------------------------


def test_greedy_generation_matches_pytorch(fused, model):
    from test_runtime import torch_greedy

    ids = fused.encode("The ")
    expected = torch_greedy(model, ids, 64, fused.package.generation.eos_token_id)
    assert len(expected) > 8
    assert fused.generate_ids("The ", max_new_tokens=64, temperature=0) == expected


def test_score_matches_pytorch(fused, model):
    ids = np.random.default_rng(5).integers(0, model.cfg.vocab_size, model.cfg.max_len).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    got = fused.score(ids)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    with pytest.raises(EdgeGPTError, match="exceed the context"):
        fused.score(ids + [1])
    with pytest.raises(EdgeGPTError, match="token ids"):
        fused.score([])


def test_decode_step_writes_the_cache_in_place(fused, model, monkeypatch):
    ids = fused.encode("The quick brown fox")
    _, cache = fused.prefill(ids)
    buffers = {name: value.data_ptr() for name, value in cache.tensors.items()}
    fetched: list[tuple[int, ...]] = []
    to_numpy = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: fetched.append(tuple(self.shape())) or to_numpy(self))
    for token in (5, 77, 300):
        _, cache = fused.decode_step(token, cache)
        assert {name: value.data_ptr() for name, value in cache.tensors.items()} == buffers
        # The graph's present outputs are the very buffers bound as past: nothing was allocated or copied.
        assert [value.data_ptr() for value in cache.binding.get_outputs()[1:]] == list(buffers.values())
    assert [shape for shape in fetched if len(shape) == 4] == []  # no cache came back to numpy
    monkeypatch.undo()
    # ... and the buffer holds exactly PyTorch's keys for every position written, zeros after.
    with torch.no_grad():
        _, past = model.forward_cached(torch.tensor([ids + [5, 77, 300]]), model.empty_cache())
    key = cache.tensors["past_key.0"].numpy()
    assert key.shape == (1, model.cfg.n_kv_heads, fused.max_length, model.cfg.head_dim)
    assert np.abs(key[:, :, : cache.length] - past[0][0].numpy()).max() <= TOLERANCE
    assert not key[:, :, cache.length :].any()


def test_max_length_override(tiny_checkpoint, fused):
    short = Generator.load(fused.package.path, provider="cpu", max_length=16)
    prompt_len = len(short.encode("The "))
    assert len(short.generate_ids("The ", max_new_tokens=100, temperature=0)) == 16 - prompt_len + 1
    assert short.empty_cache().tensors["past_key.0"].shape()[2] == 16
    with pytest.raises(EdgeGPTError, match="context is 16 tokens.*larger max_length"):
        short.generate("word " * 40)
    max_len = fused.config.max_len
    message = f"max_length must be an integer from 1 to the model's context {max_len}"
    for bad in (0, max_len + 1, 2.5):
        with pytest.raises(EdgeGPTError, match=message):
            Generator.load(fused.package.path, provider="cpu", max_length=bad)


def test_float16_package_is_refused_on_the_cpu(tiny_checkpoint, tmp_path):
    package = write_package(tiny_checkpoint, tmp_path / "model", "static", precision="fp16")
    with pytest.raises(EdgeGPTError, match=r"float16 package.*CUDA.*float32 or int8"):
        Generator.load(package, provider="cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EdgeGPTError, match=r"float16 package.*CUDA"):
            Generator.load(package)  # "auto" must not fall back to the CPU either
