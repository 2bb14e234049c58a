"""Child processes: logged commands (setup, conversions) and measured ones (wall time, peak memory)."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_logged(command: list, **kwargs) -> None:
    """Run a command to completion, echoing it first; raises on a non-zero exit."""
    log("$ " + " ".join(map(str, command)))
    subprocess.run(list(map(str, command)), check=True, **kwargs)


def peak_rss_mb(pid) -> float:
    """VmHWM: the peak resident set of the process's current image. (wait4's ru_maxrss would do for a
    child, but Linux carries the pre-exec high-water mark over exec, i.e. the parent's size at fork.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spawn(command: list, timeout: float = 900) -> tuple[str, float, float]:
    """Run a fresh process: (stdout, wall seconds, its peak RSS in MB, read from /proc while it runs)."""
    start_perf = time.perf_counter()
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = {"out": [], "err": []}
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "out")
    selector.register(process.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    deadline = time.monotonic() + timeout
    rss = 0.0
    while open_streams:
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"timed out after {timeout:.0f} s")
        try:
            rss = max(rss, peak_rss_mb(process.pid))
        except (OSError, ValueError):  # exited, or a zombie without a memory map
            pass
        for key, _ in selector.select(timeout=0.02):
            line = key.fileobj.readline()
            if line:
                chunks[key.data].append(line)
            else:
                selector.unregister(key.fileobj)
                open_streams -= 1
    process.wait()
    wall = time.perf_counter() - start_perf
    if process.returncode != 0:
        tail = "".join(chunks["err"]).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {process.returncode}: {tail[0][:300]}")
    return "".join(chunks["out"]), wall, rss
