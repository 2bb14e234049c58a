"""GGUF files of the families beside Llama (architectures qwen2, qwen3, gemma3, gemma2), written here from tiny
random transformers models as llama.cpp's converter writes them, in F32 and Q8_0: the checkpoint's logits
equal those of transformers loading the same file (its GGUF loader is an independent reader of the names,
the hyperparameters and Gemma's 1 + w norms), and the metadata maps to the config that transformers' folder
of the same model gives. llama.cpp's fixed Gemma choices (which layers slide, the local rotary base, the
query scale, the soft-caps) are checked on metadata alone; bad files are one line, nothing written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_convert_gguf import add_tokenizer, run_cli, tokenizer_meta, train_original

from edgegpt.checkpoint import load_checkpoint
from edgegpt.convert import convert
from edgegpt.convert.gguf import config_from_gguf
from edgegpt.convert.huggingface import config_from_hf
from edgegpt.core.errors import EdgeGPTError

gguf = pytest.importorskip("gguf", reason="gguf is in the [convert] and [dev] extras")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WINDOW = 8  # far shorter than the 30 positions compared, so the sliding layers' masks matter
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1)


# -- tiny models of each family (transformers' classes) ---------------------------------------------------------


def _norms(model, gemma: bool):
    with torch.no_grad():  # norms that are not all one, so a norm read as the wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name and gemma:
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_qwen2(vocab: int):
    config = transformers.Qwen2Config(**SIZES, vocab_size=vocab, rope_theta=1e6, tie_word_embeddings=False,
                                      use_sliding_window=False)
    torch.manual_seed(0)
    return _norms(transformers.Qwen2ForCausalLM(config), gemma=False)


def tiny_qwen3(vocab: int):
    # Heads of 128 on a 64-wide model: the width is attention.key_length, not dim / heads. 128, as every Qwen3
    # model has: transformers 4.57's GGUF loader ignores key_length and takes Qwen3Config's default, 128.
    config = transformers.Qwen3Config(**SIZES, vocab_size=vocab, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
                                      use_sliding_window=False)
    torch.manual_seed(1)
    return _norms(transformers.Qwen3ForCausalLM(config), gemma=False)


# Gemma: head_dim 256 (the width of every Gemma 3 and Gemma 2 model but the 27B ones), which llama.cpp scales
# queries by and transformers' GGUF loader leaves at its default query_pre_attn_scalar, 256: both read such a
# file the same way. Six Gemma 3 layers: the sixth attends to the whole context (llama.cpp's pattern).
def tiny_gemma3(vocab: int):
    config = transformers.Gemma3TextConfig(
        **{**SIZES, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1}, vocab_size=vocab,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW, rope_theta=1e6, rope_local_base_freq=10000.0,
        tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(2)
    return _norms(transformers.Gemma3ForCausalLM(config), gemma=True)


def tiny_gemma2(vocab: int):
    config = transformers.Gemma2Config(
        **{**SIZES, "num_attention_heads": 2, "num_key_value_heads": 1}, vocab_size=vocab, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(3)
    return _norms(transformers.Gemma2ForCausalLM(config), gemma=True)


FAMILIES = {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "gemma3": tiny_gemma3, "gemma2": tiny_gemma2}


# -- written as llama.cpp's converter writes them ------------------------------------------------------------

# Hugging Face name → GGUF name ({i}: a layer); Gemma's post_attention_layernorm is the attention's output
# norm, Qwen's the MLP's input norm.
_COMMON = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{kind}": f"blk.{{i}}.attn_{p}.{kind}"
       for p in "qkv" for kind in ("weight", "bias")},
    **{f"model.layers.{{i}}.self_attn.{p}_norm.weight": f"blk.{{i}}.attn_{p}_norm.weight" for p in "qk"},
}
_QWEN = {"model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight"}
_GEMMA = {"model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
          "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
          "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight"}


def gguf_tensor_name(name: str, gemma: bool) -> str:
    for theirs, ours in {**_COMMON, **(_GEMMA if gemma else _QWEN)}.items():
        match = re.fullmatch(re.escape(theirs).replace(r"\{i\}", r"(\d+)"), name)
        if match:
            return ours.format(i=match.group(1)) if match.groups() else ours
    raise KeyError(name)


def write_family_gguf(path: Path, hf, arch: str, tokenizer: dict, qtype: Q = Q.F32, *, hyper: dict | None = None,
                      skip: tuple[str, ...] = (), types: dict[str, Q] | None = None) -> Path:
    """`hf` as llama.cpp's converter writes a file of `arch`: no Q/K permutation (these families' rotary
    pairs a head's halves already), Gemma's norms as 1 + w, 2-D weights in `qtype`, 1-D ones in F32, a tied
    head left out. `hyper` replaces or adds hyperparameters (GGUFWriter.add_<key>), `types` gives some tensors
    a type of their own."""
    c, gemma = hf.config, arch.startswith("gemma")
    values = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
              "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
              "head_count": c.num_attention_heads, "head_count_kv": c.num_key_value_heads,
              "rope_freq_base": c.rope_theta, "layer_norm_rms_eps": c.rms_norm_eps, "vocab_size": c.vocab_size}
    if arch != "qwen2":
        values.update(key_length=c.head_dim, value_length=c.head_dim)
    if gemma:
        values["sliding_window"] = c.sliding_window
    if arch == "gemma2":
        values.update(attn_logit_softcapping=c.attn_logit_softcapping,
                      final_logit_softcapping=c.final_logit_softcapping)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {**values, **(hyper or {})}.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w, tokenizer)
    for name, tensor in hf.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        ours = gguf_tensor_name(name, gemma)
        if ours in skip:
            continue
        t = tensor.detach().float().numpy()
        if gemma and name.endswith("norm.weight"):
            t = t + 1.0  # Gemma's RMSNorm multiplies by 1 + w: llama.cpp's converter stores the sum
        kind = (types or {}).get(ours, qtype)
        if t.ndim == 2 and kind != Q.F32:
            w.add_tensor(ours, gguf.quants.quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(ours, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen_tokenizer(corpus_text):
    return train_original("gpt2", corpus_text[:30_000] + " 2024 café 日本語 🎉")


def family_file(directory: Path, family: str, qwen_tokenizer, qtype: Q = Q.F32, **options):
    vocab = qwen_tokenizer.get_vocab_size() + 3  # embedding rows past the tokenizer's, as real models pad
    hf = FAMILIES[family](vocab)
    meta = tokenizer_meta(qwen_tokenizer, "qwen2", eos=0, pad=0, chat_template=CHATML)
    directory.mkdir(parents=True, exist_ok=True)
    return hf, write_family_gguf(directory / f"{family}.{qtype.name}.gguf", hf, family, meta, qtype, **options)


def assert_configs_equal(ours, theirs):
    """Equal field by field; floats to float32's precision (transformers reads 1e-6 as the float32 nearest)."""
    for field in dataclasses.fields(ours):
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        if isinstance(a, float) and isinstance(b, float):
            assert math.isclose(a, b, rel_tol=1e-6), (field.name, a, b)
        else:
            assert a == b, (field.name, a, b)


# -- the oracle: transformers loading the same file ------------------------------------------------------------


@pytest.mark.slow  # a transformers GGUF load and a conversion per case
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_file_converts_to_what_transformers_reads(tmp_path, qwen_tokenizer, family, qtype):
    hf, path = family_file(tmp_path, family, qwen_tokenizer, qtype)
    direction, ckpt = convert(path, tmp_path / "ckpt")
    assert direction == "gguf → checkpoint"
    ours, tokenizer = load_checkpoint(ckpt)
    reader = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    # transformers' folder of the model it read: the same config as the file's metadata gives
    assert_configs_equal(ours.cfg, config_from_hf(reader.config.to_dict(), Path("config.json")))
    cfg = ours.cfg
    if family.startswith("gemma"):
        assert cfg.post_norms and cfg.embed_scale and cfg.head_dim == 256 and cfg.sliding_window == WINDOW
        assert cfg.sliding_layers == ((0, 1, 2, 3, 4) if family == "gemma3" else (0,))
    else:
        assert cfg.qkv_bias is (family == "qwen2") and cfg.qk_norm is (family == "qwen3")
        assert cfg.tie_embeddings is (family == "qwen3")
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, converted = reader(ids).logits, ours(ids)
    scale = expected.abs().max().item()
    assert scale > 1.0, "flat logits would hide a misplaced row"
    assert (converted - expected).abs().max().item() <= 1e-4 * scale
    # the original's logits, through the weights the type keeps
    with torch.no_grad():
        error = ((converted - hf(ids).logits).abs().max() / scale).item()
    assert error <= (1e-5 if qtype == Q.F32 else 0.05), error
    # Qwen's chat template and end of turn, from the metadata (<|im_end|> found by its text)
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, tokenizer.token_to_id("<|im_end|>")]
    assert (ckpt / "chat_template.jinja").read_text() == CHATML


# -- llama.cpp's fixed choices, from metadata alone ------------------------------------------------------------


def metadata(arch: str, n_layers: int = 12, **extra) -> tuple[dict, dict]:
    """(metadata, tensors) of a file of `arch`, the tensors standing in with their shapes only."""
    meta = {"general.architecture": arch, f"{arch}.embedding_length": 640, f"{arch}.block_count": n_layers,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 1,
            f"{arch}.attention.key_length": 256, f"{arch}.feed_forward_length": 2048,
            f"{arch}.context_length": 32768, f"{arch}.rope.freq_base": 1e6,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.attention.sliding_window": 512}
    meta.update({f"{arch}.{k}": v for k, v in extra.items()})
    meta = {k: v for k, v in meta.items() if v is not None}
    tensors = {"token_embd.weight": SimpleNamespace(shape=(640, 1000)),
               **{f"blk.{i}.attn_norm.weight": SimpleNamespace(shape=(640,)) for i in range(n_layers)}}
    return meta, tensors


def test_gemma3_metadata_as_llama_cpp_reads_it():
    cfg = config_from_gguf(*metadata("gemma3"), "g.gguf")
    assert cfg.head_dim == 256 and cfg.n_heads * cfg.head_dim != cfg.dim and cfg.qk_norm and cfg.tie_embeddings
    assert cfg.sliding_window == 512 and cfg.sliding_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)  # every 6th full
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 10000.0
    assert cfg.query_pre_attn_scalar == 256.0 and cfg.attn_softcap is None and cfg.final_softcap is None
    assert (cfg.post_norms, cfg.embed_scale, cfg.activation) == (True, True, "gelu_tanh")
    # what the file may say instead
    said = config_from_gguf(*metadata("gemma3", final_logit_softcapping=30.0, **{"rope.freq_base_swa": 5e4}), "g")
    assert said.final_softcap == 30.0 and said.rope_local_theta == 5e4
    every_third = config_from_gguf(*metadata("gemma3", **{"attention.sliding_window_pattern": 3}), "g")
    assert every_third.sliding_layers == (0, 1, 3, 4, 6, 7, 9, 10)
    flags = [True, False] * 6
    listed = config_from_gguf(*metadata("gemma3", **{"attention.sliding_window_pattern": flags}), "g")
    assert listed.sliding_layers == tuple(range(0, 12, 2))
    # no window named (or 0): no layer slides; a window as long as the context slides nowhere either
    for window in (None, 0, 32768):
        plain = config_from_gguf(*metadata("gemma3", **{"attention.sliding_window": window}), "g")
        assert plain.sliding_window is None and plain.layer_types is None and plain.rope_local_theta == 10000.0
    # the 27B model (62 layers) scales queries by dim / heads, as llama.cpp does
    assert config_from_gguf(*metadata("gemma3", n_layers=62), "g").query_pre_attn_scalar == 160.0


def test_gemma2_metadata_as_llama_cpp_reads_it():
    cfg = config_from_gguf(*metadata("gemma2", **{"attention.sliding_window": None}), "g.gguf")
    assert not cfg.qk_norm and cfg.rope_local_theta is None
    assert cfg.sliding_window == 4096 and cfg.sliding_layers == tuple(range(0, 12, 2))  # every other layer full
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)
    said = config_from_gguf(*metadata("gemma2", attn_logit_softcapping=20.0, final_logit_softcapping=10.0), "g")
    assert (said.attn_softcap, said.final_softcap, said.sliding_window) == (20.0, 10.0, 512)


@pytest.mark.parametrize("arch, extra, words", [
    ("gemma3", {"attention.sliding_window": 40000}, ["sliding_window 40000 is larger than the context", "32768"]),
    ("gemma3", {"attention.value_length": 128}, ["value_length is 128", "256"]),
    ("gemma3", {"attention.sliding_window_pattern": [True, False]}, ["sliding_window_pattern", "12 layers"]),
    ("gemma2", {"rope.freq_base_swa": 1e4}, ["freq_base_swa", "one rotary base"]),
    ("qwen3", {"rope.dimension_count": 64}, ["rope.dimension_count is 64", "256"]),
    ("mamba", {}, ["'mamba'", "'qwen2'", "'gemma3'"]),
])
def test_metadata_edgegpt_cannot_take_is_one_error(arch, extra, words):
    with pytest.raises(EdgeGPTError) as e:
        config_from_gguf(*metadata(arch, **extra), "g.gguf")
    assert all(word in str(e.value) for word in words) and "\n" not in str(e.value), str(e.value)


# -- bad files: one line, nothing written ----------------------------------------------------------------------


@pytest.mark.parametrize("family, options, words", [
    ("qwen3", {"hyper": {"key_length": 16, "value_length": 16}}, ["blk.0.attn_q.weight is [512, 64]", "[64, 64]"]),
    ("gemma3", {"hyper": {"sliding_window": 100}}, ["sliding_window 100", "larger than the context", "64"]),
    ("gemma3", {"skip": ("blk.1.post_ffw_norm.weight",)}, ["blk.1.post_ffw_norm.weight is missing"]),
    ("qwen2", {"skip": ("blk.1.attn_q.bias",)}, ["blk.1.attn_q.bias is missing"]),
    # a ternary type no supported file uses; attn_output's rows (512 values) hold whole blocks of 256
    ("gemma3", {"types": {"blk.0.attn_output.weight": Q.TQ2_0}}, ["blk.0.attn_output.weight", "TQ2_0", "Q8_0"]),
], ids=["key_length", "window", "missing-norm", "missing-bias", "type"])
def test_a_bad_family_file_is_one_line(tmp_path, qwen_tokenizer, family, options, words):
    _, path = family_file(tmp_path / "in", family, qwen_tokenizer, **options)
    line = run_cli(path, tmp_path / "out" / "ckpt")
    assert all(word in line for word in words), line


# -- the real file -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_gemma3_270m_file_completes_facts(tmp_path):
    """Gemma 3 270M (base) from its Q4_K_M file: the Eiffel Tower's city and numpy's alias, greedily."""
    path = os.environ.get("EDGEGPT_GEMMA3_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set EDGEGPT_GEMMA3_GGUF to Gemma 3 270M's GGUF file to run this")
    _, ckpt = convert(Path(path), tmp_path / "ckpt")
    model, tokenizer = load_checkpoint(ckpt)
    assert model.cfg.sliding_window == 512 and model.cfg.query_pre_attn_scalar == 256.0
    assert model.cfg.sliding_layers == tuple(i for i in range(18) if (i + 1) % 6)
    # the config transformers reads from the same file (its GGUF loader, metadata only)
    theirs = transformers.AutoConfig.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
    assert_configs_equal(model.cfg, config_from_hf(theirs.to_dict(), Path("config.json")))
    for prompt, answer in [("The Eiffel Tower is located in the city of", " Paris"), ("import numpy as", " np")]:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            token = model(ids)[0, -1].argmax().item()
        assert tokenizer.decode([token]) == answer, (prompt, tokenizer.decode([token]))
