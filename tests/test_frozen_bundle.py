"""examples/freeze_desktop_chat.py: the PyInstaller folder bundle of the desktop chat holds the torch-free
runtime and nothing of the training, export or serving stacks, and, run with no Python around it (no
PYTHONPATH, no interpreter on PATH), answers exactly as the unfrozen example and the runtime do."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_desktop_example import EXAMPLE, expected_replies, needs_display, run_window, xvfb

FREEZE = Path(__file__).resolve().parents[1] / "examples" / "freeze_desktop_chat.py"
BUILD_TIMEOUT_S = 900  # seconds on a warm PyInstaller cache; a first build analyses and copies the whole bundle
FORBIDDEN = {"torch", "onnx", "onnxscript", "transformers", "safetensors", "starlette", "uvicorn"}
NEEDED = {"onnxruntime", "tokenizers", "numpy", "jinja2", "tkinter", "edgegpt"}
# edgegpt's torch-side modules: the bundle has only the core and the runtime.
NOT_EDGEGPT = ("edgegpt.train", "edgegpt.export", "edgegpt.cli", "edgegpt.server", "edgegpt.model")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("PyInstaller") is None,
                                 reason="PyInstaller is not installed (pip install pyinstaller)")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frozen")
    result = subprocess.run([sys.executable, str(FREEZE), "--out", str(out)], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"bundle: {out / 'desktop_chat'}" in result.stdout and "MiB" in result.stdout
    return out / "desktop_chat"


def module_names(bundle: Path) -> set[str]:
    """Every module in the executable's archives (dotted names), and the names of the bundle's files."""
    from PyInstaller.archive.readers import pkg_archive_contents

    names = set(pkg_archive_contents(str(bundle / "desktop_chat"), recursive=True))
    return names | {path.name for path in bundle.rglob("*")}


def test_the_bundle_holds_the_runtime_and_nothing_heavy(bundle):
    executable = bundle / "desktop_chat"
    assert executable.is_file() and os.access(executable, os.X_OK)
    names = module_names(bundle)
    tops = {name.split(".")[0] for name in names}
    assert NEEDED <= tops, NEEDED - tops
    assert not FORBIDDEN & tops
    assert not [name for name in names if name.startswith(NOT_EDGEGPT)]
    assert any(name.startswith("onnxruntime_pybind11_state") for name in names)  # the native runtime itself


@needs_display
def test_the_frozen_app_answers_like_the_example_with_no_python_around(bundle, tiny_package, tmp_path):
    turns = ["Hello", "What is a list?"]
    flags = [*[a for turn in turns for a in ("--send", turn)], "--quit-when-done", "--max-new-tokens", "16",
             "--temperature", "0"]
    # Only what a user's desktop session has: no PYTHONPATH, no virtual environment or interpreter on PATH.
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    with xvfb() as display:
        frozen, report = run_window([str(bundle / "desktop_chat"), str(tiny_package), *flags], display, env=bare)
        _, unfrozen = run_window([sys.executable, str(EXAMPLE), str(tiny_package), *flags], display)

    assert frozen.returncode == 0, frozen.stderr
    assert "Traceback" not in frozen.stderr
    expected = expected_replies(tiny_package, turns, 16)
    assert report["replies"] == unfrozen["replies"] == ["".join(pieces).lstrip() for pieces, _ in expected]
    assert report["finish_reasons"] == unfrozen["finish_reasons"]
    assert report["error"] is None and 0 < report["startup_s"] < report["first_token_s"]
