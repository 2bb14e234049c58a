"""optimum: its ONNX export of the Hugging Face directory and its dynamic int8 (ORTQuantizer, avx512_vnni),
run as ORTModelForCausalLM through `generate` (venv-peers)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .models import Models, files_size
from .processes import run_logged
from .worker import Runner

# Run with venv-peers' python: optimum-onnx needs transformers<4.58, so it is not in this interpreter.
EXPORT = ("import sys; from optimum.onnxruntime import ORTModelForCausalLM; "
          "ORTModelForCausalLM.from_pretrained(sys.argv[1], export=True).save_pretrained(sys.argv[2])")
QUANTIZE = ("import sys; from optimum.onnxruntime import ORTQuantizer; "
            "from optimum.onnxruntime.configuration import AutoQuantizationConfig; "
            "q = ORTQuantizer.from_pretrained(sys.argv[1], file_name='model.onnx'); "
            "q.quantize(save_dir=sys.argv[2], "
            "quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))")


def prepare(models: Models, precision: str) -> tuple[Path, int]:
    models.need_peers()
    hf = models.hf()

    def export(out: Path) -> None:
        run_logged([models.peers_python, "-c", EXPORT, hf, out])
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(hf / name, out / name)

    fp32 = models.once(models.root / "optimum-fp32", export)
    if precision == "fp32":
        return fp32, files_size(fp32.glob("model.onnx*"))

    def quantize(out: Path) -> None:
        run_logged([models.peers_python, "-c", QUANTIZE, fp32, out])
        for path in fp32.iterdir():
            if not path.name.startswith("model.onnx") and not (out / path.name).exists():
                shutil.copy(path, out / path.name)

    int8 = models.once(models.root / "optimum-int8", quantize)
    return int8, files_size(int8.glob("model_quantized.onnx*"))


class OptimumRunner(Runner):
    """ORTModelForCausalLM through `generate` (how its users run it), timed by a streamer."""

    def __init__(self, path: str, threads: int, max_length: int):
        import onnxruntime as ort
        import torch

        torch.set_num_threads(threads)
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        file_name = "model_quantized.onnx" if Path(path, "model_quantized.onnx").exists() else "model.onnx"
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(path, file_name=file_name, session_options=options,
                                                         provider="CPUExecutionProvider")

    def _generate(self, ids, n):
        stamps = []

        class Streamer:
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        input_ids = self.torch.tensor([ids])
        t0 = time.perf_counter()
        self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, streamer=Streamer(), pad_token_id=0)
        return t0, stamps[1:]  # the first put() is the prompt

    def decode(self, ids, n):
        _, stamps = self._generate(ids, n + 1)
        return n / (stamps[-1] - stamps[0])

    def ttft(self, ids):
        t0, stamps = self._generate(ids, 1)
        return stamps[0] - t0

    def first(self, ids):
        self._generate(ids, 1)
        return None, None

    def greedy(self, ids, n):
        input_ids = self.torch.tensor([ids])
        out = self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        return [int(t) for t in out[0, len(ids):]]
