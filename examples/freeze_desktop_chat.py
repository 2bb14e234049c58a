"""Freeze examples/desktop_chat.py with PyInstaller into a folder that runs without Python (onedir).

    python examples/freeze_desktop_chat.py --out dist        # then: dist/desktop_chat/desktop_chat [MODEL_DIR]

The bundle holds the torch-free runtime only: numpy, onnxruntime, tokenizers, jinja2 (chat templates),
edgegpt's core and runtime, and Tk. The training and export stacks are installed beside it in a
development environment, and PyInstaller's analysis follows optional imports (onnxruntime's quantization
tools import onnx and torch, jinja2 and others reach for more), so they are excluded by name here, and the
finished bundle is searched for them: the build fails if any got in. The model package is not bundled: the
app opens one at run time (a package is a folder the user chooses, like a document).

Prints the bundle's folder, its size and the build's time. --work keeps PyInstaller's work folder (a rebuild
reusing it is faster); by default it is a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "desktop_chat.py"
NAME = "desktop_chat"

# Never in the bundle: the training/export stacks, the server's, the CLI's and the peers measured against.
FORBIDDEN = ("torch", "onnx", "onnxscript", "onnx_ir", "transformers", "safetensors", "starlette", "uvicorn")
EXCLUDES = (
    *FORBIDDEN,
    "torchvision", "torchaudio", "triton", "sympy", "mpmath", "networkx",  # torch's own dependencies
    "onnxruntime.quantization", "onnxruntime.transformers", "onnxruntime.tools",  # import onnx and torch
    "optimum", "onnxruntime_genai", "accelerate", "huggingface_hub", "gguf", "sentencepiece",  # [bench] peers
    "fastapi", "httpx", "anyio", "h11", "httptools", "uvloop", "websockets", "watchfiles",  # serving stacks
    "typer", "click", "rich", "pygments",  # the CLI's
    "edgegpt.train", "edgegpt.export", "edgegpt.cli", "edgegpt.server", "edgegpt.model",  # torch-side edgegpt
    "scipy", "pandas", "matplotlib", "PIL", "IPython", "pytest", "hypothesis", "setuptools", "pkg_resources",
    # Optional imports of what the bundle does hold, never taken by the app: numpy's build-config printer
    # (yaml), f2py and test helpers, onnxruntime's DLL lister (psutil), and TLS (megabytes; no network here).
    "yaml", "charset_normalizer", "numpy.f2py", "numpy.testing", "psutil", "ssl", "_ssl",
)


def bundle_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def bundle_modules(folder: Path) -> set[str]:
    """Top-level names of everything in the bundle: Python modules in its archives, and its files' folders."""
    from PyInstaller.archive.readers import pkg_archive_contents

    names = {entry.replace("\\", "/").split("/")[0].split(".")[0]
             for entry in pkg_archive_contents(str(folder / NAME), recursive=True)}
    internal = folder / "_internal"
    names |= {path.name.split(".")[0] for path in internal.iterdir()} if internal.is_dir() else set()
    return names


def stage_runtime(folder: Path) -> Path:
    """edgegpt's torch-free part (the package's __init__, core/ and runtime/) copied into `folder` as the
    import layout `edgegpt/{core,runtime}`: what the analysis is pointed at instead of the installed edgegpt.

    Why a copy: runtime/ becomes edgegpt.runtime through the packaging's package-dir mapping, which an
    editable install serves with an import hook that PyInstaller's analysis cannot see ("Hidden import
    'edgegpt.runtime' not found"). A copy of only these parts also keeps every torch-side edgegpt module
    out of reach of the analysis."""
    import importlib.util

    package = Path(importlib.util.find_spec("edgegpt").submodule_search_locations[0])
    runtime = Path(importlib.util.find_spec("edgegpt.runtime").origin).parent
    target = folder / "edgegpt"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package / "core", target / "core", ignore=skip)
    shutil.copytree(runtime, target / "runtime", ignore=skip)
    shutil.copy2(package / "__init__.py", target / "__init__.py")
    return folder


def has_debug_sections(path: Path) -> bool:
    """Whether an ELF file (64-bit, little-endian) carries DWARF sections (.debug_*)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        shoff, = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        if not shoff or not shnum or shstrndx >= shnum:
            return False
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, names_offset, names_size = sections[shstrndx]
        f.seek(names_offset)
        names = f.read(names_size)
    return any(names[name:].startswith(b".debug_") for name, *_ in sections)


def strip_debug_info(bundle: Path) -> int:
    """`strip --strip-debug` the bundle's files that carry debug sections; returns the bytes saved.

    Why not PyInstaller's --strip: it strips every library, auditwheel-patched ones too, and numpy's OpenBLAS
    then fails to load ("ELF load command address/offset not page-aligned"). The files with DWARF sections are
    the interpreter's own (libpython and lib-dynload of a Python built with -g, as pyenv builds it): a good
    part of the bundle (its size: docs/benchmarks.md). Skipped when binutils' strip is absent."""
    strip = shutil.which("strip")
    if strip is None:
        return 0
    saved = 0
    for path in sorted(bundle.rglob("*")):
        if path.is_file() and not path.is_symlink() and has_debug_sections(path):
            before = path.stat().st_size
            subprocess.run([strip, "--strip-debug", str(path)], check=True)
            saved += before - path.stat().st_size
    return saved


def freeze(out: Path, work: Path | None = None) -> Path:
    """Build the onedir bundle into out/desktop_chat; returns that folder."""
    out = out.resolve()
    with tempfile.TemporaryDirectory(prefix="freeze-desktop-chat-") as scratch:
        work = (work or Path(scratch)).resolve()
        staged = stage_runtime(Path(scratch) / "src")
        command = [sys.executable, "-m", "PyInstaller", str(SCRIPT), "--name", NAME, "--onedir", "--noconfirm",
                   "--distpath", str(out), "--workpath", str(work / "build"), "--specpath", str(work),
                   "--log-level", "WARN", "--noupx", "--paths", str(staged),
                   # Imported inside functions (after the window is up), which the analysis also follows;
                   # named so that a refactor of those imports cannot drop them silently.
                   "--hidden-import", "edgegpt.runtime", "--hidden-import", "edgegpt.runtime.transcript",
                   *[a for module in EXCLUDES for a in ("--exclude-module", module)]]
        subprocess.run(command, check=True)
    bundle = out / NAME
    strip_debug_info(bundle)
    leaked = sorted(set(FORBIDDEN) & bundle_modules(bundle))
    if leaked:
        raise SystemExit(f"freeze_desktop_chat: error: the bundle contains {', '.join(leaked)}; exclude them")
    return bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Freeze the desktop chat example into a folder (PyInstaller onedir).")
    parser.add_argument("--out", type=Path, required=True, help="where the bundle's folder (desktop_chat/) goes")
    parser.add_argument("--work", type=Path, default=None, help="keep PyInstaller's work folder here")
    args = parser.parse_args(argv)
    if shutil.which("pyinstaller") is None and not _importable("PyInstaller"):
        parser.error("PyInstaller is not installed (pip install pyinstaller)")
    started = time.perf_counter()
    bundle = freeze(args.out, args.work)
    size = bundle_size(bundle)
    print(f"bundle: {bundle}")
    print(f"executable: {bundle / NAME}")
    print(f"size: {size / 2**20:.1f} MiB ({size:,} bytes)")
    print(f"built in {time.perf_counter() - started:.0f} s")
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
