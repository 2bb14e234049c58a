"""Properties over arbitrary input (hypothesis): the sampler returns a valid token or a clear
EdgeGPTError for any logits; the streaming detokenizer never raises and its pieces join to the full
decode; config parsing and the model-file scan raise nothing but EdgeGPTError on any input."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.detokenizer import StreamDecoder, TextStream
from edgegpt.runtime.integrity import scan_model
from edgegpt.runtime.package import _read_object, parse_config, parse_generation
from edgegpt.runtime.sampling import Sampler, SamplingParams, next_token

FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the sampler on any logits -------------------------------------------------------------------------

# Each width with its own extremes: NaN, ±inf, the largest and smallest finite values.
LOGITS = {
    np.float64: st.floats() | st.sampled_from([np.nan, np.inf, -np.inf, 1.7e308, -1.7e308, 0.0, 5e-324]),
    np.float32: st.floats(width=32) | st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 0.0, 1e-45]),
}
logit_arrays = st.tuples(st.integers(1, 40), st.sampled_from(list(LOGITS))).flatmap(
    lambda shape_dtype: arrays(shape_dtype[1], shape_dtype[0], elements=LOGITS[shape_dtype[1]]))
params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(1e-300, 1e3)),
    top_k=st.integers(0, 50),
    top_p=st.floats(1e-9, 1.0),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(1e-300, 1e300)),
)


@FEW
@given(logits=logit_arrays, p=params, seed=st.integers(0, 2**32), seen_bits=st.integers(0, 2**40))
def test_the_sampler_returns_a_valid_token_or_a_clear_error(logits, p, seed, seen_bits):
    values = logits.astype(np.float64)
    seen = np.array([bool(seen_bits >> i & 1) for i in range(len(logits))])
    try:
        token = next_token(logits, np.random.default_rng(seed), p.temperature, p.top_k, p.top_p, p.min_p,
                           p.repetition_penalty, seen if p.repetition_penalty != 1.0 else None)
    except EdgeGPTError as e:
        if np.isnan(values).any():
            assert "the model produced NaN logits" in str(e)
        else:
            # All -inf, or (only with a penalty) every logit pushed past the float range.
            assert "every logit is -inf" in str(e)
            assert np.all(values == -np.inf) or p.repetition_penalty != 1.0
        return
    assert not np.isnan(values).any(), "NaN logits must be refused"
    assert isinstance(token, int) and 0 <= token < len(logits)
    assert values[token] != -np.inf, "a token with probability 0 was chosen"
    if np.isposinf(values).any():
        assert values[token] == np.inf, "+inf logits take all the probability"
    elif p.temperature == 0 and p.repetition_penalty == 1.0:
        assert values[token] == values.max()


@FEW
@given(logits=logit_arrays, extra=st.integers(0, 5), seed=st.integers(0, 100))
def test_the_sampler_object_stays_inside_the_tokenizer_vocabulary(logits, extra, seed):
    vocab = len(logits)
    padded = np.concatenate([logits, np.full(extra, np.float32(1e30), logits.dtype)])  # padding rows win if read
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.3), seed, [0], vocab)
    try:
        token = sampler.choose(padded)
    except EdgeGPTError as e:
        # NaN; or all -inf, possibly only after the penalty pushed a huge negative logit past the range.
        assert np.isnan(logits).any() if "NaN" in str(e) else "every logit is -inf" in str(e)
        return
    assert 0 <= token < vocab and sampler.seen[token]


@pytest.mark.parametrize(
    "logits, expected",
    [([np.nan, 1.0], "the model produced NaN logits"), ([-np.inf, -np.inf], "every logit is -inf")],
)
def test_the_sampler_decisions(logits, expected):
    for temperature in (0.0, 1.0):
        with pytest.raises(EdgeGPTError, match=expected):
            next_token(np.array(logits), np.random.default_rng(0), temperature)
    inf = np.array([1.0, np.inf, 5.0, np.inf])
    drawn = {next_token(inf, np.random.default_rng(s), 1.0) for s in range(40)}
    assert drawn == {1, 3}  # the +inf tokens share the probability
    assert next_token(np.array([-1e308, -1e308 * 0.5]), np.random.default_rng(0), 1e-300) == 1


# -- the streaming detokenizer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from edgegpt.tokenizer import train_tokenizer

    # Characters of 2, 3 and 4 UTF-8 bytes, so tokens split characters and random ids give invalid bytes.
    text = "The café serves crème brûlée. 日本語のテキスト。 Emoji: 🙂🚀👍🏽 Ελληνικά — naïve\n" * 50
    return train_tokenizer([text], 400)


@FEW
@given(data=st.data())
def test_the_stream_decoder_never_raises_and_joins_to_the_full_decode(tokenizer, data):
    vocab = tokenizer.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=60))
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    stop = data.draw(st.text(min_size=1, max_size=4) | st.sampled_from(["é", "🙂", "\n", "the"]))
    text = TextStream(tokenizer, (stop,))
    shown = [text.push(i) for i in ids] + [text.flush()]
    full = tokenizer.decode(ids)
    assert "".join(shown) == (full[: full.index(stop)] if stop in full else full)


# -- config parsing on arbitrary JSON --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)

LAYERS = 2
VALID_CONFIG = {
    "format": "edgegpt-package",
    "model": {"vocab_size": 64, "dim": 16, "n_layers": LAYERS, "n_heads": 2, "n_kv_heads": 1, "max_len": 32},
    "graph": {
        "kv_layout": "static", "dtype": "float32",
        "inputs": {"input_ids": {}, "seqlens_k": {}, "total_sequence_length": {},
                   **{f"past_{kv}.{i}": {"shape": ["batch", 1, "max_length", 8]}
                      for i in range(LAYERS) for kv in "kv"}},
        "outputs": {"logits": {}, **{f"present_{kv}.{i}": {} for i in range(LAYERS) for kv in "kv"}},
        "past_key": "past_k.{layer}", "past_value": "past_v.{layer}",
        "present_key": "present_k.{layer}", "present_value": "present_v.{layer}",
    },
}
VALID_GENERATION = {"max_new_tokens": 8, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "eos_token_id": 0}
MODEL_CONFIG = ModelConfig().to_dict()


def replace_at(value, path: list, new):
    """`value` with the item at `path` (keys into nested dicts) replaced by `new` (or dropped: new is ...)."""
    if not path:
        return new
    out = dict(value)
    if len(path) == 1 and new is ...:
        out.pop(path[0], None)
    else:
        out[path[0]] = replace_at(value[path[0]], path[1:], new)
    return out


def paths(value, prefix=()) -> list:
    found = [list(prefix)]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    return found


def only_edgegpt_errors(parse, value) -> None:
    try:
        parse(value)
    except EdgeGPTError as e:
        assert str(e) and "\n" not in str(e)


def test_the_valid_configs_parse():
    model, graph = parse_config(VALID_CONFIG, "config.json")
    assert model.n_layers == LAYERS and graph.past_names(1) == ("past_k.1", "past_v.1")
    assert parse_generation(VALID_GENERATION, "generation_config.json").top_k == 50
    assert ModelConfig.from_dict(MODEL_CONFIG) == ModelConfig()


@FEW
@given(value=json_values)
def test_config_parsing_of_any_json_raises_only_edgegpt_errors(value):
    only_edgegpt_errors(lambda v: parse_config(v, "config.json"), value)
    only_edgegpt_errors(lambda v: parse_generation(v, "generation_config.json"), value)
    only_edgegpt_errors(ModelConfig.from_dict, value)


@FEW
@given(data=st.data(), new=json_values | st.just(...))
def test_config_parsing_of_a_valid_config_with_one_value_changed(data, new):
    """Near-valid input reaches the deeper checks, which arbitrary JSON rarely does."""
    for valid, parse in ((VALID_CONFIG, lambda v: parse_config(v, "config.json")),
                         (VALID_GENERATION, lambda v: parse_generation(v, "generation_config.json")),
                         (MODEL_CONFIG, ModelConfig.from_dict)):
        path = data.draw(st.sampled_from(paths(valid)[1:]))
        only_edgegpt_errors(parse, replace_at(valid, path, new))


@FEW
@given(text=st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()))
def test_reading_any_bytes_as_a_json_file_raises_only_edgegpt_errors(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.json"
        path.write_bytes(text)
        only_edgegpt_errors(lambda p: parse_config(_read_object(p), str(p)), path)
        only_edgegpt_errors(lambda p: parse_generation(_read_object(p), str(p)), path)


# -- the model-file scan on arbitrary bytes ---------------------------------------------------------------


@FEW
@given(content=st.binary(max_size=200))
def test_scanning_any_bytes_as_a_model_raises_only_edgegpt_errors(content):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        path.write_bytes(content)
        try:
            domains, locations = scan_model(path)
        except EdgeGPTError as e:
            assert "model.onnx is corrupt" in str(e)
            return
        assert all(isinstance(d, str) for d in domains) and all(isinstance(loc, str) for loc in locations)


def test_the_scan_reads_what_onnx_wrote(tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    inner = helper.make_graph([helper.make_node("Custom", [], ["y"], domain="org.inner")], "inner", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["z"]), helper.make_node("If", ["c"], ["y"], then_branch=inner,
                                                                       else_branch=inner, domain="ai.onnx")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])], initializer=[weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("org.top", 1)])
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    assert scan_model(path) == ({"", "ai.onnx", "org.inner", "org.top"}, {"weights.bin"})
