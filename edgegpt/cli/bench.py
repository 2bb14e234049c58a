"""`edgegpt bench`: how fast a model package runs here (load, first token, decode, memory).

Everything is measured in one fresh child process (`python -m edgegpt.cli.bench --child ...`), so that
    cold start   = the parent starting that process -> the child's first token (imports, load, prefill
                   included: what `edgegpt generate` costs before it prints anything)
    peak RSS     = the child's resource.getrusage high-water mark after load + TTFT + decode runs, not
                   the parent's (which may hold typer, a test runner or an earlier model)
and the warm figures come from the same process after a warm-up run:
    load         = Generator.load (session creation included), median of `runs`
    TTFT         = prefill of `prompt_len` tokens + choosing the first token, median of `runs`
    decode       = `new_tokens` greedy decode steps after that prompt, tokens/s, median of `runs`
    flatness     = decode tokens/s over 32 steps starting at each of `positions` (cache already filled)
The prompt is random token ids (seeded): a benchmark needs an exact length, not text. Torch-free.
On a shared machine the same run moves by ±20% (../shared/BENCHMARK-NOTES.md): quote medians.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST, MODEL

FLAT_STEPS = 32  # decode steps timed at each flatness position


def run_bench(model: Path, prompt_len: int = 32, new_tokens: int = 128, threads: int | None = None,
              provider: str = "auto", runs: int = 5, positions: tuple[int, ...] = (),
              max_length: int | None = None, draft: str | Path | None = "auto", lookup: bool = False) -> dict[str, Any]:
    """Run the benchmark in a fresh child process and return its report (see the module docstring).
    max_length, draft: Generator.load's (default: the model's context; the package's own draft, if any);
    lookup: prompt lookup. With a draft or lookup the report has `speculation`: guesses kept and tokens
    per pass of the model."""
    if prompt_len < 1 or new_tokens < 1 or runs < 1:
        raise EdgeGPTError("--prompt-len, --new-tokens and --runs must be at least 1")
    if max_length is not None and max_length < 1:  # the child reads 0 as "the default"
        raise EdgeGPTError(f"--max-length must be at least 1, got {max_length}")
    # The child reads threads 0 as "the default": refuse it here rather than quietly benchmark another setting.
    if threads is not None and threads < 1:
        raise EdgeGPTError(f"--threads must be at least 1, got {threads}")
    if any(p < 0 for p in positions):
        raise EdgeGPTError(f"--positions are numbers of cached tokens, 0 or more; got {min(positions)}")
    args = [sys.executable, "-m", "edgegpt.cli.bench", "--child", str(model), str(prompt_len), str(new_tokens),
            str(threads or 0), provider, str(runs), ",".join(map(str, positions)), str(max_length or 0),
            "off" if draft is None else str(draft), "lookup" if lookup else "-"]
    with tempfile.TemporaryFile(mode="w+") as err_file:
        start = time.perf_counter()
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err_file, text=True)
        first = child.stdout.readline()  # the child writes this line right after its first token
        cold = time.perf_counter() - start
        # Through the same reader: readline may already have buffered what follows the line, which
        # communicate() (reading the raw pipe) would lose; a fast child's whole report, at times.
        rest = child.stdout.read()
        child.wait()
        err_file.seek(0)
        err = err_file.read()
    if child.returncode != 0 or first.strip() != "first-token":
        lines = (err or first).strip().splitlines()
        raise EdgeGPTError(lines[-1] if lines else f"the benchmark process failed ({child.returncode})")
    report = json.loads(rest)
    report["cold_start_s"] = cold
    return report


def _child(model: str, prompt_len: int, new_tokens: int, threads: int, provider: str, runs: int,
           positions: list[int], max_length: int, draft: str | None = "auto", lookup: bool = False) -> dict[str, Any]:
    import numpy as np

    from edgegpt.runtime import Generator

    t0 = time.perf_counter()
    generator = Generator.load(model, provider=provider, threads=threads or None, max_length=max_length or None,
                               draft=draft)
    first_load = time.perf_counter() - t0
    if prompt_len + new_tokens > generator.max_length:
        raise EdgeGPTError(f"--prompt-len + --new-tokens exceed the context of {generator.max_length} (--max-length)")
    vocab = min(generator.config.vocab_size, generator.package.tokenizer.get_vocab_size())
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_len).tolist()
    greedy = dict(temperature=0, stop_at_eos=False, truncate=None, lookup=lookup)
    speculation: list = []  # the last timed generation's SpeculationStats (None without speculation)
    next(iter(generator.stream_tokens(prompt, max_new_tokens=1, **greedy)))
    print("first-token", flush=True)  # the parent's cold-start clock stops here

    def once() -> tuple[float, float]:
        """TTFT and decode tokens/s of one greedy generation through the decode loop apps use."""
        t0 = time.perf_counter()
        tokens = generator.stream_tokens(prompt, max_new_tokens=new_tokens + 1, **greedy)
        next(tokens)
        t1 = time.perf_counter()
        steps = sum(1 for _ in tokens)
        speculation[:] = [tokens.speculation]
        return t1 - t0, steps / (time.perf_counter() - t1)

    once()  # warm-up: first runs pay for allocations and page faults
    samples = [once() for _ in range(runs)]
    # The high-water mark of one load + prompt + decode, read before the extra loads below (each holds
    # a second session for a moment: `small` int8 read 197 MB after them, 147 MB before) and the
    # flatness runs. Linux reports ru_maxrss in KiB (macOS in bytes).
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1024)
    loads = [first_load]
    for _ in range(runs - 1):
        t0 = time.perf_counter()
        Generator.load(model, provider=provider, threads=threads or None, max_length=max_length or None,
                       draft=draft)
        loads.append(time.perf_counter() - t0)
    flat = {str(p): _decode_at(generator, p, runs) for p in positions}
    package = generator.package
    return {
        "model": str(model),
        "precision": _manifest(Path(model)).get("precision"),
        "graph_optimization": _manifest(Path(model)).get("graph_optimization"),
        "provider": generator.provider,
        "threads": threads or None,
        "max_length": generator.max_length,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "model_bytes": Path(package.model_path).stat().st_size,
        "load_s": statistics.median(loads),
        "ttft_s": statistics.median(s[0] for s in samples),
        "decode_tokens_per_s": statistics.median(s[1] for s in samples),
        "decode_runs": [round(s[1], 1) for s in samples],
        "decode_tokens_per_s_at": flat,
        "peak_rss_mb": peak_rss_mb,
        "speculation": None if speculation[0] is None else {
            "draft": None if generator.draft is None else str(generator.draft.package.path), "lookup": lookup,
            "acceptance": speculation[0].acceptance, "tokens_per_step": speculation[0].tokens_per_step},
    }


def _manifest(model: Path) -> dict[str, Any]:
    try:
        return json.loads((model / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not needed to run (runtime/package.py): an unwritten one is fine
        return {}


def _decode_at(generator, position: int, runs: int) -> float:
    """Median decode tokens/s over FLAT_STEPS greedy steps after a prompt of `position` tokens."""
    if position + FLAT_STEPS > generator.max_length:
        raise EdgeGPTError(f"position {position} + {FLAT_STEPS} steps exceed the context of {generator.max_length}")
    rates = []
    for _ in range(runs):
        tokens = generator.stream_tokens([1] * max(position, 1), max_new_tokens=FLAT_STEPS + 1, temperature=0,
                                         stop_at_eos=False)
        next(tokens)  # the prompt fills the cache
        t0 = time.perf_counter()
        steps = sum(1 for _ in tokens)
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"edgegpt bench: {report['model']} ({report['provider']}, "
                        f"{report['threads'] or 'default'} threads, max_length {report.get('max_length')})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")
    rows = [
        ("cold start", f"{report['cold_start_s']:.3f} s",
         f"fresh process to the first token, {report['prompt_len']}-token prompt"),
        ("load", f"{1000 * report['load_s']:.1f} ms", "Generator.load, median"),
        ("time to first token", f"{1000 * report['ttft_s']:.1f} ms",
         f"prefill of {report['prompt_len']} tokens, median"),
        ("decode", f"{report['decode_tokens_per_s']:,.0f} tokens/s",
         f"{report['new_tokens']} greedy steps, median of {report['runs']}"),
    ]
    rows += [(f"decode at position {p}", f"{r:,.0f} tokens/s", f"{FLAT_STEPS} steps")
             for p, r in report["decode_tokens_per_s_at"].items()]
    if report.get("speculation"):
        spec = report["speculation"]
        how = " + ".join(filter(None, ["draft " + "/".join(Path(spec["draft"]).parts[-2:]) if spec["draft"] else "",
                                        "lookup" if spec["lookup"] else ""]))
        rows += [("guesses kept", f"{100 * spec['acceptance']:.1f} %", f"speculation: {how}"),
                 ("tokens per pass", f"{spec['tokens_per_step']:.2f}", "tokens each forward of the model made")]
    rows += [("peak RSS", f"{report['peak_rss_mb']:.0f} MB", "the benchmark process's high-water mark"),
             (MODEL, f"{report['model_bytes'] / 1e6:.1f} MB", "")]
    for row in rows:
        table.add_row(*row)
    return table


def main() -> None:
    """Child entry point (internal):
    python -m edgegpt.cli.bench --child MODEL PROMPT NEW THREADS PROVIDER RUNS POSITIONS MAX_LENGTH DRAFT LOOKUP"""
    argv = sys.argv[1:]
    if len(argv) != 11 or argv[0] != "--child":
        raise SystemExit("internal entry point; use `edgegpt bench`")
    model, prompt_len, new_tokens, threads, provider, runs, positions, max_length, draft, lookup = argv[1:]
    try:
        report = _child(model, int(prompt_len), int(new_tokens), int(threads), provider, int(runs),
                        [int(p) for p in positions.split(",") if p], int(max_length),
                        None if draft == "off" else draft, lookup == "lookup")
    except EdgeGPTError as e:
        print("first-token-failed", flush=True)
        print(str(e), file=sys.stderr)
        raise SystemExit(1)
    sys.stdout.write(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
