"""Every weight format and KV-cache precision from one checkpoint, side by side: size, quality, speed.

    python benchmarks/quantization.py --checkpoint DIR [--data TEXT] [--eval-tokens 16384] [--json]
    python benchmarks/quantization.py --preset small          # random weights: size and speed only
    python benchmarks/quantization.py --checkpoint DIR --perturb 0.5   # weights that were never 4-bit

Every package is made by the exporter's own steps (build_graph, the int8-cache graph, quantize_fixed /
quantize_auto with calibration text, the offline optimization, the package writer) and run through the
runtime's Generator, as an app would: batch 1, `--threads` intra-op threads, greedy.

    quality   perplexity on held-out text (windows of min(context, 1,024), stride half), and top-1 and greedy
              agreement, each package against the float32 package (which matches PyTorch within 1e-4)
    decode    tokens/s over 64 steps after a prefill to each of --positions (64 and 900; clipped to the
              context), median of --runs interleaved passes (on a shared 2-core machine the same run moves
              by up to ±20% between passes, BENCHMARK-NOTES.md: quote ratios, not differences under ~15%)
    prefill   ms for a 512-token prompt (or the context's half)
    cache     KV-cache bytes per token, from the runtime's own buffers

--perturb S adds uniform noise of ±S/2 quantization steps of a 4-bit asymmetric block of 32 to every
projection (then the perturbed float32 model is the reference): SmolLM2's published weights come from a
Q4_1 file, whose grid a 4-bit format can nearly reproduce; perturbed weights show what holds on weights
that were never 4-bit.
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
import torch
from kv_cache import buffer_bytes_per_token, decode_speed
from rich.console import Console
from rich.table import Table

from common import machine, random_checkpoint
from edgegpt.checkpoint import load_checkpoint, save_checkpoint
from edgegpt.core.formats import MODEL
from edgegpt.export.cache_precision import build_int8_cache_graph
from edgegpt.export.package import build_graph, optimize_offline
from edgegpt.export.quantize import QuantOptions
from edgegpt.export.quantize_package import SEARCH_TOKENS, calibration_text, quantize_auto, quantize_fixed
from edgegpt.export.writer import write_package_metadata
from edgegpt.quality import EvalText, PackageScorer, evaluate, prepare_eval_text, read_eval_documents
from edgegpt.runtime import Generator

# name -> weights (None: float32; "auto": --quantize auto at AUTO_BUDGET; else QuantOptions), KV cache
FORMATS = {
    "fp32": (None, "fp32"),
    "fp32 + int8 cache": (None, "int8"),
    "int8 rtn sym (before)": (QuantOptions(8, rounding="rtn", symmetric=True), "fp32"),
    "int8 (default)": (QuantOptions(8), "fp32"),
    "int8 + int8 cache": (QuantOptions(8), "int8"),
    "int8 dynamic": (QuantOptions(8, method="dynamic"), "fp32"),
    "int4 rtn sym (before)": (QuantOptions(4, rounding="rtn", symmetric=True), "fp32"),
    "int4 search": (QuantOptions(4, rounding="search"), "fp32"),
    "int4 (default: gptq)": (QuantOptions(4), "fp32"),
    "int4 gptq blocks of 64": (QuantOptions(4, block_size=64), "fp32"),
    "int4 gptq accuracy_level 1": (QuantOptions(4, accuracy_level=1), "fp32"),
    "auto 1%": ("auto", "fp32"),
}
AUTO_BUDGET = 0.01
DECODE_STEPS = 64


def perturb(checkpoint: Path, out: Path, strength: float) -> Path:
    model, tokenizer = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj"):
                w = module.weight
                blocks = w.reshape(w.shape[0], -1, 32)
                step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
                noise = (torch.rand(blocks.shape, generator=generator) - 0.5) * strength * step
                w.copy_((blocks + noise).reshape(w.shape))
    save_checkpoint(out, model, tokenizer)
    return out


def build_packages(checkpoint: Path, work: Path, names: list[str], text: EvalText, calibration) -> dict[str, Path]:
    model, tokenizer = load_checkpoint(checkpoint)
    packages: dict[str, Path] = {}
    floats: dict[str, tuple[Path, dict]] = {}
    for name in names:
        weights, cache = FORMATS[name]
        if cache not in floats:
            directory = work / f"float-{cache}"
            directory.mkdir(parents=True)
            if cache == "fp32":
                contract = build_graph(model, directory / MODEL, True, "float32")
            else:
                contract, _ = build_int8_cache_graph(model, text, directory / MODEL)
            write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract, checkpoint=checkpoint)
            floats[cache] = directory, contract
        source, contract = floats[cache]

        def finish(directory: Path, contract=contract) -> None:
            optimize_offline(directory / MODEL)
            write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract, checkpoint=checkpoint)

        start = time.perf_counter()
        if weights is None:
            directory = work / name.replace(" ", "-").replace("+", "")
            directory.mkdir()
            (directory / MODEL).write_bytes((source / MODEL).read_bytes())
        else:
            directory = work / name.replace(" ", "-").replace("+", "").replace("(", "").replace(")", "")
            directory.mkdir()
            quiet = lambda message: None  # noqa: E731
            if weights == "auto":
                quantize_auto(model, source, directory, QuantOptions(4).resolved(), calibration,
                              text.tokens[: SEARCH_TOKENS + 1], text.char_table, text.window, AUTO_BUDGET, finish,
                              quiet)
            else:
                quantize_fixed(model, source, directory, weights.resolved(), calibration, quiet)
        finish(directory)
        packages[name] = directory
        print(f"built {name}: {(directory / MODEL).stat().st_size / 1e6:.1f} MB in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return packages


def measure_quality(packages: dict[str, Path], text: EvalText) -> dict[str, dict]:
    results, reference = {}, None
    for name, path in packages.items():
        metrics = evaluate(name, PackageScorer(Generator.load(path, provider="cpu", max_length=text.window)), text,
                           reference)
        reference = reference or metrics.predictions
        results[name] = metrics.to_dict()
        print(f"scored {name}: perplexity {metrics.perplexity:.3f} in {metrics.seconds:.0f} s", file=sys.stderr)
    return results


def prefill_ms(generator: Generator, prompt: list[int]) -> float:
    start = time.perf_counter()
    generator.forward(prompt, generator.empty_cache(capacity=len(prompt) + 1))
    return 1000 * (time.perf_counter() - start)


def measure_speed(packages: dict[str, Path], threads: int, runs: int, prompt: list[int],
                  positions: list[int], prefill_tokens: int) -> dict[str, dict]:
    generators = {name: Generator.load(path, provider="cpu", threads=threads) for name, path in packages.items()}
    for generator in generators.values():  # warm-up: first runs pay for allocation and page faults
        decode_speed(generator, prompt, positions[0], 8)
    samples = {name: {"prefill": [], **{p: [] for p in positions}} for name in generators}
    for _ in range(runs):  # interleaved, so a noisy moment hits every package alike
        for name, generator in generators.items():
            for position in positions:
                samples[name][position].append(decode_speed(generator, prompt, position, DECODE_STEPS))
            samples[name]["prefill"].append(prefill_ms(generator, prompt[:prefill_tokens]))
    return {name: {"cache_bytes_per_token": buffer_bytes_per_token(generators[name]),
                   "prefill_ms": statistics.median(s["prefill"]),
                   "decode_tokens_per_s": {p: statistics.median(s[p]) for p in positions}}
            for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained or converted checkpoint (quality needs one)")
    parser.add_argument("--preset", default=None, help="without --checkpoint: random weights of this preset")
    parser.add_argument("--data", type=Path, default=None, help="held-out text (default: the validation split)")
    parser.add_argument("--calibration-data", type=Path, default=None, help="default: as `edgegpt export`")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated names from FORMATS")
    parser.add_argument("--perturb", type=float, default=0.0, help="noise, in 4-bit steps (see above)")
    parser.add_argument("--positions", default="64,900")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing passes (median)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    if not args.checkpoint and not args.preset:
        parser.error("pass --checkpoint DIR (or --preset NAME for random weights)")
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    if unknown := [n for n in names if n not in FORMATS]:
        parser.error(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    work = Path(tempfile.mkdtemp(prefix="edgegpt-quantization-"))
    checkpoint = args.checkpoint or random_checkpoint(args.preset, work / "checkpoint")
    if args.perturb:
        checkpoint = perturb(checkpoint, work / "perturbed", args.perturb)
    model, tokenizer = load_checkpoint(checkpoint)
    window = min(model.cfg.max_len, 1024)
    if args.checkpoint:
        from edgegpt.quality import validation_documents

        documents, source = read_eval_documents(args.data) if args.data else validation_documents(checkpoint)
        text = prepare_eval_text(documents, source, tokenizer, model.cfg.vocab_size, window, args.eval_tokens)
    else:
        tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, args.eval_tokens + 1).astype(np.int64)
        text = EvalText(tokens, np.ones(model.cfg.vocab_size, np.int64), "random tokens", False, window)
    calibration = calibration_text(checkpoint, args.calibration_data, tokenizer)
    packages = build_packages(checkpoint, work / "packages", names, text, calibration)
    quality = measure_quality(packages, text) if args.checkpoint else {}
    positions = sorted({min(int(p), model.cfg.max_len - DECODE_STEPS - 2) for p in args.positions.split(",")})
    prompt = np.resize(text.tokens, max(positions) + DECODE_STEPS + 1).tolist()
    speed = measure_speed(packages, args.threads, args.runs, prompt, positions, min(512, model.cfg.max_len // 2))

    sizes = {name: (path / MODEL).stat().st_size for name, path in packages.items()}
    base = names[0]
    title = f"weights × KV cache of {args.checkpoint or args.preset}"
    title += f", perturbed {args.perturb}" if args.perturb else ""
    caption = (f"{machine()}, {args.threads} threads, batch 1, greedy; decode: median of {args.runs} interleaved "
               f"passes of {DECODE_STEPS} steps; prefill: {min(512, model.cfg.max_len // 2)} tokens"
               + (f"; quality: {text.tokens.size - 1:,} tokens of {text.source} against {base}; "
                  f"calibration: {calibration.source}" if quality else "; random weights: no quality figures"))
    table = Table(title=title, caption=caption)
    columns = ["format", "MB", "× int8", "cache B/token", "Δ perplexity", "top-1", "greedy",
               *[f"tok/s @{p}" for p in positions], f"@{positions[-1]} / @{positions[0]}", "prefill ms"]
    for column in columns:
        table.add_column(column, justify="left" if column == "format" else "right")
    int8 = sizes.get("int8 (default)")
    figures = {"machine": machine(), "threads": args.threads, "checkpoint": str(args.checkpoint or args.preset),
               "perturb": args.perturb, "text": text.source if quality else None, "formats": {}}
    for name in names:
        q, s = quality.get(name), speed[name]
        delta = q["perplexity"] / quality[base]["perplexity"] - 1 if q else None
        rates = s["decode_tokens_per_s"]
        table.add_row(name, f"{sizes[name] / 1e6:.1f}", f"{sizes[name] / int8:.3f}" if int8 else "—",
                      f"{s['cache_bytes_per_token']:,}", f"{delta:+.2%}" if delta is not None else "—",
                      f"{q['top1_agreement']:.1%}" if q and q["top1_agreement"] is not None else "—",
                      f"{q['greedy_agreement']:.1%}" if q and q["greedy_agreement"] is not None else "—",
                      *[f"{rates[p]:.0f}" for p in positions], f"{rates[positions[-1]] / rates[positions[0]]:.2f}",
                      f"{s['prefill_ms']:.1f}")
        figures["formats"][name] = {"bytes": sizes[name], **s, "quality": q, "perplexity_delta": delta}
    Console(width=max(Console().width, 170)).print(table)  # a log file would wrap it at 80 columns
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
