"""The PyTorch reference: a checkpoint's model as the runtime-side code sees it, numpy logits in and out.

    TorchReference(model)
      .logit_chunks(windows [B, L] int64, skip) ─► float32 [B, n, vocab], …    what edgegpt.scoring scores
      .logits(windows, skip)              ─► float32 [B, L - skip, vocab]: the chunks joined
      .generate(prompt ids, ...)          ─► the runtime's decode loop (runtime/decoding.py) and Sampler
      .greedy(prompt ids, n)              ─► one greedy continuation, through that decode loop
      .greedy_all(prompts, n)             ─► the quality gates' greedy continuations, all prompts at once

The decode loop and the sampler are the runtime's own, fed numpy float32 logits exactly as the runtime
feeds them, so with the same seed and options both choose the same tokens wherever their logits agree
(float32 packages agree to ~1e-5, far below what moves a draw in practice). This is what the runtime,
the export gates and `edgegpt eval CHECKPOINT` are measured against.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from edgegpt.model import GPT, LayerCache
from edgegpt.runtime.decoding import Decoding, argmax, greedy
from edgegpt.runtime.sampling import Sampler, SamplingParams, check_sampling
from edgegpt.scoring import chunk_starts


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run PyTorch on `n` threads for a while. Batch-1 decode steps of a small model are too short to
    share between threads: on a busy 2-core machine two threads made them many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchReference:
    """A GPT in eval mode behind numpy: scoring windows and the one decode loop."""

    def __init__(self, model: GPT, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_len = model.cfg.max_len

    @torch.no_grad()
    def logit_chunks(self, windows: np.ndarray, skip: int = 0) -> Iterator[np.ndarray]:
        """float32 [B, n, vocab] for consecutive positions from skip (empty past; the first `skip` positions
        are history only), a few positions at a time (edgegpt.scoring.chunk_starts): the layers run once for
        the whole window, the LM head chunk by chunk, so only a chunk's logits exist at once (a 262k vocabulary
        makes a whole window's 1 GiB per 1,024 tokens, and the soft-cap's temporaries as much again), and the
        history positions' are never computed. On CUDA under bfloat16 autocast, as training runs."""
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64)).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            hidden = self.model.hidden_states(x)
        starts = chunk_starts(hidden.shape[1], skip, len(windows), self.model.cfg.vocab_size)
        for start in starts:
            with autocast:
                logits = self.model.logits(hidden[:, start : start + starts.step])
            yield logits.float().cpu().numpy()

    def logits(self, windows: np.ndarray, skip: int = 0) -> np.ndarray:
        """float32 [B, L - skip, vocab]: logit_chunks joined (tests and small models; scoring takes the chunks)."""
        return np.concatenate(list(self.logit_chunks(windows, skip)), axis=1)

    def _loop(self, prompt_ids: Sequence[int]):
        """prefill and feed closures over one sequence's PyTorch cache (numpy float32 logits [vocab])."""
        past: list[LayerCache] = self.model.empty_cache()

        @torch.no_grad()
        def run(ids: list[int]) -> np.ndarray:
            nonlocal past
            logits, past = self.model.forward_cached(torch.tensor([ids], device=self.device), past)
            return logits[0, -1].float().cpu().numpy()

        return (lambda: run(list(prompt_ids))), (lambda token: run([token]))

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        eos_token_id: int | None = None,
        vocab_size: int | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """New token ids after prompt_ids, by the runtime's rules (eos_token_id None: never stops there;
        max_length: default the model's context; vocab_size: ids the tokenizer can decode)."""
        check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                       sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty)
        sampler = Sampler(sampling, seed, prompt_ids, vocab_size or self.model.cfg.vocab_size)
        eos = () if eos_token_id is None else (eos_token_id,)
        decoding = Decoding(len(prompt_ids), max_new_tokens, max_length or self.max_len, eos)
        prefill, feed = self._loop(prompt_ids)
        with torch_threads(1):
            return list(decoding.run(prefill, feed, sampler.choose))

    def greedy(self, prompt: Sequence[int], n_tokens: int) -> list[int]:
        """The greedy continuation of `prompt`, n_tokens long (end-of-text does not stop it)."""
        prefill, feed = self._loop(prompt)
        with torch_threads(1):
            return greedy(prefill, feed, len(prompt), n_tokens)

    @torch.no_grad()
    def greedy_all(self, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """greedy(prompt, n_tokens) for every prompt, as one batch through PyTorch's KV cache.

        The gates' prompts all have one length, so they run as a batch with no padding: a prefill, then
        n_tokens - 1 steps of one token per row, each row's argmax fed back, exactly what `greedy` does
        row by row (the last token chosen is not fed). A step of a small model is Python-bound, so one batch
        takes a fraction of the time of one prompt at a time.
        """
        if not prompts or n_tokens <= 0:
            return [[] for _ in prompts]
        if len({len(p) for p in prompts}) > 1:
            return [self.greedy(p, n_tokens) for p in prompts]
        # Every row keeps exactly n_tokens (greedy's rules), so the rows end together.
        rows = [Decoding(len(p), n_tokens, len(p) + n_tokens, stop_at_eos=False) for p in prompts]
        ids = torch.tensor([list(p) for p in prompts], device=self.device)
        logits, past = self.model.forward_cached(ids, self.model.empty_cache(len(prompts)))
        while True:
            chosen = [argmax(row_logits) for row_logits in logits[:, -1].float().cpu().numpy()]
            for row, token in zip(rows, chosen):
                row.accept([token])
            if rows[0].done:
                return [row.tokens for row in rows]
            logits, past = self.model.forward_cached(torch.tensor(chosen, device=self.device)[:, None], past)
