"""`edgegpt convert`: checkpoint ↔ Hugging Face directory (Llama, Mistral, Qwen2), lossless both ways, with the
generation config and chat template carried along; Q/K/V biases through the plain and the fused graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgegpt.checkpoint import load_checkpoint
from edgegpt.convert import convert
from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT

transformers = pytest.importorskip("transformers", reason="transformers is in the [dev] extra")


@pytest.mark.slow  # over half a second on two cores
def test_transformers_loads_our_export(tmp_path, tiny_checkpoint):
    direction, hf_dir = convert(tiny_checkpoint, tmp_path / "hf")
    assert direction == "checkpoint → huggingface"
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ours, tokenizer = load_checkpoint(tiny_checkpoint)
    ids = torch.tensor([tokenizer.encode("The import statement binds a name").ids])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert fast("def f(x): return 1")["input_ids"] == tokenizer.encode("def f(x): return 1").ids


@pytest.mark.parametrize("tied", [True, False])
def test_random_hf_llama_converts_to_a_checkpoint(tmp_path, tiny_checkpoint, tied):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text((tiny_checkpoint / "tokenizer.json").read_text())
    ours, _ = converts_and_round_trips(hf, tmp_path, tolerance=1e-5)
    assert ours.cfg.tie_embeddings is tied and ours.cfg.rope_theta == 50000.0


def converts_and_round_trips(hf, tmp_path: Path, tolerance: float, norm_tolerance: float = 0.0):
    """tmp_path/hf (saved from `hf`) -> checkpoint: logits within `tolerance` of transformers'; and back to
    tmp_path/hf2, bit-exact (norm weights within `norm_tolerance`: Gemma's come back as (1 + w) - 1). Returns
    our model and the ids it was compared on."""
    direction, ckpt = convert(tmp_path / "hf", tmp_path / "ckpt")
    assert direction == "huggingface → checkpoint"
    ours, _ = load_checkpoint(ckpt)
    ids = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= tolerance
    convert(ckpt, tmp_path / "hf2")
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert again.keys() == original.keys()
    for name in original:
        if "norm" in name and norm_tolerance:
            assert torch.allclose(again[name], original[name], rtol=0, atol=norm_tolerance), name
        else:
            assert torch.equal(again[name], original[name]), name
    return ours, ids


def test_refuses_what_it_cannot_represent(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "gpt2" / "tokenizer.json").write_text("{}")
    with pytest.raises(EdgeGPTError, match="model_type is 'gpt2'; edgegpt converts 'llama'"):
        convert(tmp_path / "gpt2", tmp_path / "out")
    with pytest.raises(EdgeGPTError, match="neither"):
        convert(tmp_path, tmp_path / "out2")


def test_destination_rules(tmp_path, tiny_checkpoint):
    """convert replaces only a previous output of the same kind, never the source or someone else's files."""
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    with pytest.raises(EdgeGPTError, match="would overwrite"):
        convert(ckpt, tmp_path)  # a folder holding the source
    hf = tmp_path / "hf"
    convert(ckpt, hf)
    convert(ckpt, hf)  # a previous conversion is replaced
    (hf / "README.md").write_text("my model card")  # ... but not once it holds anything else
    with pytest.raises(EdgeGPTError, match="already exists and is not empty"):
        convert(ckpt, hf)
    assert (hf / "README.md").read_text() == "my model card"
    (hf / "README.md").unlink()
    back = tmp_path / "back"
    convert(hf, back)
    convert(hf, back)  # an edgegpt checkpoint is replaced
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("\\documentclass{article}")
    for source in (ckpt, hf):
        with pytest.raises(EdgeGPTError, match="already exists and is not empty"):
            convert(source, tmp_path / "docs")
    assert (tmp_path / "docs" / "thesis.tex").is_file()
    with pytest.raises(EdgeGPTError, match="already exists and is not empty"):
        convert(back, hf.parent / "ckpt")  # a checkpoint is not a previous Hugging Face output


def test_a_failed_hf_conversion_leaves_the_previous_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    import edgegpt.convert.huggingface as module

    hf, out = tmp_path / "hf", tmp_path / "out"
    convert(tiny_checkpoint, hf)
    convert(hf, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(directory, model, tokenizer, **files):
        (directory / "model.safetensors").write_bytes(b"half")
        raise EdgeGPTError("could not write (No space left on device)")

    monkeypatch.setattr(module, "save_checkpoint", full_disk)
    with pytest.raises(EdgeGPTError, match="No space"):
        convert(hf, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no staging directory left behind


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "big"), ("num_attention_heads", 0), ("num_hidden_layers", 2.0), ("vocab_size", True),
    ("head_dim", "64"), ("rope_theta", "fast"), ("tie_word_embeddings", "yes"),
])
def test_hf_config_of_the_wrong_type_names_the_key(tmp_path, key, value):
    from edgegpt.convert import config_from_hf

    data = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, key: value}
    with pytest.raises(EdgeGPTError, match=key):
        config_from_hf(data, tmp_path / "config.json")
    del data[key]
    if key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        with pytest.raises(EdgeGPTError, match=f"missing key {key}"):
            config_from_hf(data, tmp_path / "config.json")


# -- Qwen2 and Mistral -----------------------------------------------------------------------------------------

SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def save_hf(model, directory, tiny_checkpoint):
    """save_pretrained plus the tiny checkpoint's tokenizer.json (512 tokens, as the configs above)."""
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text((tiny_checkpoint / "tokenizer.json").read_text())
    return directory


def tiny_qwen2(tied: bool = True):
    config = transformers.Qwen2Config(**SIZES, rope_theta=1e6, tie_word_embeddings=tied, use_sliding_window=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at zero, which would hide a bias lost on the way
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_random_hf_qwen2_with_qkv_biases_converts_and_round_trips(tmp_path, tiny_checkpoint, tied):
    hf = tiny_qwen2(tied)
    save_hf(hf, tmp_path / "hf", tiny_checkpoint)
    ours, ids = converts_and_round_trips(hf, tmp_path, tolerance=1e-4)
    assert ours.cfg.qkv_bias and ours.cfg.tie_embeddings is tied and ours.cfg.rope_theta == 1e6
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("window", [None, 16, 128, 4096])
def test_mistral_converts_with_its_sliding_window(tmp_path, tiny_checkpoint, window):
    """Every layer slides over `window` positions; a window as long as the context (128) is none."""
    config = transformers.MistralConfig(**SIZES, sliding_window=window, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    save_hf(hf, tmp_path / "hf", tiny_checkpoint)
    ours, _ = load_checkpoint(convert(tmp_path / "hf", tmp_path / "ckpt")[1])
    assert ours.cfg.sliding_window == (16 if window == 16 else None) and ours.cfg.layer_types is None
    ids = torch.randint(0, 512, (1, 60))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
        if window == 16:  # the window matters this far into the sequence: without it the logits differ
            unwindowed = GPT(dataclasses.replace(ours.cfg, sliding_window=None)).eval()
            unwindowed.load_state_dict(ours.state_dict())
            assert (hf(ids).logits - unwindowed(ids)).abs().max().item() > 1e-2


# -- generation config and chat template ---------------------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def llama_dir(tmp_path, tiny_checkpoint):
    config = transformers.LlamaConfig(**SIZES, tie_word_embeddings=True)
    torch.manual_seed(0)
    return save_hf(transformers.LlamaForCausalLM(config).eval(), tmp_path / "hf", tiny_checkpoint)


def test_generation_config_and_chat_template_survive_the_round_trip(tmp_path, llama_dir):
    import json

    (llama_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "top_k": 20, "repetition_penalty": 1.05, "transformers_version": "4.57.6", "_from_model_config": False}))
    (llama_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    _, ckpt = convert(llama_dir, tmp_path / "ckpt")
    carried = {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_k": 20,
               "top_p": 0.9, "repetition_penalty": 1.05}
    assert json.loads((ckpt / "generation_config.json").read_text()) == carried
    assert (ckpt / "chat_template.jinja").read_text() == CHATML
    _, hf2 = convert(ckpt, tmp_path / "hf2")
    assert json.loads((hf2 / "generation_config.json").read_text()) == carried
    assert json.loads((hf2 / "config.json").read_text())["eos_token_id"] == [2, 0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf2)
    assert tokenizer.chat_template == CHATML
    _, ckpt2 = convert(hf2, tmp_path / "ckpt2")
    for name in ("generation_config.json", "chat_template.jinja"):
        assert (ckpt2 / name).read_bytes() == (ckpt / name).read_bytes()


def test_chat_template_file_wins_and_config_eos_is_the_fallback(tmp_path, llama_dir):
    import json

    (llama_dir / "generation_config.json").unlink()
    (llama_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old {{ messages }}"}))
    (llama_dir / "chat_template.jinja").write_text(CHATML)
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "bos_token_id": 3, "eos_token_id": 4}))
    _, ckpt = convert(llama_dir, tmp_path / "ckpt")
    assert (ckpt / "chat_template.jinja").read_text() == CHATML
    assert json.loads((ckpt / "generation_config.json").read_text()) == {"bos_token_id": 3, "eos_token_id": 4}


def test_a_trained_checkpoint_has_neither_file(tmp_path, tiny_checkpoint):
    _, hf = convert(tiny_checkpoint, tmp_path / "hf")
    assert not (hf / "chat_template.jinja").exists()
    _, ckpt = convert(hf, tmp_path / "ckpt")
    assert not (ckpt / "chat_template.jinja").exists()
    assert load_checkpoint(ckpt)[0].cfg == load_checkpoint(tiny_checkpoint)[0].cfg


# -- bad input through the command line: one line, exit 2, nothing written ------------------------------------


@pytest.mark.parametrize("case, words", [
    ("gpt2", ["'gpt2'", "'llama'", "'qwen2'", "'mistral'"]),
    ("mistral window", ["sliding_window", "positive integer", "'64'"]),
    ("qwen2 window", ["layer_types", "each of the 2 layers"]),
    ("gemma embedding", ["use_bidirectional_attention"]),
    ("generation config", ["generation_config.json", "eos_token_id"]),
    ("chat template", ["chat_template", "text"]),
])
def test_a_folder_edgegpt_cannot_represent_is_one_line(tmp_path, llama_dir, case, words):
    import json

    from typer.testing import CliRunner

    from edgegpt.cli.app import app

    config = json.loads((llama_dir / "config.json").read_text())
    edits = {
        "gpt2": lambda: config.update(model_type="gpt2"),
        "mistral window": lambda: config.update(model_type="mistral", sliding_window="64"),
        "qwen2 window": lambda: config.update(model_type="qwen2", use_sliding_window=True, sliding_window=32,
                                              layer_types=["sliding_attention"]),
        "gemma embedding": lambda: config.update(model_type="gemma3_text", use_bidirectional_attention=True),
        "generation config": lambda: (llama_dir / "generation_config.json").write_text('{"eos_token_id": "two"}'),
        "chat template": lambda: (llama_dir / "tokenizer_config.json").write_text('{"chat_template": 7}'),
    }
    edits[case]()
    (llama_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "ckpt"
    result = CliRunner().invoke(app, ["convert", str(llama_dir), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: ") and "Traceback" not in result.output
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


# -- Q/K/V biases through export ------------------------------------------------------------------------------


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # a torch.onnx export of its own (the shared packages have no biases)
def test_qwen2_biases_reach_the_plain_and_the_fused_graphs(tmp_path, tiny_checkpoint):
    """PyTorch vs ONNX logits for a model with Q/K/V biases: the plain torch.onnx graph, and the fused graph
    with packed and with separate Q/K/V projections, after a prefill and after a decode step on its cache."""
    import numpy as np

    from edgegpt.export.fused import build_fused_graph
    from edgegpt.export.onnx_export import export_plain_onnx

    save_hf(tiny_qwen2(tied=False), tmp_path / "hf", tiny_checkpoint)
    model, _ = load_checkpoint(convert(tmp_path / "hf", tmp_path / "ckpt")[1])
    cfg = model.cfg
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).numpy()
    export_plain_onnx(model, tmp_path / "plain.onnx")
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 12), np.int64)}
    empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    for i in range(cfg.n_layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = empty
    plain = _session(tmp_path / "plain.onnx").run(["logits"], feeds)[0]
    assert np.abs(plain - expected).max() <= 1e-4
    for packed in (True, False):
        path = tmp_path / f"fused-{packed}.onnx"
        build_fused_graph(model, path, pack_qkv=packed)
        session = _session(path)
        cache = np.zeros((1, cfg.n_kv_heads, cfg.max_len, cfg.head_dim), np.float32)
        past = {f"past_{kind}.{i}": cache for i in range(cfg.n_layers) for kind in ("key", "value")}

        def run(chunk, total, past):
            outputs = session.run(None, {"input_ids": chunk, "seqlens_k": np.array([total - 1], np.int32),
                                         "total_sequence_length": np.array(total, np.int32), **past})
            names = [o.name for o in session.get_outputs()]
            present = {n.replace("present_", "past_"): v for n, v in zip(names[1:], outputs[1:])}
            return outputs[0], present

        prefill, present = run(ids[:, :11].numpy(), 11, past)
        assert np.abs(prefill - expected[:, :11]).max() <= 1e-4, packed
        step, _ = run(ids[:, 11:].numpy(), 12, present)
        assert np.abs(step[:, 0] - expected[:, 11]).max() <= 1e-4, packed
