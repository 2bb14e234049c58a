"""What every benchmark shares: where the reference data is and how it splits, what machine this is, how a
table is printed, the one way a benchmark makes a model with random weights, and the smoke kit (a tiny model,
package and text that `--smoke` runs on, so every benchmark runs end to end in seconds).

Nothing here imports edgegpt or torch at import time: `runtimes.py cuda` imports this module before it has
made edgegpt importable from a checkout, and the worker processes of `runtimes.py compare` must stay light."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from edgegpt.model import GPT

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# DESIGN.md's tinyshakespeare convention: the first 90% of the characters train, the last 10% are held out.
HELD_OUT_FRACTION = 0.1
# --smoke: the preset every tiny random model has, and how much text a smoke run reads at most.
SMOKE_PRESET = "nano"
SMOKE_CHARS = 12_000


def machine() -> str:
    """e.g. 'AMD EPYC 9R14 (2 cores), Linux x86_64' — every figure names its machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"


def pydoc_topics_text() -> str:
    """The help topics of Python's documentation (`pydoc_data`), one after another: English that is neither the
    benchmarks' training text nor a pretrained model's own, and ships with Python (no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def smoke_text() -> str:
    """Text for smoke runs where tinyshakespeare is not here."""
    try:
        text = pydoc_topics_text()
    except ImportError:  # a Python built without pydoc_data: any text will do for a smoke run
        text = BENCHMARK_TEXT * 20
    return text[:SMOKE_CHARS]


def shakespeare_split(path: Path = SHAKESPEARE, smoke: bool = False) -> tuple[str, str]:
    """(training text, held-out text) of `path`: its first 90% of characters and its last 10% (DESIGN.md),
    split by the same function `edgegpt train` splits with. With `smoke`, the split of at most the first
    SMOKE_CHARS characters of `path`, or of `smoke_text()` when `path` is not here."""
    from edgegpt.train.corpus import read_text_file, split_documents

    if smoke:
        text = read_text_file(path)[:SMOKE_CHARS] if path.is_file() else smoke_text()
    elif not path.is_file():
        raise SystemExit(f"benchmark skipped: {path} is not here (it lives in the shared data folder; "
                         "--smoke runs without it)")
    else:
        text = read_text_file(path)
    train, held_out = split_documents([text], HELD_OUT_FRACTION)
    return "".join(train), "".join(held_out)


def data_file(path: Path, smoke: bool, work: Path) -> Path:
    """The text file a benchmark trains or reads from: `path`, or with --smoke a small slice written to `work`."""
    if not smoke:
        if not path.is_file():
            raise SystemExit(f"benchmark skipped: {path} is not here (it lives in the shared data folder)")
        return path
    train, held_out = shakespeare_split(path, smoke=True)
    small = work / "smoke-text.txt"
    small.write_text(train + held_out, encoding="utf-8")
    return small


def print_figures(title: str, figures: dict, as_json: bool) -> None:
    """One row per figure (thousands separated), and the same figures as one JSON line with --json."""
    from rich.console import Console
    from rich.table import Table

    report = Table(title=title)
    report.add_column("figure")
    report.add_column("value", justify="right")
    for key, value in figures.items():
        report.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console(width=max(Console().width, 120)).print(report)
    if as_json:
        print(json.dumps(figures))


def skip(what: str, reason: str) -> None:
    """A part of a benchmark that cannot run here (a peer not installed, a file not given): say so and go on."""
    print(f"skipped {what}: {reason}", flush=True)


# The text the random-weight tokenizer learns from: any text will do, the weights are random anyway.
BENCHMARK_TEXT = "edgegpt benchmark text " * 100


def random_model(preset: str, texts: Sequence[str] = (BENCHMARK_TEXT,),
                 vocab_size: int | None = 300, seed: int = 0) -> tuple[GPT, Tokenizer]:
    """(GPT, tokenizer): `preset`'s shape with random weights (torch seed `seed`) and a byte-level BPE
    tokenizer trained on `texts` (vocab_size None: the preset's vocabulary). Enough to measure size, speed and
    memory; its logits are nearly flat, so never judge quality or quantization on it."""
    import torch

    from edgegpt.core.config import preset as make_preset
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    cfg = make_preset(preset)
    tokenizer = train_tokenizer(list(texts), vocab_size or cfg.vocab_size)
    return GPT(cfg).eval(), tokenizer


def random_checkpoint(preset: str, directory: Path, texts: Sequence[str] = (BENCHMARK_TEXT,),
                      vocab_size: int | None = 300) -> Path:
    """`random_model` saved as a checkpoint directory (what export and the converters read)."""
    from edgegpt.checkpoint import save_checkpoint

    model, tokenizer = random_model(preset, texts, vocab_size)
    save_checkpoint(directory, model, tokenizer)
    return directory


# -- the smoke kit ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmokeKit:
    """A tiny random model in every form the benchmarks read, under one folder, built once and shared by
    every smoke run given `--kit` (tests/test_benchmarks.py builds one for all of them). The draft computes
    the target's very function (SMOKE_DRAFT_LAYERS), so speculation keeps its guesses and every multi-token
    path runs."""

    root: Path

    @property
    def text(self) -> Path:  # the training and held-out text, as one file (shakespeare_split cuts it)
        return self.root / "text.txt"

    @property
    def calibration(self) -> Path:  # a little: calibrating on more costs seconds and shows nothing
        return self.root / "calibration.txt"

    @property
    def checkpoint(self) -> Path:
        return self.root / "target"

    @property
    def draft_checkpoint(self) -> Path:
        return self.root / "draft"

    @property
    def package(self) -> Path:  # int8
        return self.root / "target-int8"

    @property
    def draft_package(self) -> Path:  # int8
        return self.root / "draft-int8"

    def ready(self) -> bool:
        return (self.root / ".done").is_file()


# The kit's draft: the target's first layers. The target's later layers add nothing to the residual stream
# (their output projections are zero), so the draft computes the target's very function and its guesses hold.
SMOKE_DRAFT_LAYERS = 2


def drafted_target(model: GPT) -> GPT:
    """`model` with every layer past the first SMOKE_DRAFT_LAYERS silenced (zero output projections)."""
    import torch

    with torch.no_grad():
        for layer in model.layers[SMOKE_DRAFT_LAYERS:]:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def first_layers(model: GPT, count: int) -> GPT:
    """A model of `model`'s first `count` layers, with its embedding, final norm and head."""
    import dataclasses

    from edgegpt.model import GPT

    draft = GPT(dataclasses.replace(model.cfg, n_layers=count)).eval()
    draft.load_state_dict({name: tensor for name, tensor in model.state_dict().items()
                           if not name.startswith("layers.") or int(name.split(".")[1]) < count})
    return draft


# The kit's chat template (ChatML's shape), so chat benchmarks run on it too.
SMOKE_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def smoke_kit(root: Path | None, work: Path) -> SmokeKit:
    """The kit at `root` (built there if it is not yet), or a fresh one under `work` when `root` is None."""
    kit = SmokeKit(root or work / "smoke-kit")
    if kit.ready():
        return kit
    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.export.package import export_package

    kit.root.mkdir(parents=True, exist_ok=True)
    train, held_out = shakespeare_split(smoke=True)
    kit.text.write_text(train + held_out, encoding="utf-8")
    target, tokenizer = random_model(SMOKE_PRESET, [train])
    save_checkpoint(kit.checkpoint, drafted_target(target), tokenizer, chat_template=SMOKE_CHAT_TEMPLATE)
    save_checkpoint(kit.draft_checkpoint, first_layers(target, SMOKE_DRAFT_LAYERS), tokenizer,
                    chat_template=SMOKE_CHAT_TEMPLATE)
    kit.calibration.write_text(train[:1000], encoding="utf-8")
    # Two packages rather than `export --draft`: that scores the draft's agreement and the gates' text, which
    # costs most of a smoke run; the benchmarks take the draft package by its path.
    for checkpoint, package in ((kit.checkpoint, kit.package), (kit.draft_checkpoint, kit.draft_package)):
        export_package(checkpoint, package, quantize=True, gate=False, calibration_data=kit.calibration)
    (kit.root / ".done").write_text("")
    return kit


def add_smoke_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="run end to end in seconds on a tiny random model (checks the benchmark, not the "
                             "product: its figures mean nothing)")
    parser.add_argument("--kit", type=Path, default=None,
                        help="--smoke: the smoke kit folder to use (built there once if missing)")


def subcommands(description: str, commands: dict[str, tuple[Callable, Callable]]) -> argparse.ArgumentParser:
    """A parser with one subcommand per entry of `commands`: name -> (add_options(parser), run(args)); each
    subcommand's help is the first paragraph of its run function's docstring, its description the whole."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_options, run) in commands.items():
        doc = inspect.cleandoc(run.__doc__ or "")
        command = sub.add_parser(name, help=doc.split("\n\n")[0].replace("\n", " "), description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(command)
        add_smoke_options(command)
        command.set_defaults(run=run)
    return parser


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for a benchmark's builds (left in place with --smoke off: a run's outputs are kept)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"edgegpt-{prefix}-"))


# -- commands measured as a user runs them -------------------------------------------------------------------


@dataclass(frozen=True)
class CommandRun:
    """A finished command: its exit status, output, wall time and the peak resident memory of its process."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int


def run_measured(command: Sequence[str], poll_seconds: float = 0.02) -> CommandRun:
    """Run `command` in a fresh process to its end: (exit status, output, wall seconds, peak RSS).

    The peak is the process's VmHWM, read from /proc while it runs (the high-water mark of its own memory
    image, which exec starts afresh): a child's ru_maxrss would start from the parent's RSS at fork, which
    the benchmark process, holding models of its own, can exceed. Only what grows in the last poll interval
    before the exit can be missed. The command's output is read by threads, so a chatty child never blocks."""
    import subprocess
    import threading
    import time

    start = time.perf_counter()
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=stream, k=key: chunks[k].extend(s), daemon=True)
               for key, stream in (("out", process.stdout), ("err", process.stderr))]
    for reader in readers:
        reader.start()
    peak = 0
    while process.poll() is None:
        peak = max(peak, _high_water_bytes(process.pid))
        time.sleep(poll_seconds)
    for reader in readers:
        reader.join()
    return CommandRun(process.returncode, "".join(chunks["out"]), "".join(chunks["err"]),
                      time.perf_counter() - start, peak)


def _high_water_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):  # exited between poll() and the read, or a zombie without a memory map
        pass
    return 0
