"""The PyTorch reference: the KV-cache path must be the same function as the full forward pass."""

from __future__ import annotations

import pytest
import torch

from edgegpt.core.config import ModelConfig, preset
from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("nano", max_len=64)).eval()


@torch.no_grad()
def test_token_by_token_decoding_equals_full_forward(model):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    full = model(ids)
    cache, steps = model.empty_cache(batch=2), []
    for t in range(ids.shape[1]):
        logits, cache = model.forward_cached(ids[:, t : t + 1], cache)
        steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert cache[0][0].shape == (2, model.cfg.n_kv_heads, 40, model.cfg.head_dim)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 17, 39])
def test_prefill_then_chunk_equals_full_forward(model, split):
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))
    first, cache = model.forward_cached(ids[:, :split])
    rest, _ = model.forward_cached(ids[:, split:], cache)
    assert (torch.cat([first, rest], dim=1) - model(ids)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_left_padding_does_not_change_a_row(model):
    ids = torch.randint(1, model.cfg.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is a 7-token prompt, left-padded
    padded, _ = model.forward_cached(ids, attention_mask=mask)
    alone = model(ids[1:, 5:])
    assert (padded[1, 5:] - alone[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(padded).all()  # padded query rows must not turn into NaN


def test_tied_head_is_the_embedding(model):
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert model.num_parameters() == model.cfg.num_parameters()


@pytest.mark.parametrize("bad", [dict(dim=130), dict(n_kv_heads=3), dict(vocab_size=0), dict(norm_eps=-1.0)])
def test_inconsistent_config_is_refused(bad):
    with pytest.raises(EdgeGPTError):
        ModelConfig(**{**preset("nano").to_dict(), **bad})


def test_presets_have_their_advertised_sizes():
    sizes = {name: preset(name).num_parameters() / 1e6 for name in ("nano", "micro", "small", "base")}
    assert 0.7 < sizes["nano"] < 1.3 and 2.5 < sizes["micro"] < 6 and 25 < sizes["small"] < 35
    assert 130 < sizes["base"] < 140
