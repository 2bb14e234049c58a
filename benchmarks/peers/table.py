"""The table: medians of every runtime's samples, each against edgegpt at the same precision."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .worker import CHECK_TOKENS, NEW_TOKENS, PROMPT_TOKENS

COLUMNS = ("runtime", "size MB", "decode tok/s", "× edgegpt", "TTFT@{ttft} ms", "× edgegpt", "cold start s",
           "× edgegpt", "peak RSS MB", "× edgegpt", "greedy")


def agreement(tokens: list[int] | None, reference: list[int] | None) -> str:
    """Leading greedy tokens equal to edgegpt fp32's (llama-bench does not give its tokens: —)."""
    if not tokens or not reference:
        return "—"
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
    return f"{same}/{len(reference)}"


def ratio(value: float | None, reference: float | None, higher_is_better: bool) -> str:
    """edgegpt's advantage over the peer: > 1 when edgegpt is better, whichever way the figure points."""
    if value is None or reference is None:
        return "—"
    return f"{reference / value if higher_is_better else value / reference:.2f}"


def report(args: argparse.Namespace, checkpoint: Path, ready: list[tuple], samples: dict[str, dict[str, list[float]]],
           greedy: dict[str, list[int] | None], skipped: dict[str, str], ttft_tokens: int) -> None:
    """Print the table (and with --json the figures as one line); `ready` rows are
    (name, family, precision, python, model path, bytes), in the order the table shows them."""
    from rich.console import Console
    from rich.table import Table

    from common import machine

    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    sizes = {name: size for name, _, _, _, _, size in ready}
    ours = {precision: f"edgegpt {precision}" for precision in ("fp32", "int8", "int4")}
    title = f"runtimes on the same weights: {checkpoint}" + (f" (random {args.preset})" if args.preset else "")
    caption = (f"{machine()}; batch 1, {args.threads} threads; decode: {PROMPT_TOKENS}-token prompt then "
               f"{NEW_TOKENS} greedy tokens; TTFT after a {ttft_tokens}-token prompt; cold: fresh process to the "
               f"first token; medians of {args.rounds} interleaved rounds × {args.reps} runs. "
               "× edgegpt: edgegpt's advantage over the peer at the same precision (>1: edgegpt better); "
               f"greedy: how many of the first {CHECK_TOKENS} greedy tokens equal edgegpt fp32's; "
               "differences under ~15% are noise on this machine.")
    table = Table(title=title, caption=caption)
    for column in COLUMNS:
        table.add_column(column.format(ttft=ttft_tokens), justify="left" if column == "runtime" else "right")
    figures = {"machine": machine(), "checkpoint": str(checkpoint), "threads": args.threads, "rounds": args.rounds,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "ttft_tokens": ttft_tokens,
               "reps": args.reps, "runtimes": {}, "skipped": skipped}
    for name, family, precision, _, _, _ in ready:
        if name not in med:
            continue
        m, ref = med[name], med.get(ours[precision], {})
        table.add_row(
            name, f"{sizes[name] / 1e6:.1f}",
            f"{m['decode']:.0f}", ratio(m["decode"], ref.get("decode"), True),
            f"{1000 * m['ttft_s']:.0f}", ratio(m["ttft_s"], ref.get("ttft_s"), False),
            f"{m['cold_s']:.2f}", ratio(m["cold_s"], ref.get("cold_s"), False),
            f"{m['rss_mb']:.0f}", ratio(m["rss_mb"], ref.get("rss_mb"), False),
            agreement(greedy.get(name), greedy.get("edgegpt fp32")),
        )
        figures["runtimes"][name] = {"family": family, "precision": precision, "bytes": sizes[name], **m,
                                     "samples": samples[name], "greedy": greedy.get(name)}
    Console(width=max(Console().width, 190)).print(table)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.json:
        print(json.dumps(figures))
