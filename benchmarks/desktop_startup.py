"""The desktop example's start-up and time to first token, frozen (PyInstaller) and run by Python, side by
side, plus the frozen bundle's size.

    xvfb-run -a python benchmarks/desktop_startup.py --model edgegpt-out/model --runs 9

Builds the bundle (examples/freeze_desktop_chat.py) into --work unless it is there already, then runs
both apps in scripted mode (`--send TEXT --quit-when-done`, greedy, 16 new tokens) alternately, --runs
times after one warm-up round (file cache), and prints the medians of what each reports: process start to
window shown, to model ready, Send to first token in the window, and start to first token. The frozen
app runs with a bare environment (PATH=/usr/bin:/bin, no PYTHONPATH), as on a machine without Python.
Needs a display: under Xvfb, as above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, machine

MESSAGE = "Suggest a name for a small sailing boat."
FIGURES = ("startup_s", "ready_s", "ttft_s", "first_token_s")


def run_once(command: list[str], env: dict) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    if result.returncode != 0 or report.get("error"):
        raise SystemExit(f"desktop_startup: {command[0]} failed: {report.get('error') or result.stderr[-500:]}")
    report["wall_s"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model package directory")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgegpt-desktop-bundle"),
                        help="where the bundle is built (reused when present)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY"):
        parser.error("no DISPLAY: run under Xvfb (xvfb-run -a python benchmarks/desktop_startup.py ...)")
    executable = args.work / "desktop_chat" / "desktop_chat"
    if not executable.exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "freeze_desktop_chat.py"), "--out", str(args.work)],
                       check=True)
    bundle = executable.parent
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and not p.is_symlink())
    flags = [str(args.model.resolve()), "--send", MESSAGE, "--quit-when-done", "--max-new-tokens", "16",
             "--temperature", "0"]
    display = {k: os.environ[k] for k in ("DISPLAY", "XAUTHORITY") if k in os.environ}  # xvfb-run sets both
    variants = {
        "frozen": ([str(executable), *flags], {"PATH": "/usr/bin:/bin", "HOME": str(args.work), **display}),
        "python": ([sys.executable, str(REPO / "examples" / "desktop_chat.py"), *flags], dict(os.environ)),
    }
    reports: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.runs + 1):  # round 0 warms the file cache and is dropped
        order = list(variants.items()) if round_ % 2 else list(reversed(variants.items()))
        for name, (command, env) in order:
            report = run_once(command, env)
            if round_:
                reports[name].append(report)
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in FIGURES}
               for name, rows in reports.items()}
    if args.json:
        print(json.dumps({"machine": machine(), "bundle_bytes": size, "runs": args.runs, "medians": medians}))
        return
    print(f"{machine()}; {args.model}; medians of {args.runs} runs; bundle {size / 2**20:.1f} MiB ({size:,} bytes)")
    print(f"{'':8} {'start→window':>13} {'start→ready':>12} {'Send→token':>11} {'start→token':>12}")
    for name, figures in medians.items():
        print(f"{name:8} " + " ".join(f"{figures[key]:>{width}.3f}" for key, width in zip(FIGURES, (13, 12, 11, 12))))


if __name__ == "__main__":
    main()
