"""The layout's promises: the torch-free core and runtime import nothing heavy, and each folder says its job."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgegpt
import edgegpt.cli
import edgegpt.core
import edgegpt.export
import edgegpt.runtime
import edgegpt.train

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


@pytest.mark.parametrize("package", [edgegpt, edgegpt.core, edgegpt.train, edgegpt.cli, edgegpt.export,
                                     edgegpt.runtime])
def test_each_folder_states_its_job(package):
    doc = (package.__doc__ or "").strip()
    assert doc, f"{package.__name__} has no docstring"
    assert Path(package.__file__).name == "__init__.py"


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
