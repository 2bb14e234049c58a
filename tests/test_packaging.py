"""The wheel holds every tracked source file of the three package folders, each where it imports from, and
nothing else; its metadata names the version and the `edgegpt` command. (`.ci/check_wheel.py` installs that
wheel in fresh environments and uses it; this test is the quick half that runs in the suite.)"""

from __future__ import annotations

import configparser
import importlib.util
import zipfile
from pathlib import Path

import pytest

import edgegpt

CHECKOUT = Path(__file__).resolve().parent.parent
# repository folder -> where its files land in the wheel (setup.py's PACKAGE_ROOTS)
WHEEL_FOLDER = {"edgegpt": "edgegpt", "export": "edgegpt/export", "runtime": "edgegpt/runtime"}


def load_check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", CHECKOUT / ".ci" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return load_check_wheel().build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_exactly_the_tracked_sources(wheel):
    expected = set()
    for path in load_check_wheel().tracked_sources():
        folder, _, rest = path.partition("/")
        expected.add(f"{WHEEL_FOLDER[folder]}/{rest}")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert packaged - expected == set(), "files in the wheel that git does not track"
    assert expected - packaged == set(), "tracked sources missing from the wheel"
    assert "edgegpt/convert/gguf.py" in packaged and "edgegpt/runtime/generator.py" in packaged


def test_the_wheel_names_its_version_and_command(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(info.replace("METADATA", "entry_points.txt")).decode())
    assert f"\nVersion: {edgegpt.__version__}\n" in metadata
    assert wheel.name.startswith(f"edgegpt-{edgegpt.__version__}-")
    module, _, function = entry_points["console_scripts"]["edgegpt"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
