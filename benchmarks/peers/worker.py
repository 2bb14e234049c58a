"""One measurement process: `measure` (in the parent) spawns it, `run` (in the child) loads one runtime
through its driver's Runner, times it and prints one RESULT line of JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .processes import peak_rss_mb, spawn

PROMPT_TOKENS, NEW_TOKENS, TTFT_TOKENS = 32, 128, 512
CHECK_TOKENS = 16  # greedy tokens compared with edgegpt fp32, to show every runtime runs the same model


class Runner:
    """first(ids) -> (token, state) and step(token, state) -> (token, state): greedy, EOS ignored.
    A driver's Runner(path, threads, max_length) loads its model; it may override decode/ttft/greedy when
    its runtime is only reachable through its own generation loop."""

    def first(self, ids):
        raise NotImplementedError

    def step(self, token, state):
        raise NotImplementedError

    def decode(self, ids: list[int], n: int) -> float:
        token, state = self.first(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            token, state = self.step(token, state)
        return n / (time.perf_counter() - t0)

    def ttft(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.first(ids)
        return time.perf_counter() - t0

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """The first n greedy tokens: shows that every runtime runs the same model."""
        token, state = self.first(ids)
        tokens = [token]
        while len(tokens) < n:
            token, state = self.step(token, state)
            tokens.append(token)
        return tokens


def run(args: argparse.Namespace, runner_class: type[Runner]) -> None:
    """The child: cold start, one warm-up, `--reps` timed decode and TTFT runs, peak RSS, greedy tokens."""
    prompts = json.loads(Path(args.prompts).read_text())
    short, long_ = prompts["short"], prompts["long"]
    longest = max(len(long_) + 1, len(short) + NEW_TOKENS + 1, len(short) + CHECK_TOKENS)
    runner = runner_class(args.model, args.threads, longest)
    runner.first(short)
    cold = time.time() - args.spawned
    runner.decode(short, NEW_TOKENS)  # warm-up: allocation, page faults, caches
    runner.ttft(long_)
    decode, ttft = [], []
    for _ in range(args.reps):
        decode.append(runner.decode(short, NEW_TOKENS))
        ttft.append(runner.ttft(long_))
    result = {"cold_s": cold, "decode": decode, "ttft_s": ttft, "rss_mb": peak_rss_mb("self"),
              "greedy": runner.greedy(short, CHECK_TOKENS)}
    print("RESULT " + json.dumps(result), flush=True)


def measure(entry: Path, family: str, model: Path, python: Path, prompts: Path, threads: int, reps: int) -> dict:
    """The parent: run `entry worker family ...` with `python` in a fresh process and collect its samples."""
    # Cold start counts from --spawned, stamped just before the process is created.
    command = [python, entry, "worker", family, "--model", model, "--prompts", prompts,
               "--threads", threads, "--reps", reps, "--spawned", repr(time.time())]
    stdout, _, _ = spawn(command)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {"cold_s": [result["cold_s"]], "decode": result["decode"], "ttft_s": result["ttft_s"],
            "rss_mb": [result["rss_mb"]], "greedy": result["greedy"]}
