"""onnxruntime-genai: its model builder's fp32/int8/int4 CPU models (venv-builder), run by its own
Generator loop (venv-peers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .models import Models, files_size
from .processes import run_logged
from .worker import Runner

# The model builder (`python -m onnxruntime_genai.models.builder ARGS`), with one adaptation: transformers 5 reads
# a Gemma 3 config.json into rope parameters per layer type ({"full_attention": {...}, "sliding_attention": {...}}),
# which genai 0.18's Gemma 3 builder does not read (KeyError: 'rope_type'); it gets the flat form it reads (the
# global rotary's parameters, and rope_local_base_freq for the sliding layers). Other configs pass unchanged.
BUILDER = """
import runpy, sys
from transformers import AutoConfig
load = AutoConfig.from_pretrained
def flat_rope(*args, **kwargs):
    config = load(*args, **kwargs)
    for part in (config, getattr(config, "text_config", None)):
        rope = getattr(part, "rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
            local = rope.get("sliding_attention") or rope["full_attention"]
            part.rope_parameters = dict(rope["full_attention"])
            part.rope_theta = rope["full_attention"]["rope_theta"]
            part.rope_local_base_freq = local["rope_theta"]
    return config
AutoConfig.from_pretrained = flat_rope
sys.argv[0] = "builder.py"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def prepare(models: Models, precision: str) -> tuple[Path, int]:
    models.need_peers()
    if not models.builder_python.exists():
        raise RuntimeError(f"{models.builder_python} is missing: run `python benchmarks/runtimes.py setup`")
    hf = models.hf()

    def build(out: Path) -> None:
        run_logged([models.builder_python, "-c", BUILDER, "-i", hf, "-o", out,
                    "-p", precision, "-e", "cpu", "-c", models.root / "genai-cache"])
        # genai takes its intra-op threads from the decoder's session options in genai_config.json.
        config_path = out / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = models.threads
        config_path.write_text(json.dumps(config, indent=2))
    directory = models.once(models.root / f"genai-{precision}", build)
    return directory, files_size(directory.glob("model.onnx*"))


class GenaiRunner(Runner):
    def __init__(self, path: str, threads: int, max_length: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(path)
        # genai sizes a sliding layer's windowed cache by max_length, and onnxruntime refuses one smaller than
        # the window (Gemma 3: "KV cache capacity (64) must be at least local_window_size (512)").
        config = json.loads((Path(path) / "genai_config.json").read_text())
        self.shortest = config["model"]["decoder"].get("sliding_window", {}).get("window_size", 0)

    def _generator(self, ids, new):
        params = self.og.GeneratorParams(self.model)
        total = max(len(ids) + new, self.shortest)  # min_length too: EOS ignored, like everywhere else
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def decode(self, ids, n):
        generator = self._generator(ids, n + 1)
        generator.generate_next_token()  # the first token comes from the prompt's logits
        t0 = time.perf_counter()
        for _ in range(n):
            generator.generate_next_token()
        return n / (time.perf_counter() - t0)

    def ttft(self, ids):
        t0 = time.perf_counter()
        generator = self._generator(ids, 1)
        generator.generate_next_token()
        return time.perf_counter() - t0

    def first(self, ids):
        generator = self._generator(ids, 1)
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0]), generator

    def greedy(self, ids, n):
        generator, tokens = self._generator(ids, n), []
        while len(tokens) < n:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens
