"""Packages whose graph passes the external-data threshold (ONNX external data, export/external_data.py):
the tests lower the threshold so a tiny model takes the path a model over 2 GB takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST, MODEL, MODEL_DATA
from edgegpt.core.io import sha256_file
from edgegpt.runtime import Generator

PROMPT = "The import statement"

# Every test exports packages (one a plain torch.onnx graph): the slow tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def external_package(tmp_path_factory, tiny_checkpoint) -> Path:
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("external") / "model"
    export_package(tiny_checkpoint, directory, external_data_threshold=0)
    return directory


def logits_and_tokens(package: Path) -> tuple[np.ndarray, list[int]]:
    generator = Generator.load(package, provider="cpu")
    ids = generator.encode(PROMPT)
    logits = generator.score(ids)
    tokens = generator.generate_ids(ids, max_new_tokens=16, temperature=0.0)
    return logits, list(tokens)


def test_small_package_stays_one_file(tiny_package):
    assert (tiny_package / MODEL).is_file()
    assert not (tiny_package / MODEL_DATA).exists()
    assert MODEL_DATA not in json.loads((tiny_package / MANIFEST).read_text())["files"]


def test_large_package_keeps_its_weights_beside_the_graph(external_package, tiny_package):
    model, data = external_package / MODEL, external_package / MODEL_DATA
    assert data.is_file()
    assert data.stat().st_size > 10 * model.stat().st_size  # the weights moved out; the graph stayed
    files = json.loads((external_package / MANIFEST).read_text())["files"]
    assert files[MODEL] == sha256_file(model)
    assert files[MODEL_DATA] == sha256_file(data)
    got_logits, got_tokens = logits_and_tokens(external_package)
    want_logits, want_tokens = logits_and_tokens(tiny_package)
    np.testing.assert_array_equal(got_logits, want_logits)
    assert got_tokens == want_tokens


def test_package_with_external_data_relocates(external_package, tiny_package, tmp_path, monkeypatch):
    first, moved = tmp_path / "first" / "model", tmp_path / "elsewhere" / "copied"
    shutil.copytree(external_package, first)
    shutil.move(first, moved)  # the folder it was written in is gone
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # neither the package's folder nor its parent
    assert not first.exists()
    got_logits, _ = logits_and_tokens(moved)
    want_logits, _ = logits_and_tokens(tiny_package)
    np.testing.assert_array_equal(got_logits, want_logits)


def test_tampered_data_file_is_refused(external_package, tmp_path):
    package = tmp_path / "model"
    shutil.copytree(external_package, package)
    with open(package / MODEL_DATA, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(EdgeGPTError, match=r"model\.onnx\.data is corrupt"):
        Generator.load(package, provider="cpu")


def test_missing_data_file_is_refused(external_package, tmp_path):
    package = tmp_path / "model"
    shutil.copytree(external_package, package)
    (package / MODEL_DATA).unlink()
    with pytest.raises(EdgeGPTError, match=r"model\.onnx\.data is missing"):
        Generator.load(package, provider="cpu")
    (package / MANIFEST).unlink()  # a hand-built package: nothing to name the file, onnxruntime refuses
    with pytest.raises(EdgeGPTError, match=r"model\.onnx is corrupt"):
        Generator.load(package, provider="cpu")


def test_data_file_the_manifest_does_not_list_is_refused(external_package, tmp_path):
    package = tmp_path / "model"
    shutil.copytree(external_package, package)
    manifest = json.loads((package / MANIFEST).read_text())
    del manifest["files"][MODEL_DATA]
    (package / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeGPTError, match="does not list"):
        Generator.load(package, provider="cpu")


def test_int8_package_with_external_data(tiny_checkpoint, tiny_package_int8, tmp_path):
    from edgegpt.export import export_package

    package = tmp_path / "model"
    report = export_package(tiny_checkpoint, package, quantize=True, gate=False, external_data_threshold=0)
    assert report.precision == "int8"
    files = json.loads((package / MANIFEST).read_text())["files"]
    assert (package / MODEL_DATA).is_file() and files[MODEL_DATA] == sha256_file(package / MODEL_DATA)
    assert report.package_bytes == (package / MODEL).stat().st_size + (package / MODEL_DATA).stat().st_size
    got_logits, got_tokens = logits_and_tokens(package)
    want_logits, want_tokens = logits_and_tokens(tiny_package_int8)  # one file: its float graph was external
    np.testing.assert_array_equal(got_logits, want_logits)
    assert got_tokens == want_tokens
    assert not (tiny_package_int8 / MODEL_DATA).exists()


def test_plain_graph_with_external_data(tiny_checkpoint, plain_package, tmp_path):
    from edgegpt.export import export_package

    package = tmp_path / "model"
    export_package(tiny_checkpoint, package, fuse=False, external_data_threshold=0)
    assert (package / MODEL_DATA).is_file()
    got_logits, got_tokens = logits_and_tokens(package)
    want_logits, want_tokens = logits_and_tokens(plain_package)
    np.testing.assert_array_equal(got_logits, want_logits)
    assert got_tokens == want_tokens


def test_threshold_must_be_a_byte_count(tiny_checkpoint, tmp_path):
    from edgegpt.export import export_package

    with pytest.raises(EdgeGPTError, match="external_data_threshold"):
        export_package(tiny_checkpoint, tmp_path / "model", external_data_threshold=-1)
    assert not (tmp_path / "model").exists()
