"""The PyTorch reference generator: the checkpoint's own cached forward pass and the runtime's sampler.

    prompt ids ─► prefill ─► logits [vocab] ─► Sampler.choose (edgegpt.runtime.sampling, numpy) ─► token
                                 ▲                                                                 │
                                 └────────────── decode_step(token, past) ◄────────────────────────┘

The sampler is the runtime's own, fed numpy float32 logits exactly as the runtime feeds it, so with the
same seed and options both choose the same tokens wherever their logits agree (float32 packages agree
to ~1e-5, far below what moves a draw in practice). This is what the runtime is tested against, and
what `edgegpt eval`-style comparisons can use without an export.
"""

from __future__ import annotations

import numpy as np
import torch

from edgegpt.model import GPT, LayerCache
from edgegpt.runtime.sampling import Sampler, SamplingParams, check_sampling


@torch.no_grad()
def prefill(model: GPT, prompt_ids: list[int]) -> tuple[np.ndarray, list[LayerCache]]:
    """The prompt with an empty past: logits [vocab] float32 for the next token, and the cache."""
    logits, past = model.forward_cached(torch.tensor([prompt_ids]), model.empty_cache())
    return logits[0, -1].float().numpy(), past


@torch.no_grad()
def decode_step(model: GPT, token: int, past: list[LayerCache]) -> tuple[np.ndarray, list[LayerCache]]:
    """One token after `past`: logits [vocab] float32 for the token after it, and the cache grown by 1."""
    logits, past = model.forward_cached(torch.tensor([[token]]), past)
    return logits[0, -1].float().numpy(), past


def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int | None = None,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
    max_length: int | None = None,
) -> list[int]:
    """New token ids after prompt_ids, by the runtime's rules: stop at eos_token_id (not included; None:
    never), after max_new_tokens, or when the context (max_length, default the model's) is full.
    vocab_size: ids the tokenizer can decode (default: the model's vocab)."""
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.repetition_penalty)
    model.eval()
    max_length = max_length or model.cfg.max_len
    sampler = Sampler(sampling, seed, prompt_ids, vocab_size or model.cfg.vocab_size)
    out: list[int] = []
    if max_new_tokens == 0:
        return out
    logits, past = prefill(model, prompt_ids)
    length = len(prompt_ids)
    while True:
        token = sampler.choose(logits)
        if token == eos_token_id:
            return out
        out.append(token)
        if len(out) == max_new_tokens or length >= max_length:
            return out
        logits, past = decode_step(model, token, past)
        length += 1
