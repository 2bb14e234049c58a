"""PyTorch eager: transformers' LlamaForCausalLM on the converted Hugging Face directory (venv-peers)."""

from __future__ import annotations

from pathlib import Path

from .models import Models, files_size
from .worker import Runner


def prepare(models: Models, precision: str) -> tuple[Path, int]:
    models.need_peers()
    hf = models.hf()
    return hf, files_size(hf.glob("*.safetensors"))


class TorchRunner(Runner):
    """transformers' LlamaForCausalLM, eager (SDPA attention), its DynamicCache, a plain greedy loop."""

    def __init__(self, path: str, threads: int, max_length: int):
        import torch

        torch.set_num_threads(threads)
        from transformers import LlamaForCausalLM

        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def first(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def step(self, token, past):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([[token]]), past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values
