"""The runtime as apps and servers run it: `edgegpt serve` under concurrent load beside llama.cpp's server, a
long soak in one process (memory and idle CPU), and the desktop example's start-up, frozen and not.

    python benchmarks/serving.py load --model PACKAGE_DIR --checkpoint CHECKPOINT_DIR --work /tmp/peers [--json]
    python benchmarks/serving.py soak [--preset nano] [--generations 1000] [--threads 2] [--seed 0] [--idle 3]
    xvfb-run -a python benchmarks/serving.py startup --model edgegpt-out/model --runs 9
    python benchmarks/serving.py COMMAND --smoke        # seconds, on a tiny random model

Figures, with the commands that gave them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import http.client
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    REPO,
    SHAKESPEARE,
    machine,
    pydoc_topics_text,
    random_checkpoint,
    scratch_dir,
    shakespeare_split,
    skip,
    smoke_kit,
    subcommands,
)
from peers import llama_server
from peers.processes import log

# -- load -------------------------------------------------------------------------------------------------------

URL = re.compile(rb"https?://127\.0\.0\.1:(\d+)")
EDGEGPT, LLAMA = "edgegpt", "llama.cpp"


@dataclass
class Sample:
    """One request as the client saw it (perf_counter seconds)."""
    sent: float
    first: float | None  # the first chunk with text
    end: float
    completion_tokens: int
    prompt_tokens: int | None
    usage: bool  # False: the stream carried no usage, completion_tokens counts text chunks instead


@dataclass
class Cell:
    """Every measurement of one (runtime, slots, clients) across rounds."""
    aggregate: list[float] = field(default_factory=list)  # tokens/s, one per round
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)  # this process's CPU seconds ÷ wall, per round
    server_cpu: list[float] = field(default_factory=list)  # the server's CPU seconds ÷ wall (cores busy)


# ---------------------------------------------------------------------------------------------- servers

def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this script dies, even by SIGKILL (Linux; elsewhere the
    normal cleanup paths still stop it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc; nan where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class Server:
    """A server process on a free loopback port: started, found, health-checked, always stopped."""

    running: set[Server] = set()

    def __init__(self, name: str, command: list[str], logs: Path):
        self.name, self.command, self.log_path = name, command, logs / f"{name.replace(' ', '-')}.log"
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float) -> Server:
        log("$ " + " ".join(self.command))
        # the log goes to a file, not a pipe: nothing has to keep draining it while the clients run
        with open(self.log_path, "wb") as sink:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=sink,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        Server.running.add(self)
        deadline = time.monotonic() + timeout
        while self.port is None:
            match = URL.search(self.log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
            else:
                self._still_alive(deadline, "to print its URL")
                time.sleep(0.05)
        while not self._healthy():
            self._still_alive(deadline, "for /health to answer 200")
            time.sleep(0.1)
        return self

    def _still_alive(self, deadline: float, waiting: str) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{self.name}: timed out waiting {waiting}: {self.log_tail()}")

    def _healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip()[:200] for line in text[-lines:])

    def stop(self, grace: float = 15) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; logs whether the server stopped by itself."""
        Server.running.discard(self)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            code = self.process.wait(grace)
            if code not in (0, -signal.SIGTERM):
                log(f"{self.name}: exit status {code} after SIGTERM: {self.log_tail()}")
        except subprocess.TimeoutExpired:
            log(f"{self.name}: still running {grace:.0f} s after SIGTERM, killed")
            self.process.kill()
            self.process.wait(10)

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls.running):
            server.stop(grace=5)


def edgegpt_command(model: Path, slots: int, args: argparse.Namespace) -> list[str]:
    # the interpreter running this script, so a checkout's editable install is what gets measured
    return [sys.executable, "-m", "edgegpt", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
            "--parallel", str(slots), "--max-queue", str(max(args.clients) + slots), "--threads", str(args.threads),
            "--max-length", str(args.context)]


# ---------------------------------------------------------------------------------------------- clients

def completion(port: int, body: bytes, timeout: float) -> Sample:
    """One streaming POST /v1/completions, read as SSE lines (`data: {json}` … `data: [DONE]`)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = time.perf_counter()
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read(300).decode(errors='replace')}")
        first, usage, chunks = None, None, 0
        for line in response:
            if not line.startswith(b"data:"):
                continue  # blank separators, SSE comments
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("error"):
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
    finally:
        connection.close()
    if usage:
        return Sample(sent, first, end, int(usage["completion_tokens"]), usage.get("prompt_tokens"), True)
    return Sample(sent, first, end, chunks, None, False)


class Prompts:
    """Request bodies: the i-th is the i-th window of `tokens` tokens of real text, so no two requests of a
    server's life share a prefix; both servers get the same sequence."""

    def __init__(self, tokenizer_json: Path, tokens: int, max_tokens: int, temperature: float):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # the end of the held-out split (its last 100,000 characters), or any text when tinyshakespeare is not here
        text = shakespeare_split()[1][-100_000:] if SHAKESPEARE.exists() else Path(__file__).read_text() * 20
        ids = tokenizer.encode(text).ids
        self.texts = [tokenizer.decode(ids[i:i + tokens]) for i in range(0, len(ids) - tokens, tokens)]
        self.max_tokens, self.temperature = max_tokens, temperature

    def body(self, index: int) -> bytes:
        # no "model": each server has its own name for it, and edgegpt's answers 404 to any other
        request = {"prompt": self.texts[index % len(self.texts)],
                   "max_tokens": self.max_tokens, "temperature": self.temperature, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
        if self.temperature > 0:
            request["seed"] = index
        return json.dumps(request).encode()


def load_round(server: Server, prompts: Prompts, first_prompt: int, clients: int, requests: int,
               timeout: float, cell: Cell) -> None:
    """`clients` threads released together, each sending `requests` requests back to back; adds the round's
    aggregate tokens/s, samples, errors and CPU shares to `cell`."""
    go = threading.Event()
    results: list[list[Sample]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(k: int) -> None:
        go.wait()
        for r in range(requests):
            try:
                results[k].append(completion(server.port, prompts.body(first_prompt + k * requests + r), timeout))
            except Exception as e:  # noqa: BLE001 — an error is a figure of the run, reported in the table
                errors.append(f"{type(e).__name__}: {e}"[:300])
                return

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    own_cpu = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = cpu_seconds(server.process.pid)
    start = time.perf_counter()
    go.set()
    deadline = time.monotonic() + timeout * requests + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"{server.name}: {clients} clients did not finish {requests} requests in time")
    samples = [s for per_client in results for s in per_client]
    if samples:
        wall = max(s.end for s in samples) - start
        used = resource.getrusage(resource.RUSAGE_SELF)
        cell.aggregate.append(sum(s.completion_tokens for s in samples) / wall)
        cell.client_cpu.append((used.ru_utime + used.ru_stime - own_cpu.ru_utime - own_cpu.ru_stime) / wall)
        cell.server_cpu.append((cpu_seconds(server.process.pid) - server_cpu) / wall)
    cell.samples.extend(samples)
    cell.errors.extend(errors)


def serve_and_measure(server: Server, prompts: Prompts, slots: int, args: argparse.Namespace,
                      cells: dict[tuple[str, int, int], Cell], runtime: str) -> None:
    """Start `server`, warm it with `slots` concurrent requests, run every client count, stop it."""
    try:
        server.start(args.startup_timeout)
        warm = Cell()
        load_round(server, prompts, 0, slots, 1, args.request_timeout, warm)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors[0]}")
        next_prompt = slots
        for clients in args.clients:
            cell = cells.setdefault((runtime, slots, clients), Cell())
            load_round(server, prompts, next_prompt, clients, args.requests, args.request_timeout, cell)
            next_prompt += clients * args.requests
            recent = cell.aggregate[-1] if cell.aggregate else float("nan")
            log(f"{runtime} slots {slots} clients {clients}: {recent:.0f} tok/s"
                + (f", {len(cell.errors)} errors: {cell.errors[-1]}" if cell.errors else ""))
    except BaseException:
        # failed or interrupted: requests may still be streaming, and a server lets them finish first
        server.stop(grace=3)
        raise
    server.stop()


# ---------------------------------------------------------------------------------------------- the table

def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile, interpolated between the order statistics (None when there are no values)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(cell: Cell | None) -> dict | None:
    if cell is None or not cell.samples:
        return None
    ttft = [s.first - s.sent for s in cell.samples if s.first is not None]
    stream = [(s.completion_tokens - 1) / (s.end - s.first) for s in cell.samples
              if s.first is not None and s.completion_tokens > 1 and s.end > s.first]
    return {"aggregate_tok_s": statistics.median(cell.aggregate), "aggregate_rounds": cell.aggregate,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "stream_tok_s_p50": percentile(stream, 50), "requests": len(cell.samples), "errors": cell.errors,
            "completion_tokens": sorted({s.completion_tokens for s in cell.samples}),
            "prompt_tokens_mean": statistics.mean([s.prompt_tokens for s in cell.samples if s.prompt_tokens]
                                                  or [float("nan")]),
            "usage_missing": sum(not s.usage for s in cell.samples),
            "client_cpu": max(cell.client_cpu, default=None), "server_cpu": statistics.median(cell.server_cpu)}


def fmt(value: float | None, spec: str, scale: float = 1) -> str:
    return "—" if value is None else format(value * scale, spec)


def report(args: argparse.Namespace, cells: dict, skipped: dict[str, str], gguf: Path | None,
           load: tuple[float, float]) -> None:
    """Print the table (Markdown with --markdown), which slot count served each client count fastest, what
    was skipped or went wrong, and with --json the figures as one line. `load`: the 1-minute load average
    before and after the run, since other work on the machine moves these figures more than anything."""
    from rich.console import Console
    from rich.table import Table

    ours, theirs = f"{EDGEGPT} {args.model}", f"{LLAMA} {gguf}" if gguf else LLAMA
    columns = ("slots", "clients", "edgegpt tok/s", "llama.cpp tok/s", "× llama.cpp", "edgegpt TTFT p50/p95 ms",
               "llama.cpp TTFT p50/p95 ms", "edgegpt stream tok/s", "llama.cpp stream tok/s", "edgegpt CPU",
               "llama.cpp CPU", "errors")
    rows, figures = [], {"machine": machine(), "edgegpt_model": str(args.model), "gguf": str(gguf) if gguf else None,
                         "threads": args.threads, "requests": args.requests, "max_tokens": args.max_tokens,
                         "prompt_tokens": args.prompt_tokens, "temperature": args.temperature,
                         "rounds": args.rounds, "context_per_slot": args.context, "llama_args": args.llama_args,
                         "load_average": load, "cells": [],
                         "skipped": skipped}
    client_cpu = []
    for slots in args.slots:
        for clients in args.clients:
            e = summary(cells.get((EDGEGPT, slots, clients)))
            ll = summary(cells.get((LLAMA, slots, clients)))
            if e is None and ll is None:
                continue
            ratio = e["aggregate_tok_s"] / ll["aggregate_tok_s"] if e and ll else None
            errors = sum(len(s["errors"]) for s in (e, ll) if s)
            client_cpu += [s["client_cpu"] for s in (e, ll) if s and s["client_cpu"] is not None]
            rows.append((
                str(slots), str(clients),
                fmt(e and e["aggregate_tok_s"], ".0f"), fmt(ll and ll["aggregate_tok_s"], ".0f"), fmt(ratio, ".2f"),
                *(f"{fmt(s and s['ttft_p50_s'], '.0f', 1000)} / {fmt(s and s['ttft_p95_s'], '.0f', 1000)}"
                  for s in (e, ll)),
                fmt(e and e["stream_tok_s_p50"], ".0f"), fmt(ll and ll["stream_tok_s_p50"], ".0f"),
                fmt(e and e["server_cpu"], ".2f"), fmt(ll and ll["server_cpu"], ".2f"), str(errors)))
            figures["cells"].append({"slots": slots, "clients": clients, EDGEGPT: e, LLAMA: ll, "ratio": ratio})
    title = f"serving under load: {ours} against {theirs}"
    caption = (f"{machine()}, load average {load[0]:.1f} before and {load[1]:.1f} after; {args.threads} threads "
               f"per server; each client {args.requests} streaming "
               f"/v1/completions back to back, ~{args.prompt_tokens}-token prompts, {args.max_tokens} tokens "
               f"each (ignore_eos), {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}; "
               f"tok/s: all completion tokens ÷ wall time (median of {args.rounds} interleaved rounds); TTFT "
               "includes queueing; stream tok/s: one request's tokens after its first ÷ their time (median); "
               "× llama.cpp: edgegpt's aggregate ÷ llama-server's (>1: edgegpt serves more); CPU: the server's "
               f"cores busy; the client used at most {max(client_cpu, default=0):.0%} of one core. Differences "
               "under ~15% are noise on this machine.")
    if args.markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\n{caption}")
    else:
        table = Table(title=title, caption=caption)
        for column in columns:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(Console().width, 190)).print(table)
    for runtime in (EDGEGPT, LLAMA):
        best = {}  # clients -> (aggregate, slots): which slot count served each number of clients fastest
        for cell in figures["cells"]:
            if cell[runtime]:
                best[cell["clients"]] = max(best.get(cell["clients"], (0, 0)),
                                            (cell[runtime]["aggregate_tok_s"], cell["slots"]))
        if best:
            print(f"most tokens/s, {runtime}: " + ", ".join(
                f"{clients} client{'s' * (clients > 1)} → {slots} slot{'s' * (slots > 1)} ({rate:.0f})"
                for clients, (rate, slots) in sorted(best.items())))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for cell in figures["cells"]:
        for runtime in (EDGEGPT, LLAMA):
            s = cell[runtime]
            if s and (s["errors"] or s["usage_missing"] or s["completion_tokens"] != [args.max_tokens]):
                print(f"note {runtime} slots {cell['slots']} clients {cell['clients']}: {len(s['errors'])} errors"
                      f"{' (' + s['errors'][0] + ')' if s['errors'] else ''}, completion tokens "
                      f"{s['completion_tokens']}, {s['usage_missing']} streams without usage")
    if args.json:
        print(json.dumps(figures))


# ---------------------------------------------------------------------------------------------- main

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_gguf(args: argparse.Namespace, skipped: dict[str, str]) -> Path | None:
    """llama.cpp's side: the --gguf given, or Q8_0 made from --checkpoint; None (with the reason) if not."""
    if LLAMA not in args.only:
        return None
    if not llama_server.binary(args.work).exists():
        skipped[LLAMA] = f"{llama_server.binary(args.work)} is missing: run `python benchmarks/runtimes.py setup`"
        return None
    if args.gguf:
        return args.gguf
    if not args.checkpoint:
        skipped[LLAMA] = "no --checkpoint (to make its Q8_0 GGUF) or --gguf given"
        return None
    try:
        return llama_server.gguf_from_checkpoint(args.checkpoint, args.work, args.threads)
    except Exception as e:  # a peer that cannot be prepared is skipped, with the reason
        skipped[LLAMA] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"
        return None


def edgegpt_serve_available() -> str | None:
    """None when `edgegpt serve` exists here, else why not."""
    result = subprocess.run([sys.executable, "-m", "edgegpt", "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        return f"`edgegpt serve --help` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    return None


def numbers(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="the edgegpt model package to serve")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint: llama.cpp's Q8_0 GGUF is made from it")
    parser.add_argument("--gguf", type=Path, help="instead of --checkpoint: the GGUF llama-server serves")
    parser.add_argument("--work", type=Path, default=None,
                        help="the llama.cpp build, converted models (default /tmp/peers; with --smoke a fresh folder)")
    parser.add_argument("--clients", type=numbers, default=[1, 2, 4, 8], help="concurrent clients, e.g. 1,2,4,8")
    parser.add_argument("--slots", type=numbers, default=[1, 2, 4], help="server slots (--parallel / -np), e.g. 1,2,4")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends back to back")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates (ignore_eos)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, one seed a request")
    parser.add_argument("--threads", type=int, default=2, help="each server's threads")
    parser.add_argument("--context", type=int, default=512, help="KV positions per slot (both servers)")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of the whole grid, runtimes interleaved")
    parser.add_argument("--llama-args", default="",
                        help='more llama-server options, after an = sign: --llama-args="-kvu"')
    parser.add_argument("--only", nargs="*", choices=(EDGEGPT, LLAMA), default=[EDGEGPT, LLAMA])
    parser.add_argument("--startup-timeout", type=float, default=180, help="seconds for a server to become healthy")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds of silence that fail a request")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def load(args: argparse.Namespace) -> None:
    """`edgegpt serve` under load: 1, 2, 4, 8 concurrent clients against one server on loopback, with the server's
    slot count varied, side by side with llama.cpp's llama-server (same number of slots) on the same weights.

    Same weights: edgegpt's int8 package against llama.cpp Q8_0 made from the same checkpoint the way
    `runtimes.py compare` makes it (cached under WORK/models/; llama-server is built by
    `runtimes.py setup`, see peers/setup.py). On a shared machine wrap the run in
    `flock /tmp/edgegpt-cpu.lock …`: the servers need both cores to themselves. llama-server's two threads
    spin-wait for each other between operations, so with one core taken by other work it collapses
    (docs/benchmarks.md); the caption gives the load average before and after.

    What one cell of the table is (runtime, slots S, clients C): a server with S slots (`edgegpt serve --parallel S
    --max-queue Q --max-length CONTEXT`, `llama-server -np S -c S×CONTEXT`, both with `--threads`; one fresh
    server per runtime and S, warmed up by S concurrent requests, then serving each C in turn); C client threads,
    released together, each send `--requests` R streaming /v1/completions back to back (`max_tokens` M,
    `ignore_eos`, so every request makes exactly M tokens; greedy unless --temperature, then each request has
    its own seed). Each request's prompt is its own window of `--prompt-tokens` tokens of the tinyshakespeare
    validation split, so no prompt prefix can be reused from a cache; both servers get the same prompts. Figures:
    - aggregate tokens/s: completion tokens of all C×R requests (from the streamed `usage`) ÷ the wall time from
      the release to the last request's end;
    - TTFT p50 / p95: from sending a request to its first chunk with text, queueing included (C > S queues);
    - stream tokens/s: each request's (completion tokens − 1) ÷ (end − first text), the median: how fast one
      client sees its text arrive;
    - × llama.cpp: edgegpt's aggregate ÷ llama-server's at the same S and C (> 1: edgegpt serves more).
    Rounds (--rounds) repeat the whole grid with the runtimes interleaved (A B A B …); aggregates are the
    median over rounds, percentiles pool every round's requests. The client is one thread per simulated user
    with the standard library's http.client (no JSON parsing beyond the SSE chunks): its CPU use is reported,
    and stays a few percent of one core.

    Servers are started with `--port 0` and found through the `http://127.0.0.1:PORT` their log prints, then
    /health; they get SIGTERM (then SIGKILL after a grace period) when a cell ends, on any error, on Ctrl-C or
    SIGTERM, and — through PR_SET_PDEATHSIG — if this script itself is killed. Every wait has a timeout.

    --smoke: the smoke kit's int8 package, 2 slots, 1 and 2 clients of one 8-token request each, 16-token
    prompts in a 64-position context; llama.cpp only if it was set up in --work."""
    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("serving"))
        args.model = args.model or kit.package
        args.work = args.work or scratch_dir("serving")
        args.slots, args.clients, args.requests, args.max_tokens = [2], [1, 2], 1, 8
        args.prompt_tokens, args.context, args.rounds = 16, 64, 1
    if args.model is None:
        raise SystemExit("give --model PACKAGE_DIR (or --smoke)")
    args.work = (args.work or Path("/tmp/peers")).resolve()
    args.work = args.work.resolve()
    if not (args.model / "tokenizer.json").exists():
        raise SystemExit(f"{args.model} is not an edgegpt model package (no tokenizer.json)")
    if args.checkpoint and not (args.checkpoint / "model.safetensors").exists():
        raise SystemExit(f"{args.checkpoint} is not an edgegpt checkpoint (no model.safetensors)")
    if args.prompt_tokens + args.max_tokens + 8 > args.context:
        raise SystemExit(f"--context {args.context} is too small for {args.prompt_tokens} + {args.max_tokens} tokens")
    if args.checkpoint and sha256(args.checkpoint / "tokenizer.json") != sha256(args.model / "tokenizer.json"):
        log(f"warning: {args.model} and {args.checkpoint} have different tokenizers: not the same weights?")

    # SIGTERM to this script unwinds like Ctrl-C, so `finally` stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    skipped: dict[str, str] = {}
    if EDGEGPT in args.only and (reason := edgegpt_serve_available()):
        skipped[EDGEGPT] = reason
    gguf = find_gguf(args, skipped)
    runtimes = [r for r in (EDGEGPT, LLAMA) if r in args.only and r not in skipped]
    if not runtimes:
        sys.exit("nothing to measure: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    prompts = Prompts(args.model / "tokenizer.json", args.prompt_tokens, args.max_tokens, args.temperature)
    cells: dict[tuple[str, int, int], Cell] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as logs:
        try:
            for round_ in range(args.rounds):
                for slots in args.slots:
                    for runtime in runtimes if round_ % 2 == 0 else runtimes[::-1]:
                        if runtime in skipped:
                            continue
                        command = (edgegpt_command(args.model, slots, args) if runtime == EDGEGPT else
                                   llama_server.command(llama_server.binary(args.work), gguf, slots, args.threads,
                                                        args.context) + shlex.split(args.llama_args))
                        try:
                            serve_and_measure(Server(f"{runtime} -np {slots}", command, Path(logs)), prompts, slots,
                                              args, cells, runtime)
                        except RuntimeError as e:
                            skipped[runtime] = f"round {round_ + 1}, {slots} slots: {e}"
                            log(f"SKIP {runtime}: {skipped[runtime]}")
        finally:
            Server.stop_all()
    report(args, cells, skipped, gguf, (load_before, os.getloadavg()[0]))


# -- soak -------------------------------------------------------------------------------------------------------

WARMUP = 100
MAX_GROWTH_MB = 20.0
MAX_IDLE_CPU_S = 0.05  # over the whole idle period: "about 0" with room for the timer's own wake-ups
SOURCE_CHARS = 200_000


def source_text() -> str:
    return pydoc_topics_text()[:SOURCE_CHARS]


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


def run_soak(package: Path, generations: int, threads: int, seed: int, idle: float) -> bool:
    """The soak itself, in this process: True when memory and idle CPU stayed within their limits."""
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
    print(f"RSS after {min(WARMUP, generations)} warm-up generations {warm:.1f} MB, "
          f"at the end {samples[-1][1]:.1f} MB: "
          f"growth {growth:+.1f} MB (peak {peak_growth:+.1f} MB; limit {MAX_GROWTH_MB:.0f} MB) "
          f"{'PASS' if memory_ok else 'FAIL'}")
    print(f"idle CPU: {idle_cpu:.3f} s of CPU time over {idle_wall:.1f} s asleep after generating "
          f"({100 * idle_cpu / idle_wall:.2f}% of a core; limit {MAX_IDLE_CPU_S} s) {'PASS' if idle_ok else 'FAIL'}")
    print(f"{'PASS' if memory_ok and idle_ok else 'FAIL'} on {machine()}")
    return memory_ok and idle_ok


def soak_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds to sleep while measuring idle CPU")
    parser.add_argument("--package", type=Path,
                        help="soak this package in this very process (what the fresh child process runs)")


def soak(args: argparse.Namespace) -> None:
    """Soak: 1,000 generations of random lengths in one process, watching resident memory and idle CPU.

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

    --smoke: the smoke kit's int8 package (random weights, as here), 30 generations, 0.5 s idle."""
    if args.smoke:
        args.generations, args.idle = min(args.generations, 30), 0.5
    if args.package:
        sys.exit(0 if run_soak(args.package, args.generations, args.threads, args.seed, args.idle) else 1)
    with tempfile.TemporaryDirectory() as work:
        if args.smoke:
            package = smoke_kit(args.kit, Path(work)).package
        else:
            print(f"building a random-weight {args.preset} int8 package", file=sys.stderr, flush=True)
            package = build_package(args.preset, Path(work))
        # A fresh process without torch: its memory is the runtime's alone, as in an app.
        child = [sys.executable, __file__, "soak", "--package", str(package), "--generations", str(args.generations),
                 "--threads", str(args.threads), "--seed", str(args.seed), "--idle", str(args.idle)]
        sys.exit(subprocess.run(child).returncode)


# -- startup ----------------------------------------------------------------------------------------------------

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


def startup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model package directory")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgegpt-desktop-bundle"),
                        help="where the bundle is built (reused when present)")
    parser.add_argument("--json", action="store_true")


def startup(args: argparse.Namespace) -> None:
    """The desktop example's start-up and time to first token, frozen (PyInstaller) and run by Python, side by
    side, plus the frozen bundle's size.

    Builds the bundle (examples/freeze_desktop_chat.py) into --work unless it is there already, then runs
    both apps in scripted mode (`--send TEXT --quit-when-done`, greedy, 16 new tokens) alternately, --runs
    times after one warm-up round (file cache), and prints the medians of what each reports: process start to
    window shown, to model ready, Send to first token in the window, and start to first token. The frozen
    app runs with a bare environment (PATH=/usr/bin:/bin, no PYTHONPATH), as on a machine without Python.
    Needs a display: run it under Xvfb (`xvfb-run -a python benchmarks/serving.py startup ...`).

    --smoke: the smoke kit's package, one run after the warm-up; the frozen app only if its bundle is in --work
    already (freezing takes minutes), and nothing without a display (each skip says why)."""
    if args.smoke:
        args.model, args.runs = args.model or smoke_kit(args.kit, scratch_dir("serving")).package, 1
    if args.model is None:
        raise SystemExit("give --model PACKAGE_DIR (or --smoke)")
    if not os.environ.get("DISPLAY"):
        if args.smoke:
            skip("startup", "no DISPLAY: run under Xvfb (xvfb-run -a python benchmarks/serving.py startup ...)")
            return
        raise SystemExit("no DISPLAY: run under Xvfb (xvfb-run -a python benchmarks/serving.py startup ...)")
    executable = args.work / "desktop_chat" / "desktop_chat"
    if not executable.exists() and not args.smoke:
        subprocess.run([sys.executable, str(REPO / "examples" / "freeze_desktop_chat.py"), "--out", str(args.work)],
                       check=True)
    flags = [str(args.model.resolve()), "--send", MESSAGE, "--quit-when-done", "--max-new-tokens", "16",
             "--temperature", "0"]
    display = {k: os.environ[k] for k in ("DISPLAY", "XAUTHORITY") if k in os.environ}  # xvfb-run sets both
    variants = {"python": ([sys.executable, str(REPO / "examples" / "desktop_chat.py"), *flags], dict(os.environ))}
    size = None
    if executable.exists():
        size = sum(p.stat().st_size for p in executable.parent.rglob("*") if p.is_file() and not p.is_symlink())
        variants = {"frozen": ([str(executable), *flags], {"PATH": "/usr/bin:/bin", "HOME": str(args.work), **display}),
                    **variants}
    else:
        skip("the frozen app", f"no bundle in {args.work} (--smoke freezes none: it takes minutes)")
    reports: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.runs + 1):  # round 0 warms the file cache and is dropped
        order = list(variants.items()) if round_ % 2 else list(reversed(variants.items()))
        for name, (command, env) in order:
            report = run_once(command, env)
            if round_:
                reports[name].append(report)
    # None: the app never showed that moment (a reply of whitespace alone shows no first token)
    medians = {name: {key: statistics.median(values) if (values := [r[key] for r in rows if r[key] is not None])
                      else None for key in FIGURES}
               for name, rows in reports.items()}
    if args.json:
        print(json.dumps({"machine": machine(), "bundle_bytes": size, "runs": args.runs, "medians": medians}))
        return
    bundle = f"bundle {size / 2**20:.1f} MiB ({size:,} bytes)" if size is not None else "no bundle"
    print(f"{machine()}; {args.model}; medians of {args.runs} runs; {bundle}")
    print(f"{'':8} {'start→window':>13} {'start→ready':>12} {'Send→token':>11} {'start→token':>12}")
    for name, figures in medians.items():
        print(f"{name:8} " + " ".join(f"{figures[key]:>{width}.3f}" if figures[key] is not None else f"{'–':>{width}}"
                                      for key, width in zip(FIGURES, (13, 12, 11, 12))))


COMMANDS = {"load": (load_options, load), "soak": (soak_options, soak), "startup": (startup_options, startup)}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
