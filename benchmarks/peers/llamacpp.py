"""llama.cpp: convert_hf_to_gguf.py to F32, llama-quantize to Q8_0 and Q4_0, measured by its own llama-bench
(it runs outside Python, so it has no Runner)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .models import Models
from .processes import run_logged, spawn
from .setup import llama_source
from .worker import NEW_TOKENS, PROMPT_TOKENS

GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}

# Our tokenizer is a byte-level BPE with GPT-2's pre-tokenizer regex, but convert_hf_to_gguf.py recognises
# pre-tokenizers by hashing a known vocabulary's output and refuses ours; tell it "gpt-2", which is what ours
# is. Speed does not depend on it: llama-bench feeds token ids. Run with `python -c` in the llama.cpp source
# folder, whose converter script and `conversion` package are then importable from the working directory.
CONVERT = ("import sys; import convert_hf_to_gguf as c, conversion.base as b; "
           "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
           "sys.argv = ['convert_hf_to_gguf.py', sys.argv[1], '--outtype', 'f32', '--outfile', sys.argv[2]]; "
           "c.main()")


def prepare(models: Models, precision: str) -> tuple[Path, int]:
    source = llama_source(models.work)
    bench, quantize = models.llama_build / "llama-bench", models.llama_build / "llama-quantize"
    if source is None or not bench.exists() or not quantize.exists():
        raise RuntimeError(f"llama.cpp is not built under {models.work}: run `python benchmarks/runtimes.py setup`")
    models.need_peers()
    hf = models.hf()
    gguf_dir = models.root / "gguf"
    f32 = gguf_dir / "model-F32.gguf"
    if not f32.exists():
        gguf_dir.mkdir(exist_ok=True)
        # the paths are absolute (WORK is resolved), so the working directory can be the source folder
        run_logged([models.peers_python, "-c", CONVERT, hf, f"{f32}.tmp"], cwd=source)
        os.replace(f"{f32}.tmp", f32)
    path = gguf_dir / f"model-{GGUF_TYPES[precision]}.gguf"
    if not path.exists():
        run_logged([quantize, f32, f"{path}.tmp", GGUF_TYPES[precision]], stdout=subprocess.DEVNULL)
        os.replace(f"{path}.tmp", path)
    return path, path.stat().st_size


def measure(model: Path, build: Path, threads: int, reps: int, ttft_tokens: int) -> dict:
    """llama-bench `-p ttft_tokens -n 128 -d 32`: TTFT is ttft_tokens ÷ its prefill tokens/s; cold start is
    the wall time of a fresh `llama-bench -p 32 -n 0 -r 1 --no-warmup`."""
    bench = build / "llama-bench"
    _, cold, _ = spawn([bench, "-m", model, "-t", threads, "-p", PROMPT_TOKENS, "-n", 0, "-r", 1, "--no-warmup"])
    stdout, _, rss = spawn([bench, "-m", model, "-t", threads, "-p", ttft_tokens, "-n", NEW_TOKENS,
                            "-d", PROMPT_TOKENS, "-r", reps, "-o", "json"])
    rows = json.loads(stdout)
    prefill = next(r for r in rows if r["n_prompt"] == ttft_tokens)
    decode = next(r for r in rows if r["n_gen"] == NEW_TOKENS)
    return {"cold_s": [cold], "decode": decode.get("samples_ts") or [decode["avg_ts"]],
            "ttft_s": [ttft_tokens / ts for ts in (prefill.get("samples_ts") or [prefill["avg_ts"]])],
            "rss_mb": [rss]}
