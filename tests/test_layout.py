"""The layout's promises: the torch-free core and runtime import nothing heavy, and each folder says its job."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import edgegpt.core

HEAVY = ("torch", "onnx", "onnxscript", "safetensors", "transformers")


def imported_after(code: str) -> set[str]:
    """Top-level module names a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_core_imports_only_the_standard_library_and_numpy():
    modules = [f"edgegpt.core.{m.name}" for m in pkgutil.iter_modules(edgegpt.core.__path__)]
    assert {"edgegpt.core.errors", "edgegpt.core.formats", "edgegpt.core.config", "edgegpt.core.io"} <= set(modules)
    loaded = imported_after("\n".join(f"import {m}" for m in modules))
    # What the interpreter loads for an empty program (site hooks, the editable install's finder) is not the core's.
    third_party = loaded - imported_after("pass") - set(sys.stdlib_module_names) - {"edgegpt", "numpy"}
    assert not third_party, f"the core imported {sorted(third_party)}"


def test_the_runtime_imports_neither_torch_nor_onnx():
    loaded = imported_after("import edgegpt.runtime, edgegpt.runtime.decoding, edgegpt.scoring")
    assert not loaded & set(HEAVY)


# The distribution's roots, as the packaging maps them (setup.py): import name -> folder in the repository.
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOTS = {"edgegpt": ROOT / "edgegpt", "edgegpt.export": ROOT / "export", "edgegpt.runtime": ROOT / "runtime"}


def source_packages() -> dict[str, Path]:
    """Every package folder (one with __init__.py, as are all the folders above it) under the roots, by the
    name it imports as, with its __init__.py: read from the tree, so a new folder is checked without a list."""
    packages = {}
    for name, folder in PACKAGE_ROOTS.items():
        for init in sorted(folder.rglob("__init__.py")):
            parts = init.parent.relative_to(folder).parts
            if all((folder.joinpath(*parts[:depth]) / "__init__.py").is_file() for depth in range(len(parts))):
                packages[".".join((name, *parts))] = init
    return packages


PACKAGES = source_packages()


def test_the_tree_holds_the_packages_the_design_names():
    """The walk finds what DESIGN.md's layout promises, so the parametrized check below is not vacuous."""
    assert {"edgegpt", "edgegpt.core", "edgegpt.train", "edgegpt.cli", "edgegpt.convert", "edgegpt.server",
            "edgegpt.export", "edgegpt.runtime"} <= set(PACKAGES)


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_each_folder_states_its_job(name):
    package = importlib.import_module(name)
    assert Path(package.__file__).resolve() == PACKAGES[name], f"{name} imports from {package.__file__}"
    doc = inspect.cleandoc(package.__doc__ or "")
    assert doc, f"{name} has no docstring"
    # More than its own name and a few words: a sentence or two saying what the folder holds and why.
    own = {part.lower() for part in name.split(".")}
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z-]+", doc) if w.lower() not in own]
    assert len(words) >= 12, f"{name}'s docstring does not say what the folder is for: {doc!r}"
    assert doc.splitlines()[0].strip(" .:`") not in own | {name}, f"{name}'s docstring opens with its name alone"


def test_written_files_get_ordinary_permissions(tmp_path):
    """Checkpoints and packages are the user's output: not the 0600/0700 of temporary files."""
    from edgegpt.core.io import DIRECTORY_MODE, FILE_MODE, staged_directory, write_json_atomic

    with staged_directory(tmp_path / "out") as stage:
        write_json_atomic(stage / "config.json", {"a": 1})
    assert (tmp_path / "out").stat().st_mode & 0o777 == DIRECTORY_MODE
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == FILE_MODE
    umask = os.umask(0)
    os.umask(umask)
    assert (FILE_MODE, DIRECTORY_MODE) == (0o666 & ~umask, 0o777 & ~umask)
