"""LoRA adapters (edgegpt.train.lora): they start at the base model, only they train, merging them gives the
logits of base + adapters, and they are saved in PEFT's layout, which PEFT loads onto the Hugging Face form of
the base."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from edgegpt.checkpoint import read_weights, save_checkpoint
from edgegpt.core.config import preset
from edgegpt.model import GPT
from edgegpt.train.loop import make_optimizer
from edgegpt.train.lora import adapters, add_adapters, merged_weights, save_adapter, save_merged_weights
from edgegpt.train.options import LORA_TARGETS, TrainOptions

RANK, ALPHA = 4, 8.0
NANO = preset("nano", vocab_size=300, max_len=64)
# Tied and untied heads, and Q/K/V biases (Qwen2): merging must keep every weight it does not adapt.
CONFIGS = {"tied": NANO, "untied-qkv-bias": dataclasses.replace(NANO, tie_embeddings=False, qkv_bias=True)}


def adapted(cfg, targets=LORA_TARGETS, seed=0) -> GPT:
    """A random model with adapters whose B is random too (as after training), in eval mode (no dropout)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    add_adapters(model, RANK, ALPHA, 0.05, list(targets))
    with torch.no_grad():
        for _, module in adapters(model):
            module.lora_B.normal_(0.0, 0.05)
    return model.eval()


def token_ids(seed=1):
    return torch.randint(0, NANO.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow  # builds, saves and reads two models
@pytest.mark.parametrize("name", CONFIGS)
def test_merged_checkpoint_logits_equal_base_plus_adapters(name, tmp_path):
    cfg = CONFIGS[name]
    model = adapted(cfg)
    ids = token_ids()
    with torch.no_grad():
        unmerged = model(ids)
        save_merged_weights(tmp_path / "model.safetensors", model)
        # A plain checkpoint: read_weights checks every name and shape against what GPT(cfg) stores.
        merged = GPT.holding(cfg, read_weights(tmp_path / "model.safetensors", cfg)).eval()
        torch.testing.assert_close(merged(ids), unmerged, rtol=0, atol=1e-5)
        without = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        base = GPT(cfg).eval()
        base.load_state_dict(without, strict=not cfg.tie_embeddings)
        assert (base(ids) - unmerged).abs().max() > 1e-3  # the adapters do change the logits


def test_adapters_start_at_the_base_model():
    torch.manual_seed(0)
    base = GPT(NANO).eval()
    ids = token_ids()
    with torch.no_grad():
        before = base(ids)
        add_adapters(base, RANK, ALPHA, 0.0, list(LORA_TARGETS))
        torch.testing.assert_close(base(ids), before, rtol=0, atol=0)


def test_only_the_adapters_train_and_only_they_have_optimizer_state():
    model = adapted(NANO, targets=("q_proj", "v_proj"))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"layers.{i}.attn.{p}_proj.lora_{m}" for i in range(NANO.n_layers) for p in "qv" for m in "AB"}
    optimizer = make_optimizer(model, TrainOptions().resolved(), torch.device("cpu"))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    model(token_ids()).sum().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_merging_leaves_the_model_unmerged():
    """Saving merges into new tensors: the training model's base weights stay exactly the base."""
    model = adapted(NANO)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_weights(model)
    assert not any("lora_" in k for k in merged)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(merged["layers.0.attn.q_proj.weight"], before["layers.0.attn.q_proj.weight"])


def test_adapter_is_saved_in_pefts_layout(tmp_path):
    model = adapted(NANO, targets=("q_proj", "down_proj"))
    save_adapter(tmp_path, model, RANK, ALPHA, 0.05, ["q_proj", "down_proj"], base="some/checkpoint")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {}
    for i in range(NANO.n_layers):
        q = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        down = f"base_model.model.model.layers.{i}.mlp.down_proj"
        expected |= {f"{q}.lora_A.weight": (RANK, NANO.dim), f"{q}.lora_B.weight": (NANO.n_heads * NANO.head_dim, RANK),
                     f"{down}.lora_A.weight": (RANK, NANO.ffn_dim), f"{down}.lora_B.weight": (NANO.dim, RANK)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    torch.testing.assert_close(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
                               model.layers[1].mlp.down_proj.lora_B.detach(), rtol=0, atol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (RANK, ALPHA, 0.05)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"] and config["base_model_name_or_path"]


@pytest.mark.slow  # loads transformers and PEFT
@pytest.mark.parametrize("name", CONFIGS)
def test_peft_loads_the_adapter_onto_the_hugging_face_base(name, tmp_path, corpus_text):
    """The adapter folder, loaded by PEFT onto the Hugging Face folder that `edgegpt convert` writes from the base
    checkpoint, computes the logits of the merged checkpoint."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from edgegpt.convert.huggingface import to_huggingface
    from edgegpt.tokenizer import train_tokenizer

    cfg = CONFIGS[name]
    tokenizer = train_tokenizer([corpus_text[:20_000]], cfg.vocab_size)
    model = adapted(cfg)
    base = GPT(cfg)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k},
                         strict=not cfg.tie_embeddings)
    save_checkpoint(tmp_path / "base", base, tokenizer)
    to_huggingface(tmp_path / "base", tmp_path / "hf")
    save_adapter(tmp_path / "adapter", model, RANK, ALPHA, 0.05, list(LORA_TARGETS), base=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = token_ids()
    with torch.no_grad():
        ours = GPT.holding(cfg, merged_weights(model)).eval()(ids)
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, ours, rtol=0, atol=1e-4)


def test_projections_reading_one_input_share_its_dropout_mask_and_checkpointing_redraws_it_alike():
    """q, k and v (and gate and up) drop the same input positions; o and down draw their own; each pass draws
    anew; a layer recomputed under gradient checkpointing gives the gradients of the plain pass."""
    model = adapted(NANO).train()
    for _, module in adapters(model):
        module.dropout.p = 0.5
    seen = {}
    for name, module in adapters(model):
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(
            m.dropout.last[1] if m.dropout.last is not None else None))
    torch.manual_seed(3)
    model(token_ids())
    model(token_ids())
    layer = "layers.0"
    q, k, v = (seen[f"{layer}.attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
    gate, up, down = (seen[f"{layer}.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    assert q[0] is k[0] is v[0] and gate[0] is up[0]  # one draw for each shared input
    assert (q[0] == 0).any() and not torch.equal(q[0] == 0, q[1] == 0)  # dropped, and a new mask each pass
    assert down[0] is not gate[0] and all(m.dropout.last is None for _, m in adapters(model))  # let go after

    def gradients(checkpointed: bool) -> dict:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointed
        torch.manual_seed(4)
        model(token_ids()).logsumexp(-1).mean().backward()
        # Nothing held after the step: a recomputed layer that kept its masks would keep its whole graph.
        assert all(m.dropout.last is None for _, m in adapters(model))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
