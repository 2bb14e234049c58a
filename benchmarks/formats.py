"""Weight and cache formats side by side: what each quantization and KV-cache precision costs in size, quality
and speed, what onnxruntime's MatMulNBits kernels cost by format, and whether a pass of K tokens computes the
logits a one-token pass does.

    python benchmarks/formats.py quantization --checkpoint DIR [--data TEXT] [--eval-tokens 16384] [--json]
    python benchmarks/formats.py quantization --preset small          # random weights: size and speed only
    python benchmarks/formats.py kv-cache --checkpoint DIR --data TEXT [--weights fp32,int8] [--profile]
    python benchmarks/formats.py kernels [--threads 2] [--layers 30] [--runs 30]
    python benchmarks/formats.py pass-numerics --model PACKAGE --text pydoc-topics.txt [--k 4]
    python benchmarks/formats.py export-memory [--dim 1024 --layers 4 --vocab 32000] [--external-data-threshold B]
    python benchmarks/formats.py convert-memory [--gguf FILE | --hf DIR | --dim 1024 --layers 16 --vocab 49152]
    python benchmarks/formats.py scale [--keep] [--json]     # Llama 3.2 1B's shape, random: convert, export, generate
    python benchmarks/formats.py COMMAND --smoke        # seconds, on a tiny random model

Packages are made by the exporter's own steps and run through the runtime's Generator, as an app would.
Figures, with the commands that gave them: docs/benchmarks.md.
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

from common import machine, random_checkpoint, scratch_dir, smoke_kit, subcommands

# --smoke: positions and steps a tiny model's 256-token context holds, in a moment
SMOKE_POSITIONS = "16,64"
SMOKE_STEPS = 8


# -- shared: held-out text, speed ---------------------------------------------------------------------------------


def eval_text(checkpoint: Path, data: Path | None, eval_tokens: int, window: int, random: bool):
    """The held-out text (EvalText) an int8 cache is calibrated on and quality is scored on: `data`, or the
    checkpoint's validation split; random tokens for random weights (their quality means nothing)."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import EvalText, prepare_eval_text, read_eval_documents, validation_documents

    model, tokenizer = load_checkpoint(checkpoint)
    if random:
        tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, eval_tokens + 1).astype(np.int64)
        return EvalText(tokens=tokens, char_table=np.ones(model.cfg.vocab_size, np.int64), source="random tokens",
                        capped=False, window=window)
    documents, source = read_eval_documents(data, checkpoint) if data else validation_documents(checkpoint)
    return prepare_eval_text(documents, source, tokenizer, model.cfg.vocab_size, window, eval_tokens)


def buffer_bytes_per_token(generator) -> int:
    """Bytes per token from the buffers themselves (a cache of 64 positions), checked against the package."""
    cache = generator.empty_cache(capacity=64)
    measured = sum(a.nbytes for a in cache.step.arrays.values()) // cache.capacity
    assert measured == generator.package.cache_bytes_per_token, (measured, generator.package.cache_bytes_per_token)
    return measured


def decode_speed(generator, prompt: list[int], position: int, steps: int) -> float:
    """Decode tokens/s over `steps` greedy steps after a prefill of `position` tokens (no growth inside)."""
    logits, cache = generator.forward(prompt[:position], generator.empty_cache(capacity=position + steps + 1))
    token = int(np.argmax(logits[-1]))
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = generator.decode_step(token, cache)
        token = int(np.argmax(logits))
    return steps / (time.perf_counter() - start)


def prefill_ms(generator, prompt: list[int]) -> float:
    start = time.perf_counter()
    generator.forward(prompt, generator.empty_cache(capacity=len(prompt) + 1))
    return 1000 * (time.perf_counter() - start)


def measure_speed(packages: dict[str, Path], threads: int, runs: int, prompt: list[int], positions: list[int],
                  steps: int, prefill_tokens: int | None = None) -> dict[str, dict]:
    """Per package: decode tokens/s at each position (median of `runs`), its runs, cache bytes per token and,
    with `prefill_tokens`, the prefill's milliseconds. Runs interleave the packages, so a noisy moment hits
    every package alike."""
    from edgegpt.runtime import Generator

    generators = {name: Generator.load(path, provider="cpu", threads=threads) for name, path in packages.items()}
    for generator in generators.values():  # warm-up: first runs pay for allocation and page faults
        decode_speed(generator, prompt, positions[0], 8)
    samples: dict[str, dict[int, list[float]]] = {name: defaultdict(list) for name in generators}
    prefills: dict[str, list[float]] = {name: [] for name in generators}
    for _ in range(runs):
        for position in positions:
            for name, generator in generators.items():
                samples[name][position].append(decode_speed(generator, prompt, position, steps))
        for name, generator in generators.items():
            if prefill_tokens:
                prefills[name].append(prefill_ms(generator, prompt[:prefill_tokens]))
    figures = {}
    for name, by_position in samples.items():
        cfg = generators[name].config
        figures[name] = {
            "cache_bytes_per_token": buffer_bytes_per_token(generators[name]),
            "fp32_cache_bytes_per_token": 2 * 4 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim,
            "decode_tokens_per_s": {p: statistics.median(s) for p, s in by_position.items()},
            "decode_runs": {p: [round(x, 1) for x in s] for p, s in by_position.items()},
            "prefill_ms": statistics.median(prefills[name]) if prefills[name] else None,
        }
    return figures


# -- quantization -------------------------------------------------------------------------------------------------


def quant_options(**choices):
    from edgegpt.export.quantize import QuantOptions

    return QuantOptions(**choices)


# name -> weights (None: float32; "auto": --quantize auto at AUTO_BUDGET; else QuantOptions' arguments), KV cache
FORMATS = {
    "fp32": (None, "fp32"),
    "fp32 + int8 cache": (None, "int8"),
    "int8 rtn sym (before)": ({"bits": 8, "rounding": "rtn", "symmetric": True}, "fp32"),
    "int8 (default)": ({"bits": 8}, "fp32"),
    "int8 + int8 cache": ({"bits": 8}, "int8"),
    "int8 dynamic": ({"bits": 8, "method": "dynamic"}, "fp32"),
    "int4 rtn sym (before)": ({"bits": 4, "rounding": "rtn", "symmetric": True}, "fp32"),
    "int4 search": ({"bits": 4, "rounding": "search"}, "fp32"),
    "int4 (default: gptq)": ({"bits": 4}, "fp32"),
    "int4 gptq blocks of 64": ({"bits": 4, "block_size": 64}, "fp32"),
    "int4 gptq accuracy_level 1": ({"bits": 4, "accuracy_level": 1}, "fp32"),
    "auto 1%": ("auto", "fp32"),
}
AUTO_BUDGET = 0.01
# --smoke: one format of each kind of build (GPTQ, seconds even on a tiny model, is left to `auto`'s search)
SMOKE_FORMATS = ("fp32", "fp32 + int8 cache", "int8 (default)", "int4 rtn sym (before)", "auto 1%")
DECODE_STEPS = 64


def perturb(checkpoint: Path, out: Path, strength: float) -> Path:
    """The checkpoint with every projection moved by uniform noise of ±strength/2 steps of a 4-bit block."""
    import torch

    from edgegpt.checkpoint import load_checkpoint, save_checkpoint

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


def build_format_packages(checkpoint: Path, work: Path, names: list[str], text, calibration) -> dict[str, Path]:
    """{format name: package directory}, each built by the exporter's own steps."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.core.formats import MODEL
    from edgegpt.export.cache_precision import build_int8_cache_graph
    from edgegpt.export.package import build_graph, optimize_offline
    from edgegpt.export.quantize_package import SEARCH_TOKENS, quantize_auto, quantize_fixed
    from edgegpt.export.writer import write_package_metadata

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
                quantize_auto(model, source, directory, quant_options(bits=4).resolved(), calibration,
                              text.tokens[: SEARCH_TOKENS + 1], text.char_table, text.window, AUTO_BUDGET, finish,
                              quiet)
            else:
                quantize_fixed(model, source, directory, quant_options(**weights).resolved(), calibration, quiet)
        finish(directory)
        packages[name] = directory
        print(f"built {name}: {(directory / MODEL).stat().st_size / 1e6:.1f} MB in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return packages


def measure_format_quality(packages: dict[str, Path], text) -> dict[str, dict]:
    """Each package scored on the held-out text against the first (the float32 package)."""
    from edgegpt.quality import PackageScorer, evaluate
    from edgegpt.runtime import Generator

    results, reference = {}, None
    for name, path in packages.items():
        metrics = evaluate(name, PackageScorer(Generator.load(path, provider="cpu", max_length=text.window)), text,
                           reference)
        reference = reference or metrics.predictions
        results[name] = metrics.to_dict()
        print(f"scored {name}: perplexity {metrics.perplexity:.3f} in {metrics.seconds:.0f} s", file=sys.stderr)
    return results


def quantization_options(parser: argparse.ArgumentParser) -> None:
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


def quantization(args: argparse.Namespace) -> None:
    """Every weight format and KV-cache precision from one checkpoint, side by side: size, quality, speed.

    Every package is made by the exporter's own steps (build_graph, the int8-cache graph, quantize_fixed /
    quantize_auto with calibration text, the offline optimization, the package writer) and run through the
    runtime's Generator, as an app would: batch 1, `--threads` intra-op threads, greedy.

        quality   perplexity on held-out text (windows of min(context, 1,024), stride half), and top-1 and greedy
                  agreement, each package against the float32 package (which matches PyTorch within 1e-4)
        decode    tokens/s over 64 steps after a prefill to each of --positions (64 and 900; clipped to the
                  context), median of --runs interleaved passes (on a shared 2-core machine the same run moves
                  a lot between passes, docs/benchmarks.md "Noise": quote ratios, not small differences)
        prefill   ms for a 512-token prompt (or the context's half)
        cache     KV-cache bytes per token, from the runtime's own buffers

    --perturb S adds uniform noise of ±S/2 quantization steps of a 4-bit asymmetric block of 32 to every
    projection (then the perturbed float32 model is the reference): SmolLM2's published weights come from a
    Q4_1 file, whose grid a 4-bit format can nearly reproduce; perturbed weights show what holds on weights
    that were never 4-bit.

    --smoke: the smoke kit's checkpoint, held-out text and calibration text, one format of each kind (unless
    --formats), 256 tokens scored in windows of 64, one timing pass of 8 steps at positions 16 and 64."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.core.formats import MODEL
    from edgegpt.export.quantize_package import calibration_text

    steps, window_cap = DECODE_STEPS, 1024
    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("formats"))
        if not args.preset:
            args.checkpoint, args.data = args.checkpoint or kit.checkpoint, args.data or kit.text
        args.calibration_data = args.calibration_data or kit.calibration
        args.eval_tokens, args.positions, args.runs, steps, window_cap = 256, SMOKE_POSITIONS, 1, SMOKE_STEPS, 64
        if args.formats == ",".join(FORMATS):  # one format of each kind of build: seconds, not a minute
            args.formats = ",".join(SMOKE_FORMATS)
    if not args.checkpoint and not args.preset:
        raise SystemExit("pass --checkpoint DIR (or --preset NAME for random weights)")
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    if unknown := [n for n in names if n not in FORMATS]:
        raise SystemExit(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    work = Path(tempfile.mkdtemp(prefix="edgegpt-quantization-"))
    checkpoint = args.checkpoint or random_checkpoint(args.preset, work / "checkpoint")
    if args.perturb:
        checkpoint = perturb(checkpoint, work / "perturbed", args.perturb)
    model, tokenizer = load_checkpoint(checkpoint)
    window = min(model.cfg.max_len, window_cap)
    text = eval_text(checkpoint, args.data, args.eval_tokens, window, random=not args.checkpoint)
    calibration = calibration_text(checkpoint, args.calibration_data, tokenizer)
    packages = build_format_packages(checkpoint, work / "packages", names, text, calibration)
    quality = measure_format_quality(packages, text) if args.checkpoint else {}
    positions = sorted({min(int(p), model.cfg.max_len - steps - 2) for p in args.positions.split(",")})
    prompt = np.resize(text.tokens, max(positions) + steps + 1).tolist()
    prefill_tokens = min(512, model.cfg.max_len // 2)
    speed = measure_speed(packages, args.threads, args.runs, prompt, positions, steps, prefill_tokens)

    sizes = {name: (path / MODEL).stat().st_size for name, path in packages.items()}
    base = names[0]
    title = f"weights × KV cache of {args.checkpoint or args.preset}"
    title += f", perturbed {args.perturb}" if args.perturb else ""
    caption = (f"{machine()}, {args.threads} threads, batch 1, greedy; decode: median of {args.runs} interleaved "
               f"passes of {steps} steps; prefill: {prefill_tokens} tokens"
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


# -- kv-cache -------------------------------------------------------------------------------------------------------

CACHES = {"fp32": None, "int8": "PER_CHANNEL", "int8-tensor": "PER_TENSOR"}  # name -> int8 quant type
WEIGHTS = {"fp32": None, "int8": 8, "int4": 4}  # name -> bits (MatMulNBits, the exporter's default method)


def build_cache_packages(checkpoint: Path, work: Path, weights: list[str], caches: list[str], text) -> dict[str, Path]:
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


def measure_cache_quality(checkpoint: Path, packages: dict[str, Path], text) -> dict[str, dict]:
    """PyTorch float32 and each package scored on the held-out text, against PyTorch."""
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import PackageScorer, evaluate
    from edgegpt.reference import TorchReference
    from edgegpt.runtime import Generator

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

    from edgegpt.runtime import Generator, ModelPackage
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


# -- kv-cache: reporting


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
        share = s["cache_bytes_per_token"] / s["fp32_cache_bytes_per_token"]
        row = [name, f"{s['cache_bytes_per_token']:,}", f"{share:.2f}"]
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


def kv_cache_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
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


def kv_cache(args: argparse.Namespace) -> None:
    """KV-cache precision side by side (`edgegpt export --kv-cache`): memory per token, decode speed at a
    short and a long position, quality; and, with --profile, where one decode step's time goes.

    Packages are made by the exporter's own steps (build_graph or build_int8_cache_graph, quantize_graph,
    optimize_offline, the package writer): for each weight format in --weights, one package per cache in
    --caches (fp32; int8 = PER_CHANNEL, the exporter's default; int8-tensor = PER_TENSOR, for comparison).
    An int8 cache is calibrated as the exporter does, on the held-out text (random weights: on random tokens).
    fp16 is not among them: a float16 cache is CUDA's (`--precision fp16`; `runtimes.py cuda`), and
    the CPU runtime refuses it.

    Speed: batch 1, `--threads` intra-op threads, through the runtime's Generator as an app runs it. For each
    position P in --positions: prefill P tokens into a cache allocated with room for the whole run (no growth
    inside the timing), then time --steps greedy decode steps; runs are interleaved over the packages and the
    median is reported, with each position's tokens/s as a ratio to the first position's ("flatness"). On a
    shared 2-core machine the same run moves a lot between passes (docs/benchmarks.md, "Noise"): quote ratios
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

    --smoke: the smoke kit's checkpoint and held-out text (256 tokens, windows of 64), int8 weights with each
    cache, positions 16 and 64, 8 steps, one run."""
    from edgegpt.runtime import Generator

    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("formats"))
        if not (args.preset or args.package):
            args.checkpoint, args.data = args.checkpoint or kit.checkpoint, args.data or kit.text
        args.eval_tokens, args.window, args.positions = 256, 64, SMOKE_POSITIONS
        args.steps, args.warmup, args.runs = SMOKE_STEPS, 2, 1
        args.weights = "int8"
    if not (args.checkpoint or args.preset or args.package):
        raise SystemExit("pass one of --checkpoint DIR, --preset NAME or --package DIR")
    weights, caches = args.weights.split(","), args.caches.split(",")
    positions = [int(p) for p in args.positions.split(",")]
    for name, chosen, known in (("--weights", weights, WEIGHTS), ("--caches", caches, CACHES)):
        if any(c not in known for c in chosen):
            raise SystemExit(f"{name} takes {', '.join(known)}")

    work = Path(tempfile.mkdtemp(prefix="edgegpt-kv-cache-"))
    text = None
    if args.package:
        packages = {str(args.package): args.package}
        checkpoint = None
    else:
        checkpoint = args.checkpoint or random_checkpoint(args.preset, work / "checkpoint")
        from edgegpt.core.config import ModelConfig

        context = ModelConfig.load(checkpoint / "config.json").max_len
        text = eval_text(checkpoint, args.data, args.eval_tokens, min(args.window, context),
                         random=args.preset is not None)
        packages = build_cache_packages(checkpoint, work / "packages", weights, caches, text)
    first = Generator.load(next(iter(packages.values())), provider="cpu")
    longest = max(positions) + args.warmup + args.steps + 1
    if longest > first.max_length:
        raise SystemExit(f"--positions up to {max(positions)} need a context of {longest}; "
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
            quality = measure_cache_quality(checkpoint, packages, text)
        caption = (f"{machine()}, {args.threads} threads, batch 1, {args.steps} greedy decode steps after a prefill "
                   f"to each position, median of {args.runs} interleaved runs"
                   + (f"; quality: {text.tokens.size - 1:,} tokens of {text.source}, windows of {text.window}"
                      if quality else "; no quality figures (random weights or a package alone)"))
        console.print(speed_table(speed, quality, positions, caption))
        figures.update(speed=speed, quality=quality)
    if args.json:
        print(json.dumps(figures, default=str))


# -- kernels --------------------------------------------------------------------------------------------------------

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
# bits, accuracy_level, zero points (None, "uint8" packed integers, "float32"), block size
CASES = [(8, 4, None, 32), (8, 4, "uint8", 32), (8, 0, None, 32), (4, 4, None, 32), (4, 4, "uint8", 32),
         (4, 0, "uint8", 32), (4, 4, "float32", 32), (4, 4, "uint8", 64), (4, 4, "uint8", 128)]


def build_projections(bits: int, accuracy_level: int, zero_points: str | None, block: int, layers: int) -> bytes:
    """The graph of `layers` layers' projections as MatMulNBits nodes over random codes (serialized)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for layer in range(layers):
        for j, (k, n) in enumerate(SHAPES):
            blocks = -(-k // block)
            name = f"l{layer}.{j}"
            weights.append(numpy_helper.from_array(
                rng.integers(0, 256, (n, blocks, block * bits // 8)).astype(np.uint8), f"{name}.codes"))
            weights.append(numpy_helper.from_array((rng.random((n, blocks)) * 0.01).astype(np.float32),
                                                   f"{name}.scales"))
            inputs = ["x" if k == 576 else "x_wide", f"{name}.codes", f"{name}.scales"]
            if zero_points == "uint8":
                packed = rng.integers(0, 256, (n, -(-blocks * bits // 8))).astype(np.uint8)
                weights.append(numpy_helper.from_array(packed, f"{name}.zero_points"))
                inputs.append(f"{name}.zero_points")
            elif zero_points == "float32":
                weights.append(numpy_helper.from_array((rng.random((n, blocks)) * 15).astype(np.float32),
                                                       f"{name}.zero_points"))
                inputs.append(f"{name}.zero_points")
            level = {"accuracy_level": accuracy_level} if accuracy_level else {}
            nodes.append(helper.make_node("MatMulNBits", inputs, [name], domain="com.microsoft", K=k, N=n,
                                          bits=bits, block_size=block, **level))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "projections", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 576]),
        helper.make_tensor_value_info("x_wide", TensorProto.FLOAT, ["m", 1536])], outputs, weights)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def time_runs(model: bytes, threads: int, m: int, runs: int) -> float:
    """Median milliseconds of one run of the graph on `m` tokens."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((m, 576)).astype(np.float32),
            "x_wide": rng.standard_normal((m, 1536)).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def kernels_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=30)


def kernels(args: argparse.Namespace) -> None:
    """onnxruntime's MatMulNBits CPU kernels by format: what each bits / accuracy_level / zero-point choice costs.

    One graph holds the projections of `--layers` transformer layers of SmolLM2-135M's shapes (q, o: 576 → 576;
    k, v: 576 → 192; gate, up: 576 → 1,536; down: 1,536 → 576), each a MatMulNBits node over random codes, all
    fed the same input; a run is one token (M = 1, a decode step's matrix work) or 16 (a short prefill).
    Median milliseconds per run. The quantizer's choices (export/quantize.py, export/blockquant.py) rest on
    this table: which combinations have a fast kernel on this CPU and which fall back to dequantizing the
    weights on every call.

    --smoke: one layer, 3 runs."""
    import onnxruntime as ort

    if args.smoke:
        args.layers, args.runs = 1, 3
    title = f"MatMulNBits, {args.layers} layers of SmolLM2-135M's projections, onnxruntime {ort.__version__}"
    table = Table(title=title,
                  caption=f"{machine()}, {args.threads} threads, median of {args.runs} runs")
    for column in ("bits", "accuracy_level", "zero points", "block", "ms, 1 token", "ms, 16 tokens"):
        table.add_column(column, justify="right")
    for bits, level, zero_points, block in CASES:
        model = build_projections(bits, level, zero_points, block, args.layers)
        one, sixteen = (time_runs(model, args.threads, m, args.runs if m == 1 else max(args.runs // 3, 1))
                        for m in (1, 16))
        table.add_row(str(bits), str(level), zero_points or "none (symmetric)", str(block), f"{one:.2f}",
                      f"{sixteen:.2f}")
    Console(width=max(Console().width, 120)).print(table)


# -- pass-numerics --------------------------------------------------------------------------------------------------


def pass_numerics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="a model package")
    parser.add_argument("--text", type=Path, help="text to run (e.g. the pydoc topics)")
    parser.add_argument("--k", type=int, default=4)


def pass_numerics(args: argparse.Namespace) -> None:
    """Does a pass of K tokens give the logits a one-token pass gives? Speculative decoding verifies K guesses
    in one pass, so its greedy text equals plain decoding's only where they agree (runtime/speculative.py).

    At every 10th position of the text's first 300 tokens: the cache holds the text before it, then the
    position's token is run alone, and again as the first of K tokens; prints the median and largest
    |Δ logit| between the two, and how often their argmax differs.

    --smoke: the smoke kit's int8 package and text."""
    from edgegpt.runtime import Generator

    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("formats"))
        args.model, args.text = args.model or kit.package, args.text or kit.text
    if args.model is None or args.text is None:
        raise SystemExit("give --model PACKAGE and --text FILE (or --smoke)")
    generator = Generator.load(args.model, provider="cpu", draft=None)
    ids = generator.package.tokenizer.encode(args.text.read_text(encoding="utf-8")[:20_000]).ids
    ids = ids[:min(300, generator.max_length)]
    differences, flips = [], 0
    for position in range(40, len(ids) - args.k, 10):
        _, cache = generator.forward(ids[:position], generator.empty_cache())
        alone, _ = generator.forward([ids[position]], cache)
        _, cache = generator.forward(ids[:position], generator.empty_cache())
        first_of_k, _ = generator.forward(ids[position : position + args.k], cache)
        differences.append(float(np.abs(alone[0] - first_of_k[0]).max()))
        flips += int(np.argmax(alone[0]) != np.argmax(first_of_k[0]))
    print(f"{machine()}; {args.model}; 1-token vs {args.k}-token pass at {len(differences)} positions: "
          f"|Δ logit| median {np.median(differences):.3g}, largest {max(differences):.3g}; argmax differs at {flips}")


# -- export-memory: peak RSS of `export --quantize` against the model's float32 bytes ------------------------------

EXPORT_MEMORY_CHILD = """
import json, resource, sys, time
from pathlib import Path
from edgegpt.export.gates import GateFailed
from edgegpt.export.package import export_package
import edgegpt.export.quantize, edgegpt.export.fused, edgegpt.runtime  # imports count in the baseline
checkpoint, out, data, threshold = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start, gated = time.perf_counter(), True
kwargs = {} if threshold == "default" else {"external_data_threshold": int(threshold)}
try:
    export_package(Path(checkpoint), Path(out), quantize=True, eval_data=Path(data), eval_tokens=512, **kwargs)
except GateFailed:
    gated = False  # random weights: the gate's verdict means nothing, the memory it took still counts
print(json.dumps({"baseline_rss": baseline, "seconds": time.perf_counter() - start, "gate_passed": gated,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# Builds the random checkpoint in a process of its own: a process's peak RSS counts from its parent's at fork,
# so the process that forks the export must not have held the model.
CHECKPOINT_CHILD = """
import json, sys
from pathlib import Path
import torch
from edgegpt.checkpoint import save_checkpoint
from edgegpt.core.config import ModelConfig
from edgegpt.model import GPT
from edgegpt.tokenizer import train_tokenizer
directory, fields, text = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = GPT(ModelConfig(**fields)).eval()
save_checkpoint(directory, model, train_tokenizer([text], 300))
print(json.dumps({"weight_bytes": sum(p.numel() * 4 for p in model.parameters()),  # the tied head counted once
                  "config": model.cfg.to_dict()}))
"""


def export_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--external-data-threshold", type=int, default=None,
                        help="bytes of weights above which the graphs keep them in model.onnx.data "
                             "(default: the exporter's own)")
    parser.add_argument("--json", action="store_true")


def export_memory(args: argparse.Namespace) -> None:
    """Peak resident memory of `export --quantize` (int8, gated) on a random model, against its float32 bytes.

    The export runs in a child process of its own (and the random checkpoint is made in another), so its peak
    RSS (the child's own ru_maxrss) is the export's alone: imports included, reported separately as the peak
    RSS right after importing the exporter. The issue's bound is peak RSS <= 3x the model's float32 weight bytes.
    """
    import subprocess

    from common import BENCHMARK_TEXT

    if args.smoke:
        args.dim, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab = 128, 2, 4, 2, 384, 512
    work = scratch_dir("export-memory")
    fields = dict(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                  n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_len=256)
    made = subprocess.run([sys.executable, "-c", CHECKPOINT_CHILD, str(work / "checkpoint"), json.dumps(fields),
                           BENCHMARK_TEXT], capture_output=True, text=True)
    if made.returncode != 0:
        sys.exit(f"making the checkpoint failed:\n{made.stderr[-4000:]}")
    made = json.loads(made.stdout.strip().splitlines()[-1])
    weight_bytes, config = made["weight_bytes"], made["config"]
    text = work / "held-out.txt"
    text.write_text(BENCHMARK_TEXT * 4, encoding="utf-8")
    threshold = "default" if args.external_data_threshold is None else str(args.external_data_threshold)
    done = subprocess.run([sys.executable, "-c", EXPORT_MEMORY_CHILD, str(work / "checkpoint"), str(work / "model"),
                           str(text), threshold], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"export failed:\n{done.stderr[-4000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    peak = child["peak_rss"]
    package = work / "model"
    # A failed gate (random weights) writes no package; the memory the export took still counts.
    files = {p.name: p.stat().st_size for p in sorted(package.iterdir()) if p.is_file()} if package.is_dir() else {}
    if args.smoke:
        import shutil

        shutil.rmtree(work)
    result = {
        "machine": machine(), "config": config, "float32_weight_bytes": weight_bytes,
        "peak_rss_bytes": peak, "baseline_rss_bytes": child["baseline_rss"],
        "peak_over_weights": peak / weight_bytes,
        "peak_above_baseline_over_weights": (peak - child["baseline_rss"]) / weight_bytes,
        "seconds": round(child["seconds"], 1), "gate_passed": child["gate_passed"], "package_files": files,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"export --quantize (int8) peak RSS, {machine()}")
    for column in ("float32 weights", "peak RSS", "RSS after imports", "peak / weights", "(peak - imports) / weights",
                   "seconds", "package files"):
        table.add_column(column)
    mib = 1 << 20
    table.add_row(f"{weight_bytes / mib:,.0f} MiB", f"{peak / mib:,.0f} MiB", f"{child['baseline_rss'] / mib:,.0f} MiB",
                  f"{result['peak_over_weights']:.2f}x", f"{result['peak_above_baseline_over_weights']:.2f}x",
                  f"{result['seconds']}", ", ".join(files))
    Console().print(table)


# -- scale: a random model of Llama 3.2 1B's shape through convert, export and generate ---------------------------

# Llama 3.2 1B's config.json, but for its weights (random here) and its tokenizer (a stand-in).
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
    "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "torch_dtype": "float32", "bos_token_id": 128000, "eos_token_id": 128001,
}
SMOKE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 512}

# Writes the folder in a process of its own, one safetensors shard per layer (and one for the embedding and the
# final norm), so no more than the embedding is ever in memory. The tokenizer has a piece for every id (byte-level
# BPE without merges: the 256 bytes, then stand-in pieces), so whatever a random model generates decodes.
HF_FOLDER_CHILD = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
out, config = Path(sys.argv[1]), json.loads(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
dim, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
head, heads, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
def normal(*shape):
    return torch.randn(*shape) * 0.02
def layer(i):
    p = f"model.layers.{i}."
    attention = {"q_proj": heads * head, "k_proj": kv * head, "v_proj": kv * head}
    tensors = {p + f"self_attn.{name}.weight": normal(rows, dim) for name, rows in attention.items()}
    tensors[p + "self_attn.o_proj.weight"] = normal(dim, heads * head)
    tensors.update({p + "mlp.gate_proj.weight": normal(ffn, dim), p + "mlp.up_proj.weight": normal(ffn, dim),
                    p + "mlp.down_proj.weight": normal(dim, ffn)})
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[p + norm + ".weight"] = torch.ones(dim)
    return tensors
count = config["num_hidden_layers"] + 1
weight_map, total, parameters = {}, 0, 0
for index in range(count):
    if index == 0:
        tensors = {"model.embed_tokens.weight": normal(vocab, dim), "model.norm.weight": torch.ones(dim)}
    else:
        tensors = layer(index - 1)
    name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    for key, tensor in tensors.items():
        weight_map[key] = name
        total += tensor.numel() * 4
        parameters += tensor.numel()
    del tensors
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                               "weight_map": weight_map}))
(out / "config.json").write_text(json.dumps(config, indent=1))
alphabet = pre_tokenizers.ByteLevel.alphabet()
pieces = sorted(alphabet) + [f"piece{i}" for i in range(vocab - len(alphabet) - 2)]
tokenizer = Tokenizer(models.BPE({piece: i for i, piece in enumerate(pieces)}, []))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|end_of_text|>")])
tokenizer.save(str(out / "tokenizer.json"))
(out / "generation_config.json").write_text(json.dumps({"bos_token_id": vocab - 2, "eos_token_id": vocab - 1}))
print(json.dumps({"weight_bytes": total, "parameters": parameters}))
"""


def scale_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=None,
                        help="where the folder, checkpoint and packages go (default: a fresh temporary folder)")
    parser.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens each export's gates score")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens `edgegpt generate` makes")
    parser.add_argument("--keep", action="store_true", help="keep the ~15 GB of files made (default: deleted)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def scale(args: argparse.Namespace) -> None:
    """A random-weight model of Llama 3.2 1B's shape through convert, export int8 and int4, and generate: the
    time and peak RSS of each command, against the model's float32 weight bytes.

    The shape is Llama 3.2 1B's config.json: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocabulary
    128,256, a tied head, rope_theta 500,000 and llama3 rotary scaling (factor 32); 1.24B parameters, 4.9 GB in
    float32. Steps, each a fresh process measured as a user runs it (wall time, the process's own peak RSS):

        (the folder: float32 safetensors written one shard per layer, in a process of its own)
        edgegpt convert HF_DIR CKPT
        edgegpt export CKPT --out int8 --quantize --no-gate           (and --bits 4 for int4)
        edgegpt generate "The first" --model PKG --max-new-tokens 8 --temperature 0

    Random weights give nearly flat logits, so the quantization gates may fail: `--no-gate` writes the package
    anyway and the manifest records each gate's verdict (shown here); the gates still run, so their memory
    counts. The issue's bounds: export peak RSS <= 3x the float32 weight bytes, convert <= 2.5x.

    --smoke: a tiny model of the same kind (llama3 rotary scaling, tied head, sharded safetensors)."""
    import shutil

    from common import run_measured

    config = dict(LLAMA32_1B)
    if args.smoke:
        config.update(SMOKE_SHAPE)
        config["bos_token_id"], config["eos_token_id"] = config["vocab_size"] - 2, config["vocab_size"] - 1
        args.eval_tokens, args.new_tokens = 128, 4
    work = args.work or scratch_dir("scale")
    work.mkdir(parents=True, exist_ok=True)
    hf, checkpoint = work / "hf", work / "checkpoint"
    text = work / "held-out.txt"
    from common import smoke_text

    text.write_text(smoke_text() * 4, encoding="utf-8")

    def measured(step: str, command: list[str]) -> dict:
        print(f"{step} ...", file=sys.stderr, flush=True)
        run = run_measured(command)
        if run.returncode != 0:
            sys.exit(f"{step} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        print(f"{step}: {run.seconds:.0f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB", file=sys.stderr)
        return {"seconds": run.seconds, "peak_rss_bytes": run.peak_rss_bytes, "stdout": run.stdout}

    steps: dict[str, dict] = {}
    steps["write folder"] = measured("write folder", [sys.executable, "-c", HF_FOLDER_CHILD, str(hf),
                                                      json.dumps(config)])
    made = json.loads(steps["write folder"].pop("stdout").strip().splitlines()[-1])
    edgegpt = [sys.executable, "-m", "edgegpt"]
    steps["convert"] = measured("convert", [*edgegpt, "convert", str(hf), str(checkpoint)])
    gates = {}
    for name, bits in (("int8", "8"), ("int4", "4")):
        package = work / name
        steps[f"export {name}"] = measured(f"export {name}", [
            *edgegpt, "export", str(checkpoint), "--out", str(package), "--quantize", "--bits", bits, "--no-gate",
            "--eval-data", str(text), "--eval-tokens", str(args.eval_tokens)])
        manifest = json.loads((package / "manifest.json").read_text())
        gates[name] = [{"name": c["name"], "value": c["value"], "limit": c["limit"], "passed": c["passed"]}
                       for c in manifest["gates"]["checks"]]
        steps[f"generate {name}"] = measured(f"generate {name}", [
            *edgegpt, "generate", "The first", "--model", str(package), "--max-new-tokens", str(args.new_tokens),
            "--temperature", "0"])
        steps[f"generate {name}"]["package_bytes"] = sum(p.stat().st_size for p in package.iterdir() if p.is_file())
    for name, step in steps.items():
        text_out = step.pop("stdout", "")
        if name.startswith("generate"):
            step["text"] = text_out.strip()
        step["peak_over_weights"] = step["peak_rss_bytes"] / made["weight_bytes"]
    bounds = {"export": 3.0, "convert": 2.5}
    verdicts = {name: steps[name]["peak_over_weights"] <= bounds[name.split()[0]]
                for name in steps if name.split()[0] in bounds}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "config": config, "parameters": made["parameters"],
              "float32_weight_bytes": made["weight_bytes"], "steps": steps, "gates": gates, "within_bounds": verdicts}
    table = Table(title=f"a random model of Llama 3.2 1B's shape ({made['parameters'] / 1e6:,.1f}M parameters, "
                        f"{made['weight_bytes'] / 2**30:.3f} GiB float32): {machine()}",
                  caption="peak RSS: each command's own process; bounds (issue 21): export <= 3x the float32 weight "
                          "bytes, convert <= 2.5x")
    for column in ("step", "seconds", "peak RSS GiB", "peak / float32 weights", "within bound", "package MB / text"):
        table.add_column(column, justify="left" if column in ("step", "package MB / text") else "right")
    for name, step in steps.items():
        verdict = verdicts.get(name)
        table.add_row(name, f"{step['seconds']:.0f}", f"{step['peak_rss_bytes'] / 2**30:.2f}",
                      f"{step['peak_over_weights']:.2f}x", "—" if verdict is None else ("yes" if verdict else "NO"),
                      f"{step['package_bytes'] / 1e6:,.0f} MB: {step['text'][:40]!r}" if "text" in step else "")
    Console(width=max(Console().width, 140)).print(table)
    for name, checks in gates.items():
        print(f"{name} gates (random weights, written with --no-gate): " + "; ".join(
            f"{c['name']} {c['value']:.4g} (limit {c['limit']:.4g}) {'pass' if c['passed'] else 'FAIL'}"
            for c in checks))
    if args.json:
        print(json.dumps(result))


# -- convert-memory: peak RSS of `edgegpt convert` against the model's float32 bytes ----------------------------


def convert_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, default=None, help="a .gguf file to convert")
    parser.add_argument("--hf", type=Path, default=None, help="a Hugging Face folder to convert")
    parser.add_argument("--dim", type=int, default=1024, help="without --gguf or --hf: the random model's shape")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--json", action="store_true")


def convert_memory(args: argparse.Namespace) -> None:
    """Peak resident memory of `edgegpt convert` (a GGUF file or a Hugging Face folder into a checkpoint) in a
    process of its own, against the float32 bytes of the weights it writes (the tied head counted once).
    Without --gguf or --hf, a random Llama-family folder of the given shape (float32 safetensors, tied head,
    written by scale's HF_FOLDER_CHILD) is made first. The issue's bound: peak RSS <= 2.5x the float32 weights.

    --smoke: a tiny random folder."""
    import shutil

    from safetensors import safe_open

    from common import run_measured

    work = scratch_dir("convert-memory")
    source = args.gguf or args.hf
    if source is None:
        shape = {"hidden_size": args.dim, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "head_dim": args.dim // args.heads,
                 "intermediate_size": args.ffn, "vocab_size": args.vocab, "max_position_embeddings": 2048}
        config = {**LLAMA32_1B, **(SMOKE_SHAPE if args.smoke else shape)}
        config["bos_token_id"], config["eos_token_id"] = config["vocab_size"] - 2, config["vocab_size"] - 1
        source = work / "hf"
        made = run_measured([sys.executable, "-c", HF_FOLDER_CHILD, str(source), json.dumps(config)])
        if made.returncode != 0:
            sys.exit(f"writing the folder failed:\n{made.stderr[-3000:]}")
    run = run_measured([sys.executable, "-m", "edgegpt", "convert", str(source), str(work / "checkpoint")])
    if run.returncode != 0:
        sys.exit(f"convert failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    with safe_open(str(work / "checkpoint" / "model.safetensors"), framework="pt") as f:
        weight_bytes = sum(4 * int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "source": str(args.gguf or args.hf or "random folder (float32, tied head)"),
              "float32_weight_bytes": weight_bytes, "seconds": round(run.seconds, 1),
              "peak_rss_bytes": run.peak_rss_bytes, "peak_over_weights": run.peak_rss_bytes / weight_bytes,
              "within_bound": run.peak_rss_bytes <= 2.5 * weight_bytes}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"edgegpt convert, peak RSS of its own process: {machine()}",
                  caption="bound (issue 21): convert <= 2.5x the float32 weight bytes")
    for column in ("source", "float32 weights", "seconds", "peak RSS", "peak / weights", "within bound"):
        table.add_column(column)
    mib = 1 << 20
    table.add_row(result["source"], f"{weight_bytes / mib:,.0f} MiB", f"{run.seconds:.1f}",
                  f"{run.peak_rss_bytes / mib:,.0f} MiB", f"{result['peak_over_weights']:.2f}x",
                  "yes" if result["within_bound"] else "NO")
    Console().print(table)


COMMANDS = {
    "quantization": (quantization_options, quantization),
    "kv-cache": (kv_cache_options, kv_cache),
    "kernels": (kernels_options, kernels),
    "pass-numerics": (pass_numerics_options, pass_numerics),
    "export-memory": (export_memory_options, export_memory),
    "scale": (scale_options, scale),
    "convert-memory": (convert_memory_options, convert_memory),
}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
