"""Every runtime's model made from one checkpoint, cached under WORK/models/<checkpoint label>/: the
Hugging Face directory every peer reads, and what each driver's `prepare` builds from it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from .setup import builder_python, llama_bin, peers_python


def files_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def model_label(checkpoint: Path) -> str:
    """A folder name that changes when the checkpoint's weights do, so a retrained checkpoint is rebuilt."""
    weights = checkpoint / "model.safetensors"
    digest = hashlib.sha256(f"{checkpoint.resolve()}:{weights.stat().st_mtime_ns}:{weights.stat().st_size}".encode())
    return f"{checkpoint.resolve().parent.name}-{digest.hexdigest()[:10]}"


class Models:
    """Where each runtime's model lives and how big its weights are; builds what is missing."""

    def __init__(self, checkpoint: Path, work: Path, threads: int):
        self.checkpoint, self.work, self.threads = checkpoint, work, threads
        self.root = work / "models" / model_label(checkpoint)
        self.root.mkdir(parents=True, exist_ok=True)
        self.peers_python = peers_python(work)
        self.builder_python = builder_python(work)
        self.llama_build = llama_bin(work)
        self.skipped: dict[str, str] = {}
        self.calibration: Path | None = None  # edgegpt's calibration text (None: `edgegpt export`'s default)
        self.int4_rounding: str | None = None  # edgegpt's int4 rounding (None: `edgegpt export`'s default)
        self.cache: dict[str, tuple[Path, int]] = {}  # family-precision -> (model path, bytes of its weights)

    def once(self, directory: Path, build: Callable[[Path], None]) -> Path:
        """Build `directory` unless a previous run finished it (marked by a .done file)."""
        done = directory / ".done"
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            build(directory)
            done.write_text("")
        return directory

    def hf(self) -> Path:
        """The checkpoint as a Hugging Face LlamaForCausalLM directory (`edgegpt convert`)."""
        def build(out: Path) -> None:
            from edgegpt.convert import convert

            convert(self.checkpoint, out)
        return self.once(self.root / "hf", build)

    def need_peers(self) -> None:
        if not self.peers_python.exists():
            raise RuntimeError(f"{self.peers_python} is missing: run `python benchmarks/runtimes.py setup`")

    def prepare(self, family: str, precision: str, build: Callable[[Models, str], tuple[Path, int]]):
        """(model path, bytes of its weights) of `family` at `precision`, made by its driver's `build` once."""
        key = f"{family}-{precision}"
        if key not in self.cache:
            self.cache[key] = build(self, precision)
        return self.cache[key]
