"""The process `edgegpt bench` times (cli/bench.py starts it): `python -m edgegpt.cli.bench_child ...`.

Everything is measured in this one fresh process, so that
    cold start   = the parent starting this process -> its first token (imports, load, prefill included:
                   what `edgegpt generate` costs before it prints anything)
    peak RSS     = this process's resource.getrusage high-water mark after load + TTFT + decode runs, not
                   the parent's (which may hold typer, a test runner or an earlier model)
and the warm figures come from the same process after a warm-up run:
    load         = Generator.load (session creation included), median of `runs`
    TTFT         = prefill of `prompt_len` tokens + choosing the first token, median of `runs`
    decode       = `new_tokens` greedy decode steps after that prompt, tokens/s, median of `runs`
    flatness     = decode tokens/s over 32 steps starting at each of `positions` (cache already filled)
The prompt is random token ids (seeded): a benchmark needs an exact length, not text. Torch-free, and
typer-free: the cold start counts only what generating needs. On a shared machine the same run moves a
good deal from one run to the next (docs/benchmarks.md): quote medians.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST

FLAT_STEPS = 32  # decode steps timed at each flatness position


def measure(model: str, prompt_len: int, new_tokens: int, threads: int, provider: str, runs: int,
            positions: list[int], max_length: int, draft: str | None = "auto", lookup: bool = False) -> dict[str, Any]:
    """The report (the module docstring says what each figure is), the line `first-token` printed as soon
    as the first token is chosen."""
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
    # The high-water mark of one load + prompt + decode, read before the extra loads below (each holds a
    # second session for a moment, which a user's process never does) and the flatness runs. Linux reports
    # ru_maxrss in KiB (macOS in bytes).
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


def main() -> None:
    """The child's entry point (internal):
    python -m edgegpt.cli.bench_child MODEL PROMPT NEW THREADS PROVIDER RUNS POSITIONS MAX_LENGTH DRAFT LOOKUP"""
    argv = sys.argv[1:]
    if len(argv) != 10:
        raise SystemExit("internal entry point; use `edgegpt bench`")
    model, prompt_len, new_tokens, threads, provider, runs, positions, max_length, draft, lookup = argv
    try:
        report = measure(model, int(prompt_len), int(new_tokens), int(threads), provider, int(runs),
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
