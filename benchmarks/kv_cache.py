"""KV-cache precision side by side (`edgegpt export --kv-cache`): memory per token, decode speed at a
short and a long position, quality; and, with --profile, where one decode step's time goes.

    python benchmarks/kv_cache.py --checkpoint DIR --data TEXT [--eval-tokens 4096] [--weights fp32,int8]
    python benchmarks/kv_cache.py --preset small            # random weights: bytes and speed only
    python benchmarks/kv_cache.py --package DIR             # one exported package, its own cache
    ... --profile                                           # per operator type, one decode step at 64 vs 900

Packages are made by the exporter's own steps (build_graph or build_int8_cache_graph, quantize_graph,
optimize_offline, the package writer): for each weight format in --weights, one package per cache in
--caches (fp32; int8 = PER_CHANNEL, the exporter's default; int8-tensor = PER_TENSOR, for comparison).
An int8 cache is calibrated as the exporter does, on the held-out text (random weights: on random tokens).
fp16 is not among them: a float16 cache is CUDA's (`--precision fp16`; benchmarks/cuda_decode.py), and
the CPU runtime refuses it.

Speed: batch 1, `--threads` intra-op threads, through the runtime's Generator as an app runs it. For each
position P in --positions: prefill P tokens into a cache allocated with room for the whole run (no growth
inside the timing), then time --steps greedy decode steps; runs are interleaved over the packages and the
median is reported, with each position's tokens/s as a ratio to the first position's ("flatness"). On a
shared 2-core machine the same run moves by up to ±20% between passes (BENCHMARK-NOTES.md): quote ratios
measured side by side, and run it on a quiet machine.

Quality (--checkpoint with --data or a validation split): the held-out text in windows of the model's
context (at most --window), scored by PyTorch float32 and by each package; Δ perplexity against PyTorch
(what the export gate limits) and against the same weights with a float32 cache (what the cache alone
costs), with top-1 agreement.

--profile: onnxruntime's profiler (SessionOptions.enable_profiling) on a fresh session per position;
after a prefill of P tokens and --warmup decode steps, --steps decode steps are recorded and each node's
kernel time is summed by operator type and averaged per step. The table shows µs per step at each position,
the growth, the run's time not spent in any kernel (onnxruntime's executor between nodes, and the profiler's
own bookkeeping, which inflates it) and the whole step as Python sees it (binding, the logits' copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine, random_checkpoint
from edgegpt.runtime import Generator, ModelPackage

CACHES = {"fp32": None, "int8": "PER_CHANNEL", "int8-tensor": "PER_TENSOR"}  # name -> int8 quant type
WEIGHTS = {"fp32": None, "int8": 8, "int4": 4}  # name -> bits (MatMulNBits, the exporter's default method)


# -- building the packages ----------------------------------------------------------------------------


def calibration_text(checkpoint: Path, data: Path | None, eval_tokens: int, window: int, random: bool):
    """The held-out text (EvalText) the int8 cache is calibrated on and quality is scored on; random tokens
    for random weights (calibration only: their quality means nothing)."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import EvalText, prepare_eval_text, read_eval_documents, validation_documents

    model, tokenizer = load_checkpoint(checkpoint)
    if random:
        tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, eval_tokens + 1).astype(np.int64)
        return EvalText(tokens=tokens, char_table=np.ones(model.cfg.vocab_size, np.int64), source="random tokens",
                        capped=False, window=window)
    documents, source = read_eval_documents(data) if data else validation_documents(checkpoint)
    return prepare_eval_text(documents, source, tokenizer, model.cfg.vocab_size, window, eval_tokens)


def build_packages(checkpoint: Path, work: Path, weights: list[str], caches: list[str], text) -> dict[str, Path]:
    """{"<weights> weights, <cache> cache": package directory}, each as `edgegpt export` would write it."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.core.formats import MODEL
    from edgegpt.export.cache_precision import build_int8_cache_graph
    from edgegpt.export.package import build_graph, optimize_offline
    from edgegpt.export.quantize import quantize_graph
    from edgegpt.export.writer import write_package_metadata

    model, tokenizer = load_checkpoint(checkpoint)
    packages: dict[str, Path] = {}
    for cache in caches:
        float_dir = work / f"float-{cache}"
        float_dir.mkdir(parents=True)
        if CACHES[cache] is None:
            contract = build_graph(model, float_dir / MODEL, True, "float32")
        else:
            contract, _ = build_int8_cache_graph(model, text, float_dir / MODEL, CACHES[cache])
        # Quantized first: they start from the float graph as built, which the fp32 package then optimizes in
        # place (export quantizes the unoptimized graph too).
        for weight in sorted(weights, key=lambda w: WEIGHTS[w] is None):
            directory = float_dir
            if WEIGHTS[weight] is not None:
                directory = work / f"{weight}-{cache}"
                directory.mkdir()
                quantize_graph(float_dir / MODEL, directory / MODEL, WEIGHTS[weight], None)
            optimize_offline(directory / MODEL)  # what export ships: the graph onnxruntime optimized
            write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract)
            packages[f"{weight} weights, {cache} cache"] = directory
            print(f"built {weight} weights, {cache} cache: {(directory / MODEL).stat().st_size / 1e6:.1f} MB",
                  file=sys.stderr)
    return {f"{w} weights, {c} cache": packages[f"{w} weights, {c} cache"] for w in weights for c in caches}


# -- measuring ------------------------------------------------------------------------------------------


def buffer_bytes_per_token(generator: Generator) -> int:
    """Bytes per token from the buffers themselves (a cache of 64 positions), checked against the package."""
    cache = generator.empty_cache(capacity=64)
    measured = sum(a.nbytes for a in cache.step.arrays.values()) // cache.capacity
    assert measured == generator.package.cache_bytes_per_token, (measured, generator.package.cache_bytes_per_token)
    return measured


def decode_speed(generator: Generator, prompt: list[int], position: int, steps: int) -> float:
    """Decode tokens/s over `steps` greedy steps after a prefill of `position` tokens (no growth inside)."""
    logits, cache = generator.forward(prompt[:position], generator.empty_cache(capacity=position + steps + 1))
    token = int(np.argmax(logits[-1]))
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = generator.decode_step(token, cache)
        token = int(np.argmax(logits))
    return steps / (time.perf_counter() - start)


def measure_speed(packages: dict[str, Path], threads: int, runs: int, prompt: list[int], positions: list[int],
                  steps: int) -> dict[str, dict]:
    generators = {name: Generator.load(path, provider="cpu", threads=threads) for name, path in packages.items()}
    for generator in generators.values():  # warm-up: first runs pay for allocation and page faults
        decode_speed(generator, prompt, positions[0], 8)
    samples: dict[str, dict[int, list[float]]] = {name: defaultdict(list) for name in generators}
    for _ in range(runs):  # interleaved, so a noisy moment hits every package alike
        for position in positions:
            for name, generator in generators.items():
                samples[name][position].append(decode_speed(generator, prompt, position, steps))
    return {name: {"bytes_per_token": buffer_bytes_per_token(generators[name]),
                   "fp32_bytes_per_token": 2 * 4 * (lambda c: c.n_layers * c.n_kv_heads * c.head_dim)(
                       generators[name].config),
                   "decode_tokens_per_s": {p: statistics.median(s) for p, s in by_position.items()},
                   "decode_runs": {p: [round(x, 1) for x in s] for p, s in by_position.items()}}
            for name, by_position in samples.items()}


def measure_quality(checkpoint: Path, packages: dict[str, Path], text) -> dict[str, dict]:
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import PackageScorer, evaluate
    from edgegpt.reference import TorchReference

    model, _ = load_checkpoint(checkpoint)
    reference = evaluate("PyTorch float32", TorchReference(model), text)
    results = {"PyTorch float32": reference.to_dict()}
    for name, path in packages.items():
        metrics = evaluate(name, PackageScorer(Generator.load(path, provider="cpu", max_length=text.window)), text,
                           reference.predictions)
        results[name] = metrics.to_dict()
        print(f"scored {name}: perplexity {metrics.perplexity:.3f} in {metrics.seconds:.0f} s", file=sys.stderr)
    return results


def profile_step(package: Path, threads: int, prompt: list[int], position: int, warmup: int, steps: int) -> dict:
    """µs per decode step by operator type at `position`, from onnxruntime's profiler (module doc)."""
    import onnxruntime as ort

    from edgegpt.runtime.session import session_options

    loaded = ModelPackage.load(package)
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="edgegpt-profile-")) / "decode")
    session = ort.InferenceSession(str(loaded.model_path), options, providers=["CPUExecutionProvider"])
    generator = Generator(loaded, session, "cpu")
    logits, cache = generator.forward(prompt[:position], generator.empty_cache(capacity=position + warmup + steps + 1))
    token = int(np.argmax(logits[-1]))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        logits, cache = generator.decode_step(token, cache)
        token = int(np.argmax(logits))
    step_us = (time.perf_counter() - start) * 1e6 / steps
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if any(run["ts"] <= event["ts"] <= run["ts"] + run["dur"] for run in runs):
            by_op[event["args"].get("op_name", "?")] += event["dur"] / steps
    wall = sum(run["dur"] for run in runs) / steps
    return {"ops_us": dict(by_op), "run_us": wall, "outside_kernels_us": wall - sum(by_op.values()),
            "step_us": step_us}


# -- reporting --------------------------------------------------------------------------------------------


def speed_table(speed: dict, quality: dict, positions: list[int], caption: str) -> Table:
    table = Table(title="KV-cache precision", caption=caption)
    columns = ["package", "cache bytes/token", "× fp32 cache"]
    columns += [f"decode tok/s @{p}" for p in positions] + [f"@{p} ÷ @{positions[0]}" for p in positions[1:]]
    columns += ["perplexity", "Δ vs PyTorch", "Δ vs fp32 cache", "top-1 agree"] if quality else []
    for column in columns:
        table.add_column(column, justify="left" if column == "package" else "right")
    for name, s in speed.items():
        fp32_cache = name.rsplit(",", 1)[0] + ", fp32 cache"
        tps = s["decode_tokens_per_s"]
        row = [name, f"{s['bytes_per_token']:,}", f"{s['bytes_per_token'] / s['fp32_bytes_per_token']:.2f}"]
        row += [f"{tps[p]:.0f}" for p in positions] + [f"{tps[p] / tps[positions[0]]:.2f}" for p in positions[1:]]
        if quality:
            q, ref, same = quality[name], quality["PyTorch float32"], quality.get(fp32_cache)
            row += [f"{q['perplexity']:.3f}", f"{q['perplexity'] / ref['perplexity'] - 1:+.2%}",
                    f"{q['perplexity'] / same['perplexity'] - 1:+.2%}" if same else "—",
                    f"{q['top1_agreement']:.1%}" if q.get("top1_agreement") is not None else "—"]
        table.add_row(*row)
    return table


def profile_table(name: str, profiles: dict[int, dict], positions: list[int]) -> Table:
    table = Table(title=f"one decode step by operator type: {name}")
    table.add_column("op type")
    for p in positions:
        table.add_column(f"µs @{p}", justify="right")
        table.add_column("share", justify="right")
    if len(positions) > 1:
        table.add_column(f"+µs @{positions[-1]} − @{positions[0]}", justify="right")
    ops = sorted({op for prof in profiles.values() for op in prof["ops_us"]},
                 key=lambda op: -profiles[positions[-1]]["ops_us"].get(op, 0.0))
    rows = [(op, {p: profiles[p]["ops_us"].get(op, 0.0) for p in positions}) for op in ops]
    rows.append(("(outside kernels)", {p: profiles[p]["outside_kernels_us"] for p in positions}))
    rows.append(("run (wall)", {p: profiles[p]["run_us"] for p in positions}))
    rows.append(("decode_step (Python)", {p: profiles[p]["step_us"] for p in positions}))
    for op, us in rows:
        cells = []
        for p in positions:
            cells += [f"{us[p]:,.0f}", f"{us[p] / profiles[p]['run_us']:.0%}"]
        if len(positions) > 1:
            cells.append(f"{us[positions[-1]] - us[positions[0]]:+,.0f}")
        table.add_row(op, *cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint (quality needs one, and held-out text)")
    source.add_argument("--preset", help="random weights of this preset (size and speed only)")
    source.add_argument("--package", type=Path, help="an exported package: measure its own cache only")
    parser.add_argument("--data", type=Path, default=None, help="held-out text (default: the validation split)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored and calibrated on")
    parser.add_argument("--window", type=int, default=1024, help="scoring window, at most the model's context")
    parser.add_argument("--weights", default="fp32,int8", help=f"weight formats, from {', '.join(WEIGHTS)}")
    parser.add_argument("--caches", default="fp32,int8", help=f"cache precisions, from {', '.join(CACHES)}")
    parser.add_argument("--positions", default="64,900", help="decode positions to time (tokens prefilled)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed (or profiled) per position")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing runs (median)")
    parser.add_argument("--profile", action="store_true", help="per-operator breakdown instead of the speed table")
    parser.add_argument("--warmup", type=int, default=8, help="--profile: decode steps before the recorded ones")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    weights, caches = args.weights.split(","), args.caches.split(",")
    positions = [int(p) for p in args.positions.split(",")]
    for name, chosen, known in (("--weights", weights, WEIGHTS), ("--caches", caches, CACHES)):
        if any(c not in known for c in chosen):
            parser.error(f"{name} takes {', '.join(known)}")

    work = Path(tempfile.mkdtemp(prefix="edgegpt-kv-cache-"))
    text = None
    if args.package:
        packages = {str(args.package): args.package}
        checkpoint = None
    else:
        checkpoint = args.checkpoint or random_checkpoint(args.preset, work / "checkpoint")
        from edgegpt.core.config import ModelConfig

        context = ModelConfig.load(checkpoint / "config.json").max_len
        text = calibration_text(checkpoint, args.data, args.eval_tokens, min(args.window, context),
                                random=args.preset is not None)
        packages = build_packages(checkpoint, work / "packages", weights, caches, text)
    first = Generator.load(next(iter(packages.values())), provider="cpu")
    longest = max(positions) + args.warmup + args.steps + 1
    if longest > first.max_length:
        parser.error(f"--positions up to {max(positions)} need a context of {longest}; "
                     f"the model has {first.max_length}")
    rng = np.random.default_rng(0)
    prompt = (text.tokens[:longest].tolist() if text is not None and len(text.tokens) >= longest and not args.preset
              else rng.integers(0, first.config.vocab_size, longest).tolist())
    figures: dict = {"machine": machine(), "threads": args.threads, "positions": positions, "steps": args.steps,
                     "source": str(args.package or args.checkpoint or f"random {args.preset}")}
    console = Console(width=max(Console().width, 150))  # a log file would wrap the tables at 80 columns
    if args.profile:
        figures["profiles"] = {}
        for name, path in packages.items():
            profiles = {p: profile_step(path, args.threads, prompt, p, args.warmup, args.steps) for p in positions}
            figures["profiles"][name] = profiles
            console.print(profile_table(name, profiles, positions))
        console.print(f"{machine()}, {args.threads} threads, batch 1, mean of {args.steps} decode steps after "
                      f"{args.warmup} warm-up steps; kernel times from onnxruntime's profiler (it adds a little "
                      "per node)")
    else:
        speed = measure_speed(packages, args.threads, args.runs, prompt, positions, args.steps)
        quality = {}
        if checkpoint is not None and args.preset is None:
            quality = measure_quality(checkpoint, packages, text)
        caption = (f"{machine()}, {args.threads} threads, batch 1, {args.steps} greedy decode steps after a prefill "
                   f"to each position, median of {args.runs} interleaved runs"
                   + (f"; quality: {text.tokens.size - 1:,} tokens of {text.source}, windows of {text.window}"
                      if quality else "; no quality figures (random weights or a package alone)"))
        console.print(speed_table(speed, quality, positions, caption))
        figures.update(speed=speed, quality=quality)
    if args.json:
        print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
