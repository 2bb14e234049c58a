"""float32 vs int8 (both formats) vs int4 from one checkpoint: size, decode speed, validation quality.

    python benchmarks/quantization.py --checkpoint DIR [--threads 2] [--runs 5] [--eval-tokens N] [--json]
    python benchmarks/quantization.py --preset small          # random weights: size and speed only

Every package is made by the exporter's own steps (build_graph, quantize_graph, the package writer)
and run through the runtime's Generator, as an app would: batch 1, `--threads` intra-op threads, a
32-token prompt, then 128 greedy new tokens; decode tokens/s counts the 128 decode steps only. Runs
are interleaved (fp32, int8 nbits, int8 dynamic, int4, fp32, ...) and the median is reported, because
on this kind of shared 2-core machine the same run moves by up to ±20% between passes
(BENCHMARK-NOTES.md); ratios to float32 are the figures to quote, and differences under ~15% are
noise. Quality is nats/char on the checkpoint's validation split (whole by default), each package
compared with the float32 package (which matches PyTorch within 1e-4 in logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine, random_checkpoint
from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.formats import MODEL
from edgegpt.export.gates import PERPLEXITY_LIMITS
from edgegpt.export.package import build_graph
from edgegpt.export.quantize import quantize_graph
from edgegpt.export.writer import write_package_metadata
from edgegpt.quality import PackageScorer, evaluate, prepare_eval_text, read_eval_documents, validation_documents
from edgegpt.runtime import Generator

FORMATS = (  # name, bits, method (None = float32)
    ("fp32", None, None),
    ("int8 nbits", 8, "nbits"),
    ("int8 dynamic", 8, "dynamic"),
    ("int4 nbits", 4, "nbits"),
)
PROMPT_TOKENS, NEW_TOKENS = 32, 128


def build_packages(checkpoint: Path, work: Path, fuse: bool) -> dict[str, Path]:
    model, tokenizer = load_checkpoint(checkpoint)
    packages: dict[str, Path] = {}
    for name, bits, method in FORMATS:
        directory = work / name.replace(" ", "-")
        directory.mkdir(parents=True)
        if bits is None:
            contract = build_graph(model, directory / MODEL, fuse, "float32")
        else:
            quantize_graph(packages["fp32"] / MODEL, directory / MODEL, bits, method)
        write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract)
        packages[name] = directory
        print(f"built {name}: {(directory / MODEL).stat().st_size / 1e6:.2f} MB", file=sys.stderr)
    return packages


def decode_once(generator: Generator, prompt: list[int]) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for one greedy continuation of NEW_TOKENS tokens."""
    t0 = time.perf_counter()
    logits, cache = generator.prefill(prompt)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits, cache = generator.decode_step(int(np.argmax(logits)), cache)
    return t1 - t0, NEW_TOKENS / (time.perf_counter() - t1)


def measure_speed(packages: dict[str, Path], threads: int, runs: int, prompt: list[int]) -> dict[str, dict]:
    generators = {name: Generator.load(path, provider="cpu", threads=threads) for name, path in packages.items()}
    for generator in generators.values():  # warm-up: first runs pay for allocation and page faults
        decode_once(generator, prompt)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in generators}
    for _ in range(runs):  # interleaved, so a noisy moment hits every format alike
        for name, generator in generators.items():
            samples[name].append(decode_once(generator, prompt))
    return {name: {"decode_tokens_per_s": statistics.median(s[1] for s in runs_),
                   "prefill_ms": 1000 * statistics.median(s[0] for s in runs_),
                   "decode_runs": [round(s[1], 1) for s in runs_]} for name, runs_ in samples.items()}


def measure_quality(packages: dict[str, Path], text) -> dict[str, dict]:
    results, reference = {}, None
    for name, path in packages.items():
        metrics = evaluate(name, PackageScorer(Generator.load(path, provider="cpu")), text, reference)
        reference = reference or metrics.predictions
        results[name] = metrics.to_dict()
        print(f"scored {name}: {metrics.nats_per_char:.4f} nats/char in {metrics.seconds:.0f} s", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (quality needs one)")
    parser.add_argument("--preset", default=None, help="without --checkpoint: random weights of this preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="interleaved timing runs per format (median)")
    parser.add_argument("--data", type=Path, default=None, help="held-out text (default: the validation split)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="cap the scored tokens (default: all)")
    parser.add_argument("--no-fuse", action="store_true", help="measure the plain torch.onnx graph instead")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    if not args.checkpoint and not args.preset:
        parser.error("pass --checkpoint DIR (or --preset NAME for random weights)")
    work = Path(tempfile.mkdtemp(prefix="edgegpt-quantization-"))
    checkpoint = args.checkpoint or random_checkpoint(args.preset, work / "checkpoint")
    packages = build_packages(checkpoint, work / "packages", fuse=not args.no_fuse)
    generator = Generator.load(packages["fp32"], provider="cpu")
    spec, tokenizer = generator.config, generator.package.tokenizer

    quality, text = {}, None
    if args.checkpoint:
        documents, source = read_eval_documents(args.data) if args.data else validation_documents(checkpoint)
        text = prepare_eval_text(documents, source, tokenizer, spec.vocab_size, spec.max_len,
                                 args.eval_tokens or 10**9)
        prompt = text.tokens[:PROMPT_TOKENS].tolist()
        quality = measure_quality(packages, text)
    else:
        prompt = np.random.default_rng(0).integers(0, spec.vocab_size, PROMPT_TOKENS).tolist()
    speed = measure_speed(packages, args.threads, args.runs, prompt)

    sizes = {name: (path / MODEL).stat().st_size for name, path in packages.items()}
    base = {"size": sizes["fp32"], "speed": speed["fp32"]["decode_tokens_per_s"],
            "ppl": quality.get("fp32", {}).get("perplexity")}
    title = f"quantization of {checkpoint} ({'plain' if args.no_fuse else 'fused'} graph)"
    table = Table(title=title, caption=f"{machine()}, {args.threads} threads, batch 1, {PROMPT_TOKENS}-token prompt, "
                  f"{NEW_TOKENS} greedy tokens, median of {args.runs} interleaved runs"
                  + (f"; quality: {quality['fp32']['tokens']:,} tokens of {text.source}" if quality else
                     "; random weights: no quality figures"))
    for column in ("format", "model.onnx MB", "× fp32", "decode tok/s", "× fp32", "prefill ms", "nats/char",
                   "Δ perplexity", "top-1 agree", "gate"):
        table.add_column(column, justify="left" if column == "format" else "right")
    figures = {"machine": machine(), "threads": args.threads, "checkpoint": str(checkpoint),
               "fused": not args.no_fuse, "formats": {}}
    for name, bits, _ in FORMATS:
        q = quality.get(name)
        delta = q["perplexity"] / base["ppl"] - 1 if q else None
        limit = PERPLEXITY_LIMITS.get(f"int{bits}") if bits else None
        gate = "—" if delta is None or limit is None else ("pass" if delta <= limit else "FAIL") + f" (+{limit:.1%})"
        table.add_row(name, f"{sizes[name] / 1e6:.2f}", f"{sizes[name] / base['size']:.3f}",
                      f"{speed[name]['decode_tokens_per_s']:.0f}",
                      f"{speed[name]['decode_tokens_per_s'] / base['speed']:.2f}", f"{speed[name]['prefill_ms']:.1f}",
                      f"{q['nats_per_char']:.4f}" if q else "—", f"{delta:+.2%}" if delta is not None else "—",
                      f"{q['top1_agreement']:.1%}" if q and q["top1_agreement"] is not None else "—", gate)
        figures["formats"][name] = {"bytes": sizes[name], "size_ratio": sizes[name] / base["size"], **speed[name],
                                    "quality": q, "perplexity_delta": delta}
    Console(width=max(Console().width, 150)).print(table)  # a log file would wrap it at 80 columns
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
