"""Packed training rows (GPT.forward's documents): a row of several examples computes exactly what each
example computes alone, and gradient checkpointing changes memory, not results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgegpt.core.config import ModelConfig, preset
from edgegpt.model import GPT, packed_masks

LLAMA = preset("nano", max_len=64)
# Every Gemma switch at once, with a window shorter than the examples so the sliding mask matters.
GEMMA_LIKE = ModelConfig(
    vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=160, max_len=64,
    post_norms=True, activation="gelu_tanh", embed_scale=True, qk_norm=True, query_pre_attn_scalar=24,
    sliding_window=4, layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_local_theta=100.0, rope_theta=1e6, attn_softcap=50.0, final_softcap=30.0,
)
QWEN_LIKE = dataclasses.replace(preset("nano", max_len=64), qkv_bias=True)
LENGTHS = (7, 11, 3, 5)  # the last "example" is padding: its own label, never attended to by the others


def packed_row(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)
    examples = [torch.randint(0, cfg.vocab_size, (n,)) for n in LENGTHS]
    labels = torch.cat([torch.full((n,), i if i < len(LENGTHS) - 1 else -1) for i, n in enumerate(LENGTHS)])
    return torch.cat(examples)[None], labels[None], examples


@torch.no_grad()
@pytest.mark.parametrize("cfg", [LLAMA, GEMMA_LIKE, QWEN_LIKE], ids=["llama", "gemma-like", "qwen2-like"])
def test_a_packed_row_equals_each_example_alone(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    ids, documents, examples = packed_row(cfg)
    packed = model(ids, documents=documents)[0]
    start = 0
    for example in examples:
        alone = model(example[None])[0]
        assert (packed[start : start + len(example)] - alone).abs().max().item() <= 1e-5
        start += len(example)


@torch.no_grad()
def test_without_documents_the_row_is_one_sequence():
    torch.manual_seed(0)
    model = GPT(LLAMA).eval()
    ids, _, _ = packed_row(LLAMA)
    one_label = torch.zeros_like(ids)
    assert (model(ids, documents=one_label) - model(ids)).abs().max().item() <= 1e-5


def test_positions_restart_and_a_repeated_label_is_another_example():
    # labels 0 0 1 1 1 0 0: the second run of 0s is a third example (it starts where the label changes)
    documents = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])
    positions, full, sliding = packed_masks(documents, torch.float32, window=2)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    allowed = (full[0, 0] == 0).int()
    assert allowed[6].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert allowed[4].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert (sliding[0, 0] == 0).int()[4].tolist() == [0, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA_LIKE], ids=["llama", "gemma-like"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cfg):
    ids, documents, _ = packed_row(cfg)

    def loss_and_grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(cfg, dropout=0.1).train()  # dropout: the recomputed pass must replay the same masks
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        logits = model(ids[:, :-1], documents=documents[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads(False)
    checked_loss, checked = loss_and_grads(True)
    assert checked_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in plain.items():
        assert torch.allclose(checked[name], grad, atol=1e-6), name
