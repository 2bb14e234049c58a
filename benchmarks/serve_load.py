"""`edgegpt serve` under load: 1, 2, 4, 8 concurrent clients against one server on loopback, with the server's
slot count varied, side by side with llama.cpp's llama-server (same number of slots) on the same weights.

    python benchmarks/serve_load.py --model PACKAGE_DIR --checkpoint CHECKPOINT_DIR --work /tmp/peers [--json]
    python benchmarks/serve_load.py --model PACKAGE_DIR --gguf MODEL.gguf          # a GGUF you already have
    python benchmarks/serve_load.py --model PACKAGE_DIR                             # edgegpt alone

Same weights: edgegpt's int8 package against llama.cpp Q8_0 made from the same checkpoint the way
compare_runtimes.py makes it (cached under WORK/models/; llama-server is built by
`compare_runtimes.py --setup`, see peers/setup.py). On a shared machine wrap the run in
`flock /tmp/edgegpt-cpu.lock …`: the servers need both cores to themselves. llama-server's two threads
spin-wait for each other between operations, so with one core taken by other work it collapses (measured
here: 1–15 tokens/s beside a test run); the caption gives the load average before and after.

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

from common import SHAKESPEARE, machine
from peers import llama_server
from peers.processes import log

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
        text = SHAKESPEARE.read_text()[-100_000:] if SHAKESPEARE.exists() else Path(__file__).read_text() * 20
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
        skipped[LLAMA] = f"{llama_server.binary(args.work)} is missing: run compare_runtimes.py --setup"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the edgegpt model package to serve")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint: llama.cpp's Q8_0 GGUF is made from it")
    parser.add_argument("--gguf", type=Path, help="instead of --checkpoint: the GGUF llama-server serves")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers"), help="the llama.cpp build, converted models")
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
                        help='more llama-server options, after an = sign: --llama-args="-kvu" (measured: no change)')
    parser.add_argument("--only", nargs="*", choices=(EDGEGPT, LLAMA), default=[EDGEGPT, LLAMA])
    parser.add_argument("--startup-timeout", type=float, default=180, help="seconds for a server to become healthy")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds of silence that fail a request")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    args.work = args.work.resolve()
    if not (args.model / "tokenizer.json").exists():
        parser.error(f"{args.model} is not an edgegpt model package (no tokenizer.json)")
    if args.checkpoint and not (args.checkpoint / "model.safetensors").exists():
        parser.error(f"{args.checkpoint} is not an edgegpt checkpoint (no model.safetensors)")
    if args.prompt_tokens + args.max_tokens + 8 > args.context:
        parser.error(f"--context {args.context} is too small for {args.prompt_tokens} + {args.max_tokens} tokens")
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


if __name__ == "__main__":
    main()
