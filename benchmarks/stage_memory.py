"""Peak RSS of a command per stage it announces: the process's RSS sampled every few milliseconds, each sample
tagged with the last progress line the command printed, and its VmHWM (the true peak) at the end. Linux only.

    python benchmarks/stage_memory.py edgegpt export CKPT --out PKG --quantize --eval-data TEXT --eval-tokens 16384

(without --json: `edgegpt export` prints one line per stage when stderr is not a terminal). Figures:
docs/benchmarks.md ("Export memory").
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

SAMPLE_SECONDS = 0.005
NUMBERS = re.compile(r"[\d.]+%.*|\d+/\d+.*")  # a progress line's counts, so one stage stays one label


def follow(stream, stage: list[str], lines: list[str]) -> None:
    """Read `stream` a character at a time (progress lines end in \\r as well as \\n); the last non-empty line,
    less its counts, is the stage."""
    line = ""
    while True:
        char = stream.read(1)
        if not char:
            return
        if char not in "\r\n":
            line += char
            continue
        if line.strip():
            lines.append(line)
            label = NUMBERS.sub("", line).strip()[:70]
            if label:
                stage[0] = label
        line = ""


def status_mib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) // 1024


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    stage, lines = ["start"], []
    for stream in (process.stdout, process.stderr):
        threading.Thread(target=follow, args=(stream, stage, lines), daemon=True).start()
    peaks: dict[str, int] = {}  # insertion order: the stages in the order they ran
    high_water = 0
    while process.poll() is None:
        try:
            rss, high_water = status_mib(process.pid, "VmRSS"), status_mib(process.pid, "VmHWM")
        except (OSError, AttributeError):  # the process ended between poll() and the read
            break
        peaks[stage[0]] = max(peaks.get(stage[0], 0), rss)
        time.sleep(SAMPLE_SECONDS)
    process.wait()
    for label, peak in peaks.items():
        print(f"{peak:>7,} MiB  {label}")
    print(f"VmHWM {high_water:,} MiB (last sample); exit status {process.returncode}")
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()
