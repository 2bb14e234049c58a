"""The torch-free runtime against PyTorch, and its behaviour on damaged packages and bad arguments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import RUNTIME_ATOL, grow_beside_a_full_cache, same_tokens
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator, ModelPackage

PROMPTS = ["The ", "def f(x):\n\treturn", ""]


@pytest.fixture(scope="module", params=["static", "concat"])
def generator(request, runtime_package, runtime_provider) -> Generator:
    """The runtime on the tiny checkpoint once per cache layout (docs/FORMATS.md): `static` (the fused
    graph: runtime_package, float16 under EDGEGPT_TEST_PROVIDER=cuda) and `concat` (the plain graph:
    the session's plain package)."""
    if request.param == "concat":
        return Generator.load(request.getfixturevalue("plain_package"), provider=runtime_provider)
    return Generator.load(runtime_package, provider=runtime_provider)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from edgegpt.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    return model


@pytest.fixture
def package_copy(tiny_package, tmp_path) -> Path:
    """A private copy to damage, without manifest.json: these tests reach the checks after the sha256
    verification, which refuses any edited file first (tests/test_untrusted.py)."""
    copy = Path(shutil.copytree(tiny_package, tmp_path / "model"))
    (copy / "manifest.json").unlink()
    return copy


def torch_greedy(model, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    """The reference: PyTorch's own cached forward, argmax each step."""
    import torch

    out = []
    with torch.no_grad():
        logits, past = model.forward_cached(torch.tensor([prompt_ids]), model.empty_cache())
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            logits, past = model.forward_cached(torch.tensor([[token]]), past)
    return out


# -- parity with PyTorch ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_pytorch(generator, reference, prompt):
    ids = generator.encode(prompt)
    expected = torch_greedy(reference, ids, 64, generator.package.generation.eos_token_id)
    assert len(expected) > 8, "the reference stopped early: the comparison would be weak"
    assert same_tokens(generator.generate_ids(prompt, max_new_tokens=64, temperature=0), expected)


def test_prefill_and_decode_logits_match_pytorch(generator, reference):
    import torch

    ids = generator.encode("The quick brown fox")
    logits, cache = generator.prefill(ids)
    with torch.no_grad():
        ref, past = reference.forward_cached(torch.tensor([ids]), reference.empty_cache())
        np.testing.assert_allclose(logits, ref[0, -1].numpy(), atol=RUNTIME_ATOL)
        for token in (5, 77, 300):
            logits, cache = generator.decode_step(token, cache)
            ref, past = reference.forward_cached(torch.tensor([[token]]), past)
            np.testing.assert_allclose(logits, ref[0, -1].numpy(), atol=RUNTIME_ATOL)
    assert cache.length == len(ids) + 3
    # concat: the cache grew to the tokens seen; static: one buffer of its first capacity, which for the
    # tiny model (context 128 < kv_cache.FIRST_POSITIONS) is max_length.
    length = len(ids) + 3 if generator.package.graph.kv_layout == "concat" else generator.max_length
    shapes = {tuple(t.shape() if callable(t.shape) else t.shape) for t in cache.tensors.values()}
    assert shapes == {(1, 2, length, 32)}


def test_empty_prompt_starts_from_end_of_text(generator):
    assert generator.encode("") == [generator.package.generation.eos_token_id]


# -- streaming and sampling -------------------------------------------------------------------------


def test_stream_joined_equals_generate(generator):
    options = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
    pieces = list(generator.stream("The ", **options))
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == generator.generate("The ", **options)
    assert "".join(pieces) == generator.package.tokenizer.decode(generator.generate_ids("The ", **options))


def test_seeded_sampling_is_reproducible(generator):
    a = generator.generate("The ", max_new_tokens=40, temperature=1.0, seed=1)
    b = generator.generate("The ", max_new_tokens=40, temperature=1.0, seed=1)
    c = generator.generate("The ", max_new_tokens=40, temperature=1.0, seed=2)
    assert a == b
    assert a != c


def test_none_arguments_use_the_package_generation_config(package_copy, generator):
    config = json.loads((package_copy / "generation_config.json").read_text())
    config.update(max_new_tokens=5, temperature=0)
    (package_copy / "generation_config.json").write_text(json.dumps(config))
    tokens = Generator.load(package_copy, provider="cpu").generate_ids("The ")
    assert tokens == generator.generate_ids("The ", max_new_tokens=64, temperature=0)[:5]


def test_max_new_tokens_zero_gives_nothing(generator):
    assert generator.generate("The ", max_new_tokens=0) == ""


def test_generation_stops_when_the_context_is_full(generator, corpus_text):
    max_len = generator.config.max_len
    prompt = generator.package.tokenizer.decode(generator.package.tokenizer.encode(corpus_text).ids[: max_len - 5])
    n = len(generator.encode(prompt))
    tokens = generator.generate_ids(prompt, max_new_tokens=50, temperature=0)
    assert len(tokens) == max_len - n + 1  # the last one is sampled from a full context, never fed


def test_prompt_longer_than_the_context_raises(generator):
    message = rf"the prompt is (over )?[\d,]+ tokens.*context is {generator.config.max_len} tokens"
    with pytest.raises(EdgeGPTError, match=message):
        generator.generate("word " * 1000)


@pytest.mark.parametrize(
    "options", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=-1),
                dict(seed=-3), dict(seed=1.5)]
)
def test_invalid_options_raise_before_generating(generator, options):
    with pytest.raises(EdgeGPTError):
        generator.stream("The ", **options)  # no next(): the check must not wait for the first token


def test_concurrent_generation_on_one_generator(generator):
    expected = generator.generate_ids("The ", max_new_tokens=32, temperature=1.0, seed=11)
    results: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        results[i] = generator.generate_ids("The ", max_new_tokens=32, temperature=1.0, seed=11)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_int8_package_generates(tiny_package_int8, generator):
    int8 = Generator.load(tiny_package_int8, provider="cpu")
    tokens = int8.generate_ids("The ", max_new_tokens=20, temperature=0)
    assert len(tokens) == 20
    assert int8.generate("The ", max_new_tokens=20, temperature=0) == int8.package.tokenizer.decode(tokens)


# -- providers and threads --------------------------------------------------------------------------


def test_provider_and_threads_are_checked(tiny_package):
    assert Generator.load(tiny_package, provider="auto", threads=1).provider in ("cpu", "cuda")
    with pytest.raises(EdgeGPTError, match="unknown provider"):
        Generator.load(tiny_package, provider="tpu")
    with pytest.raises(EdgeGPTError, match="threads"):
        Generator.load(tiny_package, threads=0)


def test_cuda_without_onnxruntime_gpu_says_what_to_install(plain_package):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    # The plain graph: a float32 fused package is refused on CUDA before the provider is even looked for.
    with pytest.raises(EdgeGPTError, match=r"edgegpt\[cuda\]"):
        Generator.load(plain_package, provider="cuda")


# -- damaged packages -------------------------------------------------------------------------------


def test_missing_package_directory(tmp_path):
    with pytest.raises(EdgeGPTError, match=r"no model package at .*run `edgegpt train` and `edgegpt export`"):
        Generator.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["model.onnx", "config.json", "tokenizer.json", "generation_config.json"])
def test_missing_file_is_named(package_copy, name):
    (package_copy / name).unlink()
    with pytest.raises(EdgeGPTError, match=rf"{name} is missing"):
        Generator.load(package_copy)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_model_onnx(package_copy, damage):
    path = package_copy / "model.onnx"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07not onnx" * 999, "empty": b""}[damage])
    with pytest.raises(EdgeGPTError, match=r"model\.onnx .*corrupt.*re-run `edgegpt export`"):
        Generator.load(package_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: "{not json", r"config\.json is not valid JSON"),
        (lambda c: [1, 2], r"config\.json: expected a JSON object"),
        (lambda c: {**c, "model": {**c["model"], "n_layers": "4"}}, r"n_layers must be an integer"),
        (lambda c: {**c, "model": {k: v for k, v in c["model"].items() if k != "max_len"}}, r"missing key 'max_len'"),
        (lambda c: {k: v for k, v in c.items() if k != "graph"}, r"missing key 'graph'"),
        (lambda c: {**c, "format": "other"}, r"format must be 'edgegpt-package'"),
        (lambda c: {**c, "graph": {**c["graph"], "kv_layout": "inplace"}}, r"kv_layout 'inplace' is not supported"),
        # Fewer layers than the graph has: model.onnx then takes inputs config.json does not declare.
        (lambda c: {**c, "model": {**c["model"], "n_layers": 3}}, r"does not match config\.json"),
    ],
)
def test_bad_config_json(package_copy, edit, message):
    path = package_copy / "config.json"
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(EdgeGPTError, match=message):
        Generator.load(package_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"temperature": -1}, r"generation_config\.json: temperature must be >= 0"),
        ({"top_p": 2}, r"generation_config\.json: top_p must be in"),
        ({"max_new_tokens": 1.5}, r"max_new_tokens must be an integer"),
        ({"eos_token_id": None}, r"eos_token_id must be an integer"),
        ({"eos_token_id": 100000}, r"eos_token_id 100000 is not a token"),
    ],
)
def test_bad_generation_config(package_copy, edit, message):
    path = package_copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(EdgeGPTError, match=message):
        ModelPackage.load(package_copy)


def test_bad_tokenizer_json(package_copy):
    (package_copy / "tokenizer.json").write_text('{"this": "is not a tokenizer"}')
    with pytest.raises(EdgeGPTError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        ModelPackage.load(package_copy)


# -- the shipping promise ---------------------------------------------------------------------------


def test_runtime_never_imports_torch_or_onnx(tiny_package):
    """Loading (the package checks included) and generating import neither torch nor onnx."""
    code = (
        "import sys; from edgegpt.runtime import Generator; "
        f"g = Generator.load({str(tiny_package)!r}); g.generate('hi', max_new_tokens=5); "
        "bad = [m for m in ('onnx', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- rolling the cache back (speculative decoding keeps part of a verified run) -----------------------


def test_a_rolled_back_cache_continues_exactly_as_a_fresh_prefill(generator):
    prompt, real, bogus = [5, 17, 42, 99, 7], [12, 250, 3], [400, 401, 402, 403]
    expected = generator.score(prompt + real)[len(prompt):]
    _, cache = generator.forward(prompt, generator.empty_cache())
    _, cache = generator.forward(bogus, cache)  # a drafted run the target rejects
    cache = cache.truncated(len(prompt))
    assert cache.length == len(prompt)
    as_chunk, _ = generator.forward(real, cache)
    np.testing.assert_allclose(as_chunk, expected, atol=RUNTIME_ATOL, rtol=0)
    # Rejected again, then fed one token at a time, as a decode loop does.
    cache = cache.truncated(len(prompt))
    for i, token in enumerate(real):
        logits, cache = generator.forward([token], cache)
        np.testing.assert_allclose(logits[-1], expected[i], atol=RUNTIME_ATOL, rtol=0)


@pytest.mark.parametrize("length", [-1, 6, 2.0, True])
def test_truncating_past_the_cache_is_refused(generator, length):
    _, cache = generator.forward([1, 2, 3, 4, 5], generator.empty_cache())
    with pytest.raises(EdgeGPTError, match="truncated to 0..5"):
        cache.truncated(length)


def test_a_prompt_of_token_ids_generates_what_its_text_does(generator):
    text = "def f(x):\n\treturn"
    ids = generator.encode(text)
    assert generator.generate_ids(ids, max_new_tokens=12, temperature=0) == generator.generate_ids(
        text, max_new_tokens=12, temperature=0)
    with pytest.raises(EdgeGPTError, match="token ids"):
        generator.generate_ids([1, 10**9], max_new_tokens=1)
    with pytest.raises(EdgeGPTError, match="context"):
        generator.generate_ids([1] * (generator.max_length + 1), max_new_tokens=1)


# -- a cache that grows with what it holds (runtime/kv_cache.py) ---------------------------------------


def test_a_growing_cache_gives_the_logits_of_a_full_one(generator):
    """Across every growth boundary, by single steps and by chunks that cross one, the logits are those of
    a cache allocated at max_length from the start, and the buffers are their capacity's size."""
    static = generator.package.graph.kv_layout == "static"

    def buffers_match_capacity(grown) -> None:
        if static:
            assert {t.shape()[2] for t in grown.tensors.values()} == {grown.capacity} and grown.capacity >= grown.length

    capacities, full = grow_beside_a_full_cache(generator, buffers_match_capacity)
    if static:  # 4 -> 8 (the 6th token) -> 16 (a chunk crossing 8 and more) -> 32 -> 64 -> 128 = max_length
        assert sorted(set(capacities)) == [4, 8, 16, 32, 64, 128] and full.capacity == 128
    else:
        assert capacities[-1] == 100


def test_a_long_generation_crosses_several_growths(generator, monkeypatch):
    from edgegpt.runtime import kv_cache

    expected = generator.generate_ids("The ", max_new_tokens=100, temperature=0, stop_at_eos=False)
    monkeypatch.setattr(kv_cache, "FIRST_POSITIONS", 4)  # read at each allocation
    capacities = []
    decode_step = generator.decode_step

    def recorded(token, cache):
        logits, cache = decode_step(token, cache)
        capacities.append(cache.capacity)
        return logits, cache

    monkeypatch.setattr(generator, "decode_step", recorded)
    assert generator.generate_ids("The ", max_new_tokens=100, temperature=0, stop_at_eos=False) == expected
    if generator.package.graph.kv_layout == "static":
        assert {8, 16, 32, 64, 128} <= set(capacities), capacities  # from 4: "The " is a token or two


def test_threads_growing_their_caches_at_once(generator, monkeypatch):
    from edgegpt.runtime import kv_cache

    expected = generator.generate_ids("def f(x):", max_new_tokens=90, temperature=1.0, seed=5)
    monkeypatch.setattr(kv_cache, "FIRST_POSITIONS", 2)
    results: list[list[int]] = [[] for _ in range(6)]

    def work(i: int) -> None:
        results[i] = generator.generate_ids("def f(x):", max_new_tokens=90, temperature=1.0, seed=5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 6


def test_a_batch_grows_all_its_rows_at_once(generator, monkeypatch):
    from edgegpt.runtime import kv_cache

    prompts = ["The ", "def f(x):\n\treturn x", "import"]
    options = dict(max_new_tokens=60, temperature=0, stop_at_eos=False)
    one_by_one = [generator.generate(p, **options) for p in prompts]
    monkeypatch.setattr(kv_cache, "FIRST_POSITIONS", 4)  # the longest prompt sets the first capacity: 8, 16
    allocated = []
    zeros = np.zeros
    monkeypatch.setattr(np, "zeros", lambda shape, *a, **k: allocated.append(shape) or zeros(shape, *a, **k))
    assert generator.generate_batch(prompts, **options) == one_by_one
    monkeypatch.undo()
    if generator.package.graph.kv_layout == "static":
        batch_buffers = {s[2] for s in allocated if isinstance(s, tuple) and len(s) == 4 and s[0] == len(prompts)}
        assert len(batch_buffers) >= 3 and max(batch_buffers) == generator.max_length, batch_buffers


def test_a_capacity_is_checked(generator):
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(EdgeGPTError, match="capacity must be a positive number of positions"):
            generator.empty_cache(capacity=bad)
    assert generator.empty_cache(capacity=10**6).capacity in (0, generator.max_length)  # at most max_length
