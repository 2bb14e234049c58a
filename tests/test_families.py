"""Model families beyond plain Llama, from Hugging Face folders: Qwen3 (per-head q/k RMSNorm, a head_dim of its
own), Llama 3.2 (rotary scaling `rope_type: llama3`), Gemma 3 and Gemma 2 (every switch of edgegpt.model), tied
and untied. transformers is the oracle: a tiny random model saved as a folder → `convert` → checkpoint →
PyTorch, plain and fused packages, and back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_convert import SIZES, converts_and_round_trips, save_hf  # noqa: E402
from test_fused import write_package  # noqa: E402

from edgegpt.checkpoint import load_checkpoint  # noqa: E402
from edgegpt.convert import convert  # noqa: E402
from edgegpt.core.config import ModelConfig, RopeScaling  # noqa: E402
from edgegpt.core.errors import EdgeGPTError  # noqa: E402
from edgegpt.model import GPT  # noqa: E402

# Llama 3.2's scaling, with an original context short enough that a 256-token model's positions run past
# it: most of head_dim 16's frequencies are then slowed or blended, so a lost scaling changes the logits.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# Weights 2.5× transformers' default spread: attention that is not nearly uniform, so where a token sits
# (the rotary, and so its scaling) moves the logits well beyond the tolerances below.
INIT_STD = 0.05
# Package comparisons: log-probabilities within this fraction of the largest reference log-probability.
RELATIVE = 1e-4
GREEDY_TOKENS = 24


def randomize_norms(model):
    """transformers starts every norm weight at one, which would hide a norm weight lost or swapped on the
    way (q_norm for k_norm, one layer's for another's)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


def tiny_qwen3(tied: bool):
    # head_dim 32 with 4 heads on a 64-wide model: q_proj is 64 → 128, as Qwen3 chooses head_dim on its own.
    config = transformers.Qwen3Config(**SIZES, head_dim=32, rope_theta=1e6, tie_word_embeddings=tied,
                                      use_sliding_window=False, initializer_range=INIT_STD)
    torch.manual_seed(0)
    return randomize_norms(transformers.Qwen3ForCausalLM(config).eval())


def tiny_llama32(tied: bool):
    config = transformers.LlamaConfig(**{**SIZES, "max_position_embeddings": 256}, rope_theta=500000.0,
                                      rope_scaling=dict(LLAMA3_SCALING), tie_word_embeddings=tied,
                                      initializer_range=INIT_STD)
    torch.manual_seed(0)
    return randomize_norms(transformers.LlamaForCausalLM(config).eval())


# A window of 8 positions, so the 120-token comparisons below run far past it; one full layer among sliding
# ones, each with its own rotary base; a query scale that is not head_dim's.
GEMMA_WINDOW = 8


def gemma_norms(model):
    with torch.no_grad():  # Gemma's norms multiply by (1 + w) and start at w = 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def tiny_gemma3(tied: bool):
    """Untied: with soft-capped logits, which Gemma 3's config may ask for (it never caps attention scores)."""
    caps = {} if tied else {"final_logit_softcapping": 15.0}
    config = transformers.Gemma3TextConfig(
        **{**SIZES, "num_hidden_layers": 4}, head_dim=32, query_pre_attn_scalar=24, sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_theta=1e6, rope_local_base_freq=100.0, tie_word_embeddings=tied, initializer_range=INIT_STD,
        attn_implementation="eager", **caps)
    torch.manual_seed(0)
    return gemma_norms(transformers.Gemma3ForCausalLM(config).eval())


def tiny_gemma2(tied: bool):
    """Gemma 2: no q/k norms, one rotary, soft-capped attention scores and logits, alternate sliding layers."""
    config = transformers.Gemma2Config(
        **{**SIZES, "num_hidden_layers": 4}, head_dim=32, query_pre_attn_scalar=24, sliding_window=GEMMA_WINDOW,
        attn_logit_softcapping=2.0, final_logit_softcapping=15.0, tie_word_embeddings=tied,
        initializer_range=INIT_STD, attn_implementation="eager")
    torch.manual_seed(0)
    return gemma_norms(transformers.Gemma2ForCausalLM(config).eval())


FAMILIES = {"qwen3": tiny_qwen3, "llama3.2": tiny_llama32, "gemma3": tiny_gemma3, "gemma2": tiny_gemma2}
HF_CLASSES = {"qwen3": "Qwen3ForCausalLM", "llama3.2": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM",
              "gemma2": "Gemma2ForCausalLM"}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_and_round_trips(tmp_path, tiny_checkpoint, family, tied):
    """Folder → checkpoint: logits as transformers'; checkpoint → folder: the same tensors, the same class,
    the same logits once transformers loads it again."""
    hf = FAMILIES[family](tied)
    save_hf(hf, tmp_path / "hf", tiny_checkpoint)
    ours, ids = converts_and_round_trips(hf, tmp_path, tolerance=1e-5, norm_tolerance=1e-7)
    cfg = ours.cfg
    assert cfg.tie_embeddings is tied
    if family == "qwen3":
        assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 32 and cfg.n_heads * cfg.head_dim != cfg.dim
    elif family == "gemma3":
        assert cfg.post_norms and cfg.embed_scale and cfg.qk_norm and cfg.activation == "gelu_tanh"
        assert cfg.sliding_layers == (0, 2, 3) and cfg.sliding_window == GEMMA_WINDOW
        assert cfg.rope_local_theta == 100.0 and cfg.query_pre_attn_scalar == 24
        assert cfg.attn_softcap is None and cfg.final_softcap == (None if tied else 15.0)
    elif family == "gemma2":
        assert cfg.post_norms and not cfg.qk_norm and cfg.sliding_layers == (0, 2) and cfg.rope_local_theta is None
        assert (cfg.attn_softcap, cfg.final_softcap) == (2.0, 15.0)
    else:
        assert cfg.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_len=32)
    # eager: transformers' SDPA path skips Gemma 2's soft-capping of the scores
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    assert type(back).__name__ == HF_CLASSES[family]
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    assert load_checkpoint(convert(tmp_path / "hf2", tmp_path / "ckpt2")[1])[0].cfg == cfg


def without(model: GPT, **changes) -> GPT:
    """`model`'s weights under a config with `changes` (weights the change removes are dropped)."""
    other = GPT(dataclasses.replace(model.cfg, **changes)).eval()
    keys = other.state_dict().keys()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys})
    return other


@pytest.mark.parametrize("family, change", [
    ("llama3.2", {"rope_scaling": None}), ("qwen3", {"qk_norm": False}),
    ("gemma3", {"sliding_window": None, "layer_types": None}), ("gemma3", {"post_norms": False}),
    ("gemma3", {"embed_scale": False}), ("gemma3", {"query_pre_attn_scalar": None}),
    ("gemma3", {"rope_local_theta": None}), ("gemma3", {"activation": "silu"}),
    ("gemma2", {"attn_softcap": None}), ("gemma2", {"final_softcap": None}),
])
def test_each_feature_changes_the_logits(tmp_path, tiny_checkpoint, family, change):
    """The comparisons above can fail: the model without the feature is far from transformers'."""
    hf = FAMILIES[family](tied=True)
    save_hf(hf, tmp_path / "hf", tiny_checkpoint)
    ours, _ = load_checkpoint(convert(tmp_path / "hf", tmp_path / "ckpt")[1])
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (without(ours, **change)(ids) - hf(ids).logits).abs().max().item() > 1e-2


def test_llama3_frequencies_are_transformers(tmp_path):
    """Llama 3.2 1B's own rotary settings (head_dim 64, theta 500000, factor 32, original context 8192)."""
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    from edgegpt.model import inverse_frequencies

    scaling = {**LLAMA3_SCALING, "factor": 32.0, "original_max_position_embeddings": 8192}
    reference, _ = _compute_llama3_parameters(transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=scaling), "cpu")
    cfg = ModelConfig(dim=2048, n_heads=32, n_kv_heads=8, max_len=131072, rope_theta=500000.0,
                      rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))
    ours = inverse_frequencies(cfg)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=0)
    plain = inverse_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    assert torch.equal(ours[:4], plain[:4]) and torch.allclose(ours[-4:], plain[-4:] / 32)


def test_old_config_files_load_as_llama():
    """A config.json written before these fields existed is the Llama behaviour; head_dim is written only
    when it is not dim / heads."""
    cfg = ModelConfig()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("head_dim", "qk_norm", "rope_scaling", "qkv_bias")}
    loaded = ModelConfig.from_dict(old)
    assert loaded == cfg and loaded.head_dim == cfg.dim // cfg.n_heads and loaded.rope_scaling is None
    assert cfg.to_dict()["head_dim"] is None
    qwen3 = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, head_dim=32, qk_norm=True,
                        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
    assert ModelConfig.from_dict(qwen3.to_dict()) == qwen3 and qwen3.to_dict()["head_dim"] == 32
    assert qwen3.num_parameters() == GPT(qwen3).num_parameters()


@pytest.mark.parametrize("edit, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling", "yarn", "llama3"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["llama3", "low_freq_factor"]),
    ({"rope_scaling": {**LLAMA3_SCALING, "high_freq_factor": 0.5}}, ["high_freq_factor"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"model_type": "phi3"}, ["phi3", "'qwen3'", "'gemma3_text'"]),
    ({"model_type": "gemma3_text", "hidden_activation": "relu"}, ["hidden_activation", "relu"]),
    ({"model_type": "gemma3_text", "sliding_window": 8, "layer_types": ["sliding_attention"]},
     ["layer_types", "2 layers"]),
])
def test_what_a_family_cannot_be_is_one_line(tmp_path, edit, words):
    from edgegpt.convert import config_from_hf

    data = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, **edit}
    with pytest.raises(EdgeGPTError) as error:
        config_from_hf(data, tmp_path / "config.json")
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


# -- through the packages --------------------------------------------------------------------------------------


def reference_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation (no end-of-text stop) and the smallest gap between the best and the
    second-best logit on the way: the comparison is meaningful only when no step is a near tie."""
    ids, gap = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(n):
            top = hf(torch.tensor([ids])).logits[0, -1].topk(2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return ids[len(prompt):], gap


@pytest.mark.slow  # a torch.onnx export per family
@pytest.mark.parametrize("family, tied", [("qwen3", False), ("llama3.2", True), ("gemma3", True), ("gemma3", False),
                                          ("gemma2", True)])
def test_plain_and_fused_packages_match_transformers(tmp_path, tiny_checkpoint, family, tied):
    """Both packages: float32 log-probabilities within RELATIVE of transformers' over 120 positions (past the
    original context the Llama 3 scaling reshapes), and the same 24 greedy tokens."""
    from edgegpt.runtime import Generator

    hf = FAMILIES[family](tied)
    save_hf(hf, tmp_path / "hf", tiny_checkpoint)
    _, ckpt = convert(tmp_path / "hf", tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.log_softmax(hf(ids).logits[0], dim=-1).numpy()
    prompt = ids[0, :8].tolist()
    greedy, gap = reference_greedy(hf, prompt, GREEDY_TOKENS)
    assert gap > 1e-3, "a near tie in the reference: pick another prompt"
    for layout in ("concat", "static"):
        generator = Generator.load(write_package(ckpt, tmp_path / layout, layout), "cpu")
        logits = torch.from_numpy(generator.score(ids[0].tolist()))
        got = torch.log_softmax(logits, dim=-1).numpy()
        assert np.abs(got - expected).max() <= RELATIVE * np.abs(expected).max(), layout
        assert generator.generate_ids(prompt, max_new_tokens=GREEDY_TOKENS, temperature=0,
                                      stop_at_eos=False) == greedy, layout


@pytest.mark.slow  # quantizes a graph
@pytest.mark.parametrize("packed", [True, False])
def test_the_fused_qwen3_graph_quantizes_with_its_norms_in_float(tmp_path, tiny_checkpoint, packed):
    """int8 MatMulNBits on the fused Qwen3 graph (q/k norms before GroupQueryAttention): every projection is
    quantized, the norm weights stay float, and the package still scores close to the float one."""
    import onnx

    from edgegpt.export.fused import build_fused_graph, fused_graph_contract
    from edgegpt.export.quantize import quantize_graph
    from edgegpt.export.writer import write_package_metadata
    from edgegpt.runtime import Generator

    save_hf(tiny_qwen3(tied=False), tmp_path / "hf", tiny_checkpoint)
    model, tokenizer = load_checkpoint(convert(tmp_path / "hf", tmp_path / "ckpt")[1])
    float_path, int8_dir = tmp_path / "float.onnx", tmp_path / "int8"
    build_fused_graph(model, float_path, pack_qkv=packed)
    int8_dir.mkdir()
    quantize_graph(float_path, int8_dir / "model.onnx", bits=8)
    proto = onnx.load(str(int8_dir / "model.onnx"))
    ops = [node.op_type for node in proto.graph.node]
    assert "MatMulNBits" in ops and ops.count("SimplifiedLayerNormalization") == 1 + 2 * model.cfg.n_layers
    floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert {f"layers.{i}.attn.{n}_norm.weight" for i in range(model.cfg.n_layers) for n in "qk"} <= floats
    write_package_metadata(int8_dir, cfg=model.cfg, tokenizer=tokenizer, graph=fused_graph_contract(model.cfg))
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.log_softmax(model(ids)[0], dim=-1)
    got = torch.log_softmax(torch.from_numpy(Generator.load(int8_dir, "cpu").score(ids[0].tolist())), dim=-1)
    assert 0 < (got - expected).abs().max().item() < 0.5


def test_the_int8_cache_calibrates_qwen3_keys_after_their_norm(tmp_path, tiny_checkpoint):
    """The int8 cache's key steps cover every key the cache receives (normed, then turned by the rotary):
    what calibration measured before the norm would not bound them."""
    from edgegpt.export.cache_precision import INT8_MAX, calibrate
    from edgegpt.quality import EvalText

    save_hf(tiny_qwen3(tied=True), tmp_path / "hf", tiny_checkpoint)
    model, _ = load_checkpoint(convert(tmp_path / "hf", tmp_path / "ckpt")[1])
    tokens = np.random.default_rng(4).integers(0, 512, 256)
    text = EvalText(tokens=tokens, char_table=np.ones(512, np.int64), source="random", capped=False, window=128)
    scales = calibrate(model, text, quant_type="PER_CHANNEL", margin=1.0)
    with torch.no_grad():
        for start in (0, 128):
            _, cache = model.forward_cached(torch.as_tensor(tokens[None, start:start + 128]))
            for layer, (keys, _) in enumerate(cache):
                largest = keys[0].abs().amax(dim=1).numpy()  # [n_kv_heads, head_dim]
                steps = scales.k[layer].reshape(largest.shape)
                assert np.all(largest <= steps * INT8_MAX * (1 + 1e-5)), layer
