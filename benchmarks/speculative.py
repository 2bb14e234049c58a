"""Speculative decoding: how much faster a draft model and prompt lookup decode, what their passes cost, which
draft recipe a target agrees with, and the target's own text as draft data.

    python benchmarks/speculative.py run --target-checkpoint SMALL_CKPT --draft-checkpoint DRAFT_CKPT \\
        --smol SMOLLM2_INT8 [--work /tmp/spec] [--runs 3] [--genai] [--json]
    python benchmarks/speculative.py costs --model PACKAGE_WITH_DRAFT [--draft DRAFT] [--runs 3]
    python benchmarks/speculative.py draft-recipes --target TARGET --drafts DEFAULT DRAFT [--tokens 8192]
    python benchmarks/speculative.py target-continuations --model TARGET_PACKAGE --out continuations.txt
    python benchmarks/speculative.py COMMAND --smoke        # seconds, on a tiny random model

Prompts and held-out text come from the tinyshakespeare split (common.shakespeare_split: the first 90% of its
characters train, the last 10% are held out). Figures, with the commands that gave them: docs/benchmarks.md.
"""


from __future__ import annotations

import argparse
import collections
import fcntl
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common import SHAKESPEARE, machine, pydoc_topics_text, scratch_dir, shakespeare_split, skip, smoke_kit, subcommands

LOCK = Path("/tmp/edgegpt-cpu.lock")
OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
SAMPLINGS = {
    "greedy": {"temperature": 0.0, "repetition_penalty": 1.0, **OFF},
    "T 0.8": {"temperature": 0.8, "repetition_penalty": 1.0, **OFF},
    "T 0.8 rep 1.1": {"temperature": 0.8, "repetition_penalty": 1.1, **OFF},
}
# mode -> (uses the draft model, prompt lookup)
MODES = {"plain": (False, False), "draft": (True, False), "lookup": (False, True), "draft+lookup": (True, True)}

# Grounded prompts: (pydoc topic, task). The question of an "answer" task follows the colon.
GROUNDED = (
    ('The "return" statement', "typos"),
    ('The "global" statement', "rewrite"),
    ("Truth Value Testing", "summarise"),
    ("Modules", "answer: Can a program assign a new dictionary to a module's __dict__ attribute?"),
    ("Boolean operations", "typos"),
    ('The "assert" statement', "rewrite"),
    ('The "global" statement', "summarise"),
    ('The "return" statement', "answer: What happens when return leaves a try statement that has a finally clause?"),
)
TASKS = {
    "typos": "Fix the typos in the following text. Reply with the corrected text only.",
    "rewrite": "Rewrite the following text so that it is easier to read, keeping every fact in it.",
    "summarise": "Summarise the following text in a few sentences.",
    "answer": "Answer the question using only the text below, and quote the sentence of the text that answers it.",
}
OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some good habits for staying healthy while working at a desk all day?",
    "Explain how a rainbow forms, as you would to a ten-year-old.",
    "Write a poem about the first snow of winter.",
    "Give me some ideas for a birthday party for my grandmother, who loves gardening.",
    "Why do people enjoy listening to sad music?",
)


@dataclass
class Prompt:
    name: str
    kind: str  # what it is: "continuation", "grounded" or "open-ended"
    start: Callable[..., object]  # (generator, **options) -> Stream
    ids: list[int] | None = None  # the prompt's token ids, when it is a plain continuation


@dataclass
class Row:
    """One (part, prompt kind, sampling, mode): per-run sums, and what speculation did over all runs."""

    part: str
    kind: str
    sampling: str
    mode: str
    tokens: list[int] = field(default_factory=list)  # per run: tokens after the first, over the prompts
    seconds: list[float] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    made: int = 0
    outputs: dict[str, list] = field(default_factory=dict)  # prompt -> first greedy run's output
    same: int | None = None  # greedy: prompts whose text equals plain decoding's

    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.tokens, self.seconds) if s > 0]

    def figures(self, plain: Row | None) -> dict:
        rates = self.rates()
        ratios = [a / b for a, b in zip(rates, plain.rates())] if plain else []
        speculated = self.mode != "plain"
        return {
            "part": self.part, "prompts": self.kind, "sampling": self.sampling, "mode": self.mode,
            "acceptance": round(self.accepted / self.proposed, 3) if speculated and self.proposed else None,
            "tokens_per_step": round(self.made / self.steps, 2) if speculated and self.steps else 1.0,
            "decode_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "runs_tokens_per_s": [round(r, 1) for r in rates],
            "x_plain": round(statistics.median(ratios), 3) if ratios else None,
            "same_text": None if self.same is None else f"{self.same}/{len(self.outputs)}",
        }


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


@contextmanager
def quiet_machine(args: argparse.Namespace, notes: dict) -> Iterator[None]:
    """Hold the shared CPU lock, wait (a while) for the load to settle, and note the load averages."""
    notes["load_before_lock"] = loadavg()
    if args.no_lock:  # trying the script out: no figures to keep
        notes["load_at_start"] = notes["load_at_end"] = loadavg()
        yield
        return
    with open(LOCK, "a") as lock:
        t0 = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        notes["lock_wait_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        while loadavg()[0] >= args.quiet_load and time.monotonic() - t0 < args.quiet_wait:
            time.sleep(5)
        notes["load_at_start"] = loadavg()
        try:
            yield
        finally:
            notes["load_at_end"] = loadavg()


def timed(stream) -> tuple[int, float, list]:
    """(tokens after the first, seconds from the first to the last, the items) of one generation."""
    items, first = [], None
    for item in stream:
        if first is None:
            first = time.perf_counter()
        items.append(item)
    end = time.perf_counter()
    return max(stream.completion_tokens - 1, 0), (end - first) if first is not None else 0.0, items


# -- the prompts ---------------------------------------------------------------------------------------------


def shakespeare_prompts(tokenizer, held_out: str, count: int, length: int, new: int) -> list[Prompt]:
    """`count` prompts of `length` tokens, evenly spaced over the held-out text."""
    ids = tokenizer.encode(held_out).ids
    step = (len(ids) - length) // count
    prompts = []
    for i in range(count):
        window = ids[i * step: i * step + length]

        def start(g, window=window, **options):
            return g.stream_tokens(window, max_new_tokens=new, stop_at_eos=False, **options)
        prompts.append(Prompt(f"val@{i * step}", "continuation", start, window))
    return prompts


def pydoc_topics(text: str) -> dict[str, str]:
    """Section title -> its text (a title is underlined with as many asterisks)."""
    lines = text.split("\n")
    heads = [i - 1 for i in range(1, len(lines)) if lines[i] and set(lines[i]) == {"*"}
             and len(lines[i]) == len(lines[i - 1])]
    return {lines[h]: "\n".join(lines[h + 2: nxt]).strip() for h, nxt in zip(heads, [*heads[1:], len(lines)])}


def paragraph(section: str, most_chars: int = 1600) -> str:
    """The section's leading paragraphs, up to most_chars, without its grammar rules (lines indented by 3)."""
    kept, size = [], 0
    for block in re.split(r"\n\s*\n", section):
        if block.startswith("   "):
            continue
        if size + len(block) > most_chars and kept:
            break
        kept.append(block)
        size += len(block)
    return "\n\n".join(kept)


def with_typos(text: str, seed: int) -> str:
    """Swap two neighbouring letters in about one word of ten (words of 5+ letters)."""
    rng = random.Random(seed)

    def swap(m: re.Match) -> str:
        word = m.group(0)
        if rng.random() >= 0.1:
            return word
        i = rng.randrange(1, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return re.sub(r"[A-Za-z]{5,}", swap, text)


def smol_prompts(new: int, topics_text: str, smoke: bool = False) -> list[Prompt]:
    """The grounded prompts, then the open-ended ones (with --smoke: two of each, short paragraphs, to fit a
    tiny model's context)."""
    topics = pydoc_topics(topics_text)
    prompts = []
    for i, (title, task) in enumerate(GROUNDED[:2] if smoke else GROUNDED):
        kind, _, question = task.partition(": ")
        text = paragraph(topics[title])[:120] if smoke else paragraph(topics[title])
        if kind == "typos":
            text = with_typos(text, i)
        content = f"{TASKS[kind]}\n\n{text}" + (f"\n\nQuestion: {question}" if question else "")
        prompts.append(Prompt(f"{kind} {title}", "grounded", chat_start([{"role": "user", "content": content}], new)))
    for i, content in enumerate(OPEN_ENDED[:2] if smoke else OPEN_ENDED):
        prompts.append(Prompt(f"open {i}", "open-ended", chat_start([{"role": "user", "content": content}], new)))
    return prompts


def chat_start(messages: list[dict], new: int):
    def start(g, **options):
        return g.stream_chat(messages, max_new_tokens=new, **options)
    return start


# -- measuring --------------------------------------------------------------------------------------------


def warm_up(prompts: list[Prompt], generators: dict[str, object], samplings: list[str]) -> None:
    """Sessions, allocations, the draft's and the lookup's first calls: one prompt in every setting."""
    for sampling in samplings:
        for mode, generator in generators.items():
            timed(prompts[0].start(generator, seed=0, lookup=MODES[mode][1], **SAMPLINGS[sampling]))


def measure_run(part: str, prompts: list[Prompt], generators: dict[str, object], samplings: list[str], run: int,
                rows: dict[tuple, Row]) -> None:
    """Run `run`: every prompt in every sampling setting and mode, the modes interleaved; fills `rows`."""
    modes = list(generators)
    for p, prompt in enumerate(prompts):
        for sampling in samplings:
            shift = (p + run) % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                row = rows.setdefault((part, prompt.kind, sampling, mode), Row(part, prompt.kind, sampling, mode))
                if len(row.tokens) <= run:
                    row.tokens.append(0)
                    row.seconds.append(0.0)
                stream = prompt.start(generators[mode], seed=1000 * run + p, lookup=MODES[mode][1],
                                      **SAMPLINGS[sampling])
                n, seconds, items = timed(stream)
                row.tokens[run] += n
                row.seconds[run] += seconds
                if stream.speculation is not None:
                    s = stream.speculation
                    row.proposed += s.proposed
                    row.accepted += s.accepted
                    row.steps += s.target_steps
                    row.made += s.tokens
                if run == 0 and sampling == "greedy":
                    # text pieces may split differently when tokens come several at a time: compare the text
                    row.outputs[prompt.name] = "".join(items) if items and isinstance(items[0], str) else items
    done = {key: row for key, row in rows.items() if key[0] == part}
    plain = {key[1:3]: row.rates()[-1] for key, row in done.items() if key[3] == "plain"}
    print(f"{part} run {run + 1}: " + ", ".join(
        f"{k[1][:4]} {k[2]} {k[3]} {r.rates()[-1] / plain[k[1:3]]:.2f}x" for k, r in done.items()
        if k[3] != "plain"), file=sys.stderr, flush=True)


def same_text(rows: dict[tuple, Row]) -> None:
    """Greedy rows: how many prompts gave plain decoding's text (first run)."""
    for key, row in rows.items():
        if key[2] == "greedy":
            reference = rows[(key[0], key[1], "greedy", "plain")].outputs
            row.same = sum(row.outputs[name] == reference[name] for name in row.outputs)


def package(args: argparse.Namespace, given: Path | None, checkpoint: Path | None, name: str) -> Path | None:
    """The int8 package to run: the one given, or `checkpoint` exported under --work (once)."""
    if given is not None or checkpoint is None:
        return given
    out = args.work / f"{name}-int8"
    done = out / ".exported-from"
    stamp = f"{checkpoint.resolve()}:{(checkpoint / 'model.safetensors').stat().st_mtime_ns}"
    if not done.exists() or done.read_text() != stamp:
        from edgegpt.export.package import export_package

        print(f"exporting {checkpoint} int8 to {out}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        export_package(checkpoint, out / "model", quantize=True, gate=False)
        print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        done.write_text(stamp)
    return out / "model"


def train_summary(path: Path | None) -> dict | None:
    """The last JSON line of `edgegpt train --json`'s output (steps, elapsed_s, val_nats_per_char, ...)."""
    if path is None:
        return None
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def cost(summary: dict | None) -> str:
    if not summary:
        return "not given"
    return (f"{summary['elapsed_s'] / 60:.1f} min, {summary['steps']:,} steps, {summary['parameters'] / 1e6:.1f}M "
            f"parameters, val {summary['val_nats_per_char']:.3f} nats/char")


def print_table(results: list[dict], caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="speculative decoding, batch 1, decode tokens/s after the first token", caption=caption)
    for name in ("part", "prompts", "sampling", "mode", "acceptance", "tokens/step", "decode tok/s", "runs",
                 "x plain", "same text", "x own plain"):
        table.add_column(name, justify="left" if name in ("part", "prompts", "sampling", "mode") else "right")
    for r in results:
        table.add_row(r["part"], r["prompts"], r["sampling"], r["mode"],
                      "–" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
                      f"{r['tokens_per_step']:.2f}",
                      "–" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.0f}",
                      " ".join(f"{x:.0f}" for x in r["runs_tokens_per_s"]),
                      "–" if r["x_plain"] is None else f"{r['x_plain']:.2f}",
                      r["same_text"] or "", "" if r.get("genai_x_plain") is None else f"{r['genai_x_plain']:.2f}")
    Console(width=200).print(table)


def run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-checkpoint", type=Path, help="the small target's checkpoint (exported int8 here)")
    parser.add_argument("--draft-checkpoint", type=Path, help="the draft's checkpoint (same tokenizer)")
    parser.add_argument("--target", type=Path, help="instead: the target's model package")
    parser.add_argument("--draft", type=Path, help="instead: the draft's model package")
    parser.add_argument("--smol", type=Path, help="SmolLM2-135M-Instruct int8 model package (chat template)")
    parser.add_argument("--pydoc-topics", type=Path, default=None,
                        help="smol: the pydoc topics as a text file (default: Python's own pydoc_data)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="shakespeare: the text prompts come from")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spec"), help="exported packages, genai models")
    parser.add_argument("--target-summary", type=Path, help="the output of `edgegpt train --json` for the target")
    parser.add_argument("--draft-summary", type=Path, help="the output of `edgegpt train --json` for the draft")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=6, help="shakespeare prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128, help="shakespeare: tokens per generation")
    parser.add_argument("--chat-tokens", type=int, default=200, help="smol: most tokens per reply")
    parser.add_argument("--samplings", nargs="*", default=list(SAMPLINGS), choices=list(SAMPLINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet-load", type=float, default=1.0, help="wait for the 1-min load to fall below this")
    parser.add_argument("--quiet-wait", type=float, default=180, help="at most this many seconds")
    parser.add_argument("--no-lock", action="store_true", help="trying the script out: no lock, no waiting")
    parser.add_argument("--genai", action="store_true", help="also onnxruntime-genai 0.18 on the shakespeare target")
    parser.add_argument("--peers-work", dest="peers", type=Path, default=Path("/tmp/peers"),
                        help="`runtimes.py setup`'s folder (venv-peers, venv-builder)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def run(args: argparse.Namespace) -> None:
    """Speculative decoding side by side: plain decoding, a draft model, prompt lookup and both, in one run.

    Two parts (each runs when its models are given):

    shakespeare  a `small` target and a draft distilled from it (`edgegpt train --teacher TARGET_CKPT`), both
                 exported int8 (`export_package(..., quantize=True)`, cached under --work; or pass packages with
                 --target/--draft), continuing prompts cut from the tinyshakespeare validation split (the last
                 10% of its characters): --prompt-tokens of text, then exactly --new-tokens tokens (eos ignored).
                 Modes: plain, draft, lookup, draft+lookup.
    smol         SmolLM2-135M-Instruct int8 through its chat template (stream_chat), plain and prompt lookup, on
                 grounded prompts (fix the typos of / rewrite / summarise / answer a question quoting a paragraph
                 of Python's own documentation, pydoc topics, pasted into the prompt) and on open-ended ones.

    Sampling settings: greedy; temperature 0.8; temperature 0.8 with repetition penalty 1.1 (top-k, top-p and
    min-p off everywhere, so "temperature 0.8" is exactly that). Each generation is timed from its first
    token to its last: decode tokens/s = (tokens - 1) / that time, so the prompt's prefill is left out and the
    draft's own prefill of the prompt is counted (it happens after the first token). A run is every prompt
    once in every mode; a row's figure for a run is its tokens over its time summed over the prompts, and the
    table shows the median over --runs runs. Modes interleave (their order rotates with the prompt), because
    this kind of shared 2-core machine moves a lot between passes (docs/benchmarks.md, "Noise"); "x plain" is
    the median over runs
    of the ratio to plain decoding in the same run. Acceptance = guesses kept / guesses checked; tokens/step
    = tokens made per forward pass of the target after the prompt (plain decoding: 1). "same text": the
    greedy prompts whose text equals plain decoding's. It need not be all of them with int8 weights: the
    MatMulNBits kernels (accuracy level 4, int8 activations) compute a position's logits differently in a
    one-token pass and in a four-token one (`formats.py pass-numerics`; docs/benchmarks.md, "Greedy text with
    int8 weights"), both equally far from fp32, so a near-tie can go the other way in a verification and the
    text then goes its own way.

    Timed runs hold the shared lock /tmp/edgegpt-cpu.lock (flock(2), the one `flock /tmp/edgegpt-cpu.lock
    CMD` takes), wait up to --quiet-wait seconds for the 1-minute load average to fall below --quiet-load,
    and report the load averages in the caption.

    --genai also runs onnxruntime-genai 0.18 (PEERS/venv-peers, its model builder in PEERS/venv-builder,
    PEERS = --peers-work, made by `runtimes.py setup`) on the same target checkpoint, int8: plain, with
    the same draft (converted by its builder) and with its n-gram lookup, in a fresh process after each run
    (benchmarks/peers/genai_speculative.py). Its rows: "x plain" = its median over plain edgegpt's (not paired),
    "x own plain" = the ratio to genai's plain decoding in the same process; tokens/step counts every target
    pass its statistics report (its n-gram lookup runs a "re-anchor" pass besides some verifications) and its
    plain steps where the lookup found nothing.

    --smoke: the smoke kit's int8 target with its draft (which computes the target's function) for the
    shakespeare part, and the target as the chat model of the smol part (two short prompts of each kind), 1 run
    of 8 tokens, no lock; SmolLM2 and onnxruntime-genai run only when given and installed."""
    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("speculative"))
        args.target = args.target or kit.package
        args.draft = args.draft or kit.draft_package
        args.target_checkpoint = args.target_checkpoint or kit.checkpoint
        args.draft_checkpoint = args.draft_checkpoint or kit.draft_checkpoint
        args.smol = args.smol or kit.package
        args.data = kit.text
        args.work = scratch_dir("speculative")
        args.runs, args.prompts, args.prompt_tokens, args.new_tokens, args.chat_tokens = 1, 2, 16, 8, 8
        args.no_lock = True
    args.work.mkdir(parents=True, exist_ok=True)

    from edgegpt.runtime import Generator

    target = package(args, args.target, args.target_checkpoint, "target")
    draft = package(args, args.draft, args.draft_checkpoint, "draft")
    parts: list[tuple[str, list[Prompt], dict]] = []
    if target is not None and draft is not None:
        plain = Generator.load(target, provider="cpu", threads=args.threads, draft=None)
        guided = Generator.load(target, provider="cpu", threads=args.threads, draft=draft)
        held_out = shakespeare_split(args.data, smoke=args.smoke)[1]
        prompts = shakespeare_prompts(plain.package.tokenizer, held_out, args.prompts, args.prompt_tokens,
                                      args.new_tokens)
        parts.append(("shakespeare", prompts, {"plain": plain, "draft": guided, "lookup": plain,
                                               "draft+lookup": guided}))
    if args.smol is not None:
        smol = Generator.load(args.smol, provider="cpu", threads=args.threads, draft=None)
        topics = args.pydoc_topics.read_text(encoding="utf-8") if args.pydoc_topics else pydoc_topics_text()
        parts.append(("smol", smol_prompts(args.chat_tokens, topics, args.smoke), {"plain": smol, "lookup": smol}))
    else:
        skip("smol", "no --smol package given")
    if not parts:
        raise SystemExit("give --target-checkpoint and --draft-checkpoint (or --target and --draft), and/or --smol")

    genai_paths: dict | Exception | None = None
    if args.genai and args.target_checkpoint and args.draft_checkpoint:
        from peers import genai_speculative

        try:  # built before the timed part
            genai_paths = genai_speculative.prepare(args.work, args.peers, args.target_checkpoint,
                                                    args.draft_checkpoint, args.threads)
        except Exception as e:
            genai_paths = e
    notes: dict = {"machine": machine(), "threads": args.threads, "runs": args.runs}
    rows: dict[tuple, Row] = {}
    genai_rows: list[dict] = []
    genai_samples: list[dict] = []
    if isinstance(genai_paths, Exception):
        genai_rows = [genai_speculative.skipped_row(f"{type(genai_paths).__name__}: {genai_paths}")]
    with quiet_machine(args, notes):
        t0 = time.perf_counter()
        for name, prompts, generators in parts:
            warm_up(prompts, generators, args.samplings)
        # Runs interleave everything, genai included (a fresh process per run): a noisy spell of this shared
        # machine then hits every row alike.
        for run_index in range(args.runs):
            for name, prompts, generators in parts:
                measure_run(name, prompts, generators, args.samplings, run_index, rows)
            if isinstance(genai_paths, dict) and not genai_rows:
                try:
                    genai_samples.append(genai_speculative.run_once(args, [p.ids for p in parts[0][1]],
                                                                    genai_paths, run_index))
                except Exception as e:  # reported as a row; the rest of the table still stands
                    genai_rows = [genai_speculative.skipped_row(f"{type(e).__name__}: {e}")]
        notes["timed_s"] = round(time.perf_counter() - t0)
    same_text(rows)
    if genai_samples and not genai_rows:
        genai_rows = genai_speculative.rows(genai_samples)

    order = {"parts": [p[0] for p in parts], "kinds": ["continuation", "grounded", "open-ended"],
             "samplings": list(SAMPLINGS), "modes": list(MODES)}
    keys = sorted(rows, key=lambda k: (order["parts"].index(k[0]), order["kinds"].index(k[1]),
                                       order["samplings"].index(k[2]), order["modes"].index(k[3])))
    results = [rows[k].figures(rows.get((k[0], k[1], k[2], "plain"))) for k in keys]
    for row in genai_rows:  # genai's runs are not paired with edgegpt's: the ratio of the medians
        plain = next((r for r in results if r["part"] == row["part"] and r["sampling"] == row["sampling"]
                      and r["mode"] == "plain"), None)
        if plain and row["decode_tokens_per_s"]:
            row["x_plain"] = round(row["decode_tokens_per_s"] / plain["decode_tokens_per_s"], 3)
    results += genai_rows
    notes["draft_training"] = cost(train_summary(args.draft_summary))
    notes["target_training"] = cost(train_summary(args.target_summary))
    notes["target"], notes["draft"], notes["smol"] = str(target), str(draft), str(args.smol)
    caption = (f"{notes['machine']}, {args.threads} threads, {args.runs} runs (median); load average "
               f"{' '.join(map(str, notes['load_at_start']))} at start, {' '.join(map(str, notes['load_at_end']))} at "
               f"end (before the lock: {' '.join(map(str, notes['load_before_lock']))}); timed {notes['timed_s']} s. "
               f"Draft training: {notes['draft_training']}; target: {notes['target_training']}.")
    print_table(results, caption)
    for r in results:
        if r.get("skipped"):
            print(f"{r['mode']} {r['sampling']}: skipped: {r['skipped']}")
    if args.json:
        print(json.dumps({"notes": notes, "rows": results}))



# -- costs ------------------------------------------------------------------------------------------------------


def costs_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="a package with a draft (`edgegpt export --draft`)")
    parser.add_argument("--draft", type=Path, help="a draft package (default: the model package's own)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text whose held-out split is continued")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)


def costs(args: argparse.Namespace) -> None:
    """What the passes of speculative decoding cost: the numbers behind runtime/speculative.py's cost model.

    Generates greedily with the package's draft (or --draft) from windows of the held-out split, timing every
    forward pass as it happens inside the speculative loop: the target's by the number of tokens it runs, the
    draft's likewise (its steps of one token are its guesses, of two its catch-up after a pass whose guesses
    all held). Prints the median milliseconds of each, and each target length's cost in one-token passes beside
    the model's pass_cost(k) and the draft's one-token step against DRAFT_GUESS_COST.

    --smoke: the smoke kit's int8 target and draft, 2 prompts of 16 new tokens, one run."""
    from edgegpt.runtime import Generator, speculative

    # lengths seen fewer times than this are left out (prompts' prefills, rare lengths); a smoke run sees few
    least = 10
    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("speculative"))
        args.model, args.data = args.model or kit.package, kit.text
        args.draft = args.draft or (None if args.model != kit.package else kit.draft_package)
        args.prompts, args.new_tokens, args.runs, least = 2, 16, 1, 1
    if args.model is None:
        raise SystemExit("give --model PACKAGE_WITH_DRAFT (or --smoke)")
    generator = Generator.load(args.model, provider="cpu", threads=args.threads, draft=args.draft or "auto")
    if generator.draft is None:
        raise SystemExit(f"{args.model} has no draft: pass --draft")
    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)

    def timed_forward(model, name: str) -> None:
        forward = model.forward

        def run_timed(ids, cache):
            start = time.perf_counter()
            result = forward(ids, cache)
            times[(name, len(ids))].append(time.perf_counter() - start)
            return result
        model.forward = run_timed

    timed_forward(generator, "target")
    timed_forward(generator.draft, "draft")
    ids = generator.package.tokenizer.encode(shakespeare_split(args.data, smoke=args.smoke)[1]).ids
    prompt_tokens = 16 if args.smoke else 64
    step = (len(ids) - prompt_tokens) // args.prompts
    for _ in range(args.runs):
        for i in range(args.prompts):
            stream = generator.stream_tokens(ids[i * step: i * step + prompt_tokens], max_new_tokens=args.new_tokens,
                                             stop_at_eos=False, temperature=0)
            list(stream)
    one = statistics.median(times[("target", 1)]) if times[("target", 1)] else None
    print(f"{machine()}; {args.model}, {args.threads} threads; passes inside greedy speculative runs "
          f"(the prompt's prefill left out)")
    print(f"{'model':6} {'tokens':>6} {'median ms':>10} {'passes':>7} {'× 1-token target pass':>22} {'cost model':>11}")
    for (name, length), seconds in sorted(times.items()):
        if length > 16 or len(seconds) < least:
            continue
        median = statistics.median(seconds)
        model = speculative.pass_cost(length - 1) if name == "target" else speculative.DRAFT_GUESS_COST
        relative = f"{median / one:22.2f} {model:11.2f}" if one is not None else f"{'–':>22} {'–':>11}"
        print(f"{name:6} {length:6d} {1000 * median:10.3f} {len(seconds):7d} {relative}")


# -- draft-recipes ----------------------------------------------------------------------------------------------


def draft_recipes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=Path, help="the target's checkpoint")
    parser.add_argument("--drafts", type=Path, nargs="+", help="draft checkpoints")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text whose held-out split is scored")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json", action="store_true")


def draft_recipes(args: argparse.Namespace) -> None:
    """How well drafts agree with their target: which distillation recipe makes the better draft.

        edgegpt train --preset small --vocab-size 1024 --block-size 256 --data tinyshakespeare.txt --out TARGET
        edgegpt train --teacher TARGET --preset nano --data tinyshakespeare.txt --time-budget 8 --out DEFAULT
        edgegpt train --teacher TARGET --preset nano --as-draft --data tinyshakespeare.txt --time-budget 8 \\
            --out DRAFT
        python benchmarks/speculative.py draft-recipes --target TARGET --drafts DEFAULT DRAFT [--tokens 8192]

    Speculative decoding keeps a drafted token with probability sum(min(p, q)) over the vocabulary, p the
    target's distribution and q the draft's (greedy: when their argmaxes agree), so a draft is as good as
    those two numbers are high, whatever its perplexity. Both are measured teacher-forced, in PyTorch, on the
    first --tokens tokens of the held-out split, in windows of the draft's context: argmax agreement, and
    sum(min(p, q)) at temperatures 0.8 and 1. Beside them: each draft's validation loss (nats per character),
    steps and minutes from its `train_state.json`.

    --smoke: the smoke kit's target and draft checkpoints, 512 held-out tokens in windows of 64."""
    import torch

    from edgegpt.checkpoint import load_checkpoint

    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("speculative"))
        args.target, args.drafts = args.target or kit.checkpoint, args.drafts or [kit.draft_checkpoint]
        args.data, args.tokens = kit.text, 512
    if args.target is None or not args.drafts:
        raise SystemExit("give --target CHECKPOINT and --drafts CHECKPOINT ... (or --smoke)")
    target, tokenizer = load_checkpoint(args.target)
    ids = tokenizer.encode(shakespeare_split(args.data, smoke=args.smoke)[1]).ids
    rows = []
    for path in args.drafts:
        draft, draft_tokenizer = load_checkpoint(path)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{path} has another tokenizer than the target")
        window = min(draft.cfg.max_len, target.cfg.max_len, 64 if args.smoke else target.cfg.max_len)
        usable = min(args.tokens, len(ids)) // window * window
        batch = torch.tensor(ids[:usable]).view(-1, window)
        with torch.no_grad():
            p_logits, q_logits = target.eval()(batch).float(), draft.eval()(batch).float()
        row = {"draft": str(path), "parameters": sum(t.numel() for t in draft.parameters()),
               "argmax_agreement": (p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()}
        for temperature in (0.8, 1.0):
            p, q = (torch.softmax(logits / temperature, -1) for logits in (p_logits, q_logits))
            row[f"kept_at_T{temperature:g}"] = torch.minimum(p, q).sum(-1).mean().item()
        state = path / "train_state.json"
        if state.exists():
            saved = json.loads(state.read_text())
            options = saved["options"]
            row.update(steps=saved["step"], minutes=round(saved["elapsed_s"] / 60, 1),
                       val_per_char=saved["best_val"]["nats_per_char"],
                       recipe="as draft (alpha 0, T 1)" if options.get("as_draft") else
                       f"alpha {options['alpha']}, T {options['temperature']:g}")
        rows.append(row)

    print(f"{machine()}; target {args.target}; {usable:,} held-out tokens, teacher-forced")
    print(f"{'draft':40} {'recipe':26} {'steps':>6} {'min':>5} {'val/char':>8} {'argmax':>7} {'T0.8':>6} {'T1':>6}")
    for row in rows:
        print(f"{row['draft'][-40:]:40} {row.get('recipe', '?'):26} {row.get('steps', '?'):>6} "
              f"{row.get('minutes', '?'):>5} {row.get('val_per_char', float('nan')):8.3f} "
              f"{row['argmax_agreement']:7.3f} "
              f"{row['kept_at_T0.8']:6.3f} {row['kept_at_T1']:6.3f}")
    if args.json:
        print(json.dumps(rows))


# -- target-continuations ---------------------------------------------------------------------------------------


def target_continuations_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="the target's model package")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text whose training split is continued")
    parser.add_argument("--out", type=Path, help="where the continuations are written")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--greedy-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)


def target_continuations(args: argparse.Namespace) -> None:
    """The target's own continuations of its training text, as extra data for a draft (on-policy distillation).

        python benchmarks/speculative.py target-continuations --model TARGET_PACKAGE --out continuations.txt
        edgegpt train --teacher TARGET --as-draft --preset nano --data train-split.txt \\
            --data continuations.txt --val-data held-out.txt ...

    A draft distilled on the corpus learns the target where the corpus goes; at generation time the text is
    the target's own, and there the two may part more often (docs/benchmarks.md, "Drafting the target's own
    text"). This writes continuations of windows of the training split: --prompt-tokens of text, then
    --new-tokens from the target, greedy for --greedy-share of them and sampled at temperature 1 for the rest
    (seeded), one continuation per paragraph, until --tokens new tokens are written.

    --smoke: the smoke kit's int8 target, 48 new tokens in continuations of 16."""
    from edgegpt.runtime import Generator

    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("speculative"))
        args.model, args.data = args.model or kit.package, kit.text
        args.out = args.out or scratch_dir("speculative") / "continuations.txt"
        args.tokens, args.prompt_tokens, args.new_tokens = 48, 16, 16
    if args.model is None or args.out is None:
        raise SystemExit("give --model PACKAGE and --out FILE (or --smoke)")
    generator = Generator.load(args.model, provider="cpu", draft=None)
    training_text = shakespeare_split(args.data, smoke=args.smoke)[0]
    ids = generator.package.tokenizer.encode(training_text).ids
    rng = random.Random(args.seed)
    written, pieces, t0 = 0, [], time.perf_counter()
    while written < args.tokens:
        start = rng.randrange(len(ids) - args.prompt_tokens)
        greedy = rng.random() < args.greedy_share
        stream = generator.stream_tokens(ids[start : start + args.prompt_tokens], max_new_tokens=args.new_tokens,
                                         stop_at_eos=False, temperature=0.0 if greedy else 1.0,
                                         seed=rng.randrange(1 << 30), top_k=0, top_p=1.0, min_p=0.0,
                                         repetition_penalty=1.0)
        new = list(stream)
        pieces.append(generator.package.tokenizer.decode(ids[start : start + args.prompt_tokens] + new))
        written += len(new)
        if len(pieces) % 200 == 0:
            print(f"{written:,} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.write_text("\n\n".join(pieces) + "\n", encoding="utf-8")
    print(f"{machine()}; {len(pieces)} continuations, {written:,} new tokens in {time.perf_counter() - t0:.0f} s "
          f"-> {args.out}")


COMMANDS = {
    "run": (run_options, run),
    "costs": (costs_options, costs),
    "draft-recipes": (draft_recipes_options, draft_recipes),
    "target-continuations": (target_continuations_options, target_continuations),
}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
