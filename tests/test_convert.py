"""`edgegpt convert`: checkpoint ↔ Hugging Face LlamaForCausalLM, lossless both ways (logits ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from edgegpt.checkpoint import load_checkpoint
from edgegpt.convert import convert
from edgegpt.core.errors import EdgeGPTError

transformers = pytest.importorskip("transformers", reason="transformers is in the [dev] extra")


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
    direction, ckpt = convert(tmp_path / "hf", tmp_path / "ckpt")
    assert direction == "huggingface → checkpoint"
    ours, _ = load_checkpoint(ckpt)
    assert ours.cfg.tie_embeddings is tied and ours.cfg.rope_theta == 50000.0
    ids = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5
    # and back: the round trip is bit-exact
    convert(ckpt, tmp_path / "hf2")
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_refuses_what_it_cannot_represent(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "gpt2" / "tokenizer.json").write_text("{}")
    with pytest.raises(EdgeGPTError, match="only 'llama'"):
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
    import edgegpt.convert as module

    hf, out = tmp_path / "hf", tmp_path / "out"
    convert(tiny_checkpoint, hf)
    convert(hf, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(directory, model, tokenizer):
        (directory / "model.safetensors").write_bytes(b"half")
        raise EdgeGPTError("could not write (No space left on device)")

    monkeypatch.setattr(module, "save_checkpoint", full_disk)
    with pytest.raises(EdgeGPTError, match="No space"):
        convert(hf, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no staging directory left behind


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "big"), ("num_attention_heads", 0), ("num_hidden_layers", 2.0), ("vocab_size", True),
    ("head_dim", None), ("rope_theta", "fast"), ("tie_word_embeddings", "yes"),
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
