"""Soak: 1,000 generations of random lengths in one process, watching resident memory and idle CPU.

    python benchmarks/soak.py [--preset nano] [--generations 1000] [--threads 2] [--seed 0] [--idle 3]

Builds its own package (a freshly initialised `--preset` checkpoint with a tokenizer trained on the
documentation that ships inside Python, exported int8 by the exporter itself, gates off: the weights
are random, so quality means nothing here), then runs the generations in a fresh process that imports
the runtime only, as an app would. The mix is seeded: prompts of 1 to ~200 tokens cut from the same
text, 1 to 128 new tokens, greedy and sampled, every 10th call a stream closed after a few pieces (the
cancel path), every 25th a prompt longer than the context with truncate="left". RSS is printed every
100 generations; the first 100 are warm-up (onnxruntime's arena and numpy's caches reach their size),
and the growth after them must stay within 20 MB. Then the process sleeps `--idle` seconds and the CPU
time it used meanwhile is measured: onnxruntime's threads spin only inside a run (runtime/session.py),
so it must be about 0. Prints PASS or FAIL and exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, random_checkpoint

WARMUP = 100
MAX_GROWTH_MB = 20.0
MAX_IDLE_CPU_S = 0.05  # over the whole idle period: "about 0" with room for the timer's own wake-ups
SOURCE_CHARS = 200_000


def source_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:SOURCE_CHARS]


def build_package(preset: str, directory: Path) -> Path:
    from edgegpt.export import export_package

    # the tokenizer learns the text the prompts are cut from, at the preset's full vocabulary
    random_checkpoint(preset, directory / "checkpoint", [source_text()], vocab_size=None)
    export_package(directory / "checkpoint", directory / "model", quantize=True, gate=False)
    return directory / "model"


def rss_mb() -> float:
    """Resident memory now (Linux /proc; elsewhere the peak, which can only overstate growth)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def soak(package: Path, generations: int, threads: int, seed: int, idle: float) -> bool:
    import numpy as np

    from edgegpt.runtime import Generator

    generator = Generator.load(package, provider="cpu", threads=threads)
    tokenizer = generator.package.tokenizer
    ids = tokenizer.encode(source_text()).ids
    rng = np.random.default_rng(seed)
    print(f"package {package} ({generator.config.max_len}-token context), {threads} threads, "
          f"{generations} generations, seed {seed}")
    start, tokens, samples = time.perf_counter(), 0, []
    for n in range(1, generations + 1):
        long = n % 25 == 0
        length = generator.max_length + 20 if long else int(rng.integers(1, 200))
        at = int(rng.integers(0, len(ids) - length))
        prompt = tokenizer.decode(ids[at : at + length])
        options = dict(max_new_tokens=int(rng.integers(1, 129)), temperature=float(rng.choice([0.0, 0.7, 1.0])),
                       top_k=int(rng.choice([0, 50])), seed=int(rng.integers(0, 2**31)), stop_at_eos=False,
                       truncate="left" if long else None)
        if n % 10 == 0:  # a stream its reader abandons: close() must release everything
            stream = generator.stream(prompt, **options)
            for count, _ in enumerate(stream, 1):
                if count == 3:
                    break
            stream.close()
        else:
            tokens += len(generator.generate_ids(prompt, **options))
        if n % 100 == 0 or n == generations:
            samples.append((n, rss_mb()))
            print(f"  {n:5d} generations  RSS {samples[-1][1]:7.1f} MB  {tokens:8,d} tokens (complete calls)  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    warm = next((mb for n, mb in samples if n >= min(WARMUP, generations)), samples[0][1])
    growth = samples[-1][1] - warm
    peak_growth = max(mb for _, mb in samples) - warm
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    time.sleep(idle)
    idle_cpu = time.process_time() - cpu_before
    idle_wall = time.perf_counter() - wall_before
    memory_ok, idle_ok = growth <= MAX_GROWTH_MB, idle_cpu <= MAX_IDLE_CPU_S
    print(f"RSS after {WARMUP} warm-up generations {warm:.1f} MB, at the end {samples[-1][1]:.1f} MB: "
          f"growth {growth:+.1f} MB (peak {peak_growth:+.1f} MB; limit {MAX_GROWTH_MB:.0f} MB) "
          f"{'PASS' if memory_ok else 'FAIL'}")
    print(f"idle CPU: {idle_cpu:.3f} s of CPU time over {idle_wall:.1f} s asleep after generating "
          f"({100 * idle_cpu / idle_wall:.2f}% of a core; limit {MAX_IDLE_CPU_S} s) {'PASS' if idle_ok else 'FAIL'}")
    print(f"{'PASS' if memory_ok and idle_ok else 'FAIL'} on {machine()}")
    return memory_ok and idle_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds to sleep while measuring idle CPU")
    parser.add_argument("--package", type=Path, help=argparse.SUPPRESS)  # the child process: run the soak only
    args = parser.parse_args()
    if args.package:
        ok = soak(args.package, args.generations, args.threads, args.seed, args.idle)
        sys.exit(0 if ok else 1)
    with tempfile.TemporaryDirectory() as work:
        print(f"building a random-weight {args.preset} int8 package", file=sys.stderr, flush=True)
        package = build_package(args.preset, Path(work))
        # A fresh process without torch: its memory is the runtime's alone, as in an app.
        child = [sys.executable, __file__, "--package", str(package), "--generations", str(args.generations),
                 "--threads", str(args.threads), "--seed", str(args.seed), "--idle", str(args.idle)]
        sys.exit(subprocess.run(child).returncode)


if __name__ == "__main__":
    main()
