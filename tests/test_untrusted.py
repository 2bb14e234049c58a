"""Packages from elsewhere: every file is checked against manifest.json's sha256, model.onnx may use
only the operator domains edgegpt emits and keep external data only inside the package, and no code
in the repository reads pickle."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator, ModelPackage

REPO = Path(__file__).resolve().parents[1]
VERIFIED = ("model.onnx", "config.json", "tokenizer.json", "generation_config.json")


@pytest.fixture
def package_copy(tiny_package, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package, tmp_path / "model"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(package: Path, **files: str | None) -> None:
    """Set (or with None drop) manifest entries; every other listed file gets its current hash."""
    manifest = json.loads((package / "manifest.json").read_text())
    listed = {**manifest["files"], **files}
    manifest["files"] = {name: digest if name in files else sha256(package / name)
                         for name, digest in listed.items() if digest is not None}
    (package / "manifest.json").write_text(json.dumps(manifest))


def greedy(generator: Generator) -> list[int]:
    return generator.generate_ids("The import statement", max_new_tokens=12, temperature=0)


# -- manifest.json: sha256 of every file -------------------------------------------------------------


@pytest.mark.parametrize("name", VERIFIED)
@pytest.mark.parametrize("damage", ["edited", "truncated", "appended"])
def test_a_damaged_file_is_refused_by_name(package_copy, name, damage):
    path = package_copy / name
    data = bytearray(path.read_bytes())
    if damage == "edited":
        if name == "model.onnx":
            data[len(data) // 2] ^= 0x01  # one bit inside the weights: the model still loads
        else:
            data[data.index(b":") + 1 : data.index(b":") + 1] = b" "  # still valid JSON, same meaning
    elif damage == "truncated":
        del data[len(data) * 3 // 4 :]
    else:
        data += b"\n"  # valid JSON, and trailing bytes onnxruntime would parse as more protobuf
    path.write_bytes(bytes(data))
    with pytest.raises(EdgeGPTError, match=rf"{name} is corrupt: its sha256 differs from the one in manifest\.json"):
        Generator.load(package_copy, provider="cpu")
    with pytest.raises(EdgeGPTError, match=rf"{name} is corrupt"):
        ModelPackage.load(package_copy)


def flip_a_weight_bit(model: Path) -> None:
    """Flip one mantissa bit of the final norm's first weight, which every logit passes through."""
    import onnx

    weights = next(t.raw_data for t in onnx.load(str(model)).graph.initializer if t.name == "norm.weight")
    data = bytearray(model.read_bytes())
    at = data.find(weights)
    assert at >= 0 and data.find(weights, at + 1) < 0, "the weights' bytes must be found once"
    data[at + 2] ^= 0x01  # little-endian float32: byte 2 holds the upper mantissa bits
    model.write_bytes(bytes(data))


def test_the_check_is_what_refuses_a_change_that_still_loads(package_copy, tiny_package):
    """Without a manifest the changed model loads and runs, and computes something else than the intact one
    from the same tokens: the sha256 is what caught it above."""
    flip_a_weight_bit(package_copy / "model.onnx")
    (package_copy / "manifest.json").unlink()
    changed, intact = Generator.load(package_copy, provider="cpu"), Generator.load(tiny_package, provider="cpu")
    ids = intact.encode("The import statement")
    assert changed.encode("The import statement") == ids  # the tokenizer is untouched
    changed_logits = changed.forward(ids, changed.empty_cache())[0]
    intact_logits = intact.forward(ids, intact.empty_cache())[0]
    assert changed_logits.shape == intact_logits.shape and np.isfinite(changed_logits).all()
    assert not np.array_equal(changed_logits, intact_logits), "the flipped bit did not reach the weights"
    # A bit of the mantissa moves one weight by under 1%: the logits move, but not far.
    np.testing.assert_allclose(changed_logits, intact_logits, atol=0.5)


def test_an_intact_package_and_a_rehashed_edit_load(package_copy, tiny_package):
    assert greedy(Generator.load(package_copy, provider="cpu")) == greedy(Generator.load(tiny_package, provider="cpu"))
    path = package_copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_new_tokens": 3}))
    edit_manifest(package_copy)
    assert ModelPackage.load(package_copy).generation.max_new_tokens == 3


def test_a_listed_file_that_is_missing_is_named(package_copy):
    edit_manifest(package_copy, **{"model.onnx.data": "0" * 64})
    with pytest.raises(EdgeGPTError, match=r"not a complete model package: model\.onnx\.data is missing"):
        Generator.load(package_copy, provider="cpu")


@pytest.mark.parametrize(
    "files, message",
    [({"../secret.txt": "0" * 64}, r"lists '\.\./secret\.txt', which is not a file name inside the package"),
     ({"/etc/passwd": "0" * 64}, r"which is not a file name inside the package"),
     ({"config.json": None}, r"does not list config\.json, so it cannot be verified"),
     ({"tokenizer.json": "not a digest"}, r"sha256 of tokenizer\.json must be 64 lowercase hex digits")],
)
def test_a_bad_manifest_is_refused(package_copy, files, message):
    edit_manifest(package_copy, **files)
    with pytest.raises(EdgeGPTError, match=message):
        ModelPackage.load(package_copy)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"files": ["model.onnx"]}'])
def test_an_unreadable_manifest_is_refused(package_copy, content):
    (package_copy / "manifest.json").write_text(content)
    with pytest.raises(EdgeGPTError, match=r"manifest\.json"):
        ModelPackage.load(package_copy)


# -- model.onnx: operator domains and external data ---------------------------------------------------


def save_model(package: Path, proto) -> None:
    import onnx

    onnx.save_model(proto, str(package / "model.onnx"))
    edit_manifest(package)


def load_model(package: Path):
    import onnx

    return onnx.load(str(package / "model.onnx"))


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_an_operator_domain_edgegpt_does_not_emit_is_refused(package_copy, in_subgraph):
    from onnx import TensorProto, helper

    proto = load_model(package_copy)
    evil = helper.make_node("Evil", ["input_ids"], ["evil_out"], domain="com.example.evil")
    if in_subgraph:  # hidden in the branch of an If: the walk descends into attributes' graphs
        output = helper.make_tensor_value_info("evil_out", TensorProto.INT64, None)
        branch = helper.make_graph([evil], "branch", [], [output])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        proto.graph.initializer.append(cond)
        proto.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch))
    else:
        proto.graph.node.append(evil)
    proto.opset_import.append(helper.make_opsetid("com.example.evil", 1))
    save_model(package_copy, proto)
    with pytest.raises(EdgeGPTError, match=r"domain 'com\.example\.evil', which edgegpt does not emit"):
        Generator.load(package_copy, provider="cpu")


def point_at_external_data(proto, location: str) -> None:
    """Make the largest initializer (the embedding) claim its bytes live in `location`."""
    from onnx import TensorProto

    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


@pytest.mark.parametrize(
    "location",
    ["/etc/passwd", "../weights.bin", "..\\weights.bin", "sub/../../weights.bin", "C:\\weights.bin",
     "\\\\server\\share\\weights.bin"],
)
def test_external_data_outside_the_package_is_refused(package_copy, location):
    proto = load_model(package_copy)
    point_at_external_data(proto, location)
    save_model(package_copy, proto)
    with pytest.raises(EdgeGPTError, match=r"reads external data from .*outside the package directory"):
        Generator.load(package_copy, provider="cpu")
    (package_copy / "manifest.json").unlink()  # the same without a manifest: the graph check always runs
    with pytest.raises(EdgeGPTError, match=r"outside the package directory"):
        ModelPackage.load(package_copy)


def test_external_data_the_manifest_does_not_list_is_refused(package_copy):
    proto = load_model(package_copy)
    point_at_external_data(proto, "weights.bin")
    save_model(package_copy, proto)
    (package_copy / "weights.bin").write_bytes(b"\x00" * 1024)  # present, but never verified
    with pytest.raises(EdgeGPTError, match=r"'weights\.bin', a file manifest\.json does not list"):
        Generator.load(package_copy, provider="cpu")


def test_external_data_inside_and_listed_loads_and_runs_the_same(package_copy, tiny_package):
    import onnx

    proto = load_model(package_copy)
    onnx.save_model(proto, str(package_copy / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    edit_manifest(package_copy, **{"model.onnx.data": sha256(package_copy / "model.onnx.data")})
    assert (package_copy / "model.onnx").stat().st_size < (tiny_package / "model.onnx").stat().st_size / 4
    assert greedy(Generator.load(package_copy, provider="cpu")) == greedy(Generator.load(tiny_package, provider="cpu"))
    # ... and the external file is verified like every other one.
    data = bytearray((package_copy / "model.onnx.data").read_bytes())
    data[100] ^= 0x01
    (package_copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgeGPTError, match=r"model\.onnx\.data is corrupt"):
        Generator.load(package_copy, provider="cpu")


@pytest.mark.parametrize("content", [b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc", b"\x0f" * 64])
def test_a_model_that_is_not_protobuf_is_corrupt(package_copy, content):
    (package_copy / "model.onnx").write_bytes(content)
    edit_manifest(package_copy)
    with pytest.raises(EdgeGPTError, match=r"model\.onnx is corrupt.*re-run `edgegpt export`"):
        Generator.load(package_copy, provider="cpu")


# -- config.json and generation_config.json beyond the basic fields -----------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "graph": {**c["graph"], "past_key": "past_key.{layer}{0}"}}, r"no other braces"),
        (lambda c: {**c, "graph": {**c["graph"], "past_key": "k.{layer:>999999999}"}}, r"must contain '\{layer\}'"),
        (lambda c: {**c, "model": {**c["model"], "n_layers": 10**9}}, r"fewer than the cache of 1000000000 layers"),
        (lambda c: {**c, "model": {**c["model"], "max_len": 10**12}}, r"max_len 1000000000000 is beyond"),
        (lambda c: {**c, "model": {**c["model"], "vocab_size": 10**9}}, r"vocab_size 1000000000 is beyond"),
        (lambda c: {**c, "model": "model"}, r"model must be an object"),
    ],
)
def test_more_bad_config_json(package_copy, edit, message):
    path = package_copy / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    (package_copy / "manifest.json").unlink()
    with pytest.raises(EdgeGPTError, match=message):
        ModelPackage.load(package_copy)


@pytest.mark.parametrize(
    "text, message",
    [('{"max_new_tokens": 5, "temperature": 1' + "0" * 400 + ', "top_k": 0, "top_p": 1, "eos_token_id": 0}',
      r"temperature is out of range"),
     ('{"max_new_tokens": 5, "temperature": NaN, "top_k": 0, "top_p": 1, "eos_token_id": 0}', r"temperature must be"),
     ("[" * 100_000, r"not valid JSON"),
     ('{"max_new_tokens": ' + "9" * 5000 + "}", r"not valid JSON"),
     ("\xff\xfe", r"not valid JSON")],
)
def test_more_bad_generation_config(package_copy, text, message):
    (package_copy / "generation_config.json").write_bytes(text.encode("latin-1"))
    (package_copy / "manifest.json").unlink()
    with pytest.raises(EdgeGPTError, match=message):
        ModelPackage.load(package_copy)


# -- no pickle anywhere -------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def pickle_uses(source: str) -> list[str]:
    """Ways `source` could read or write pickle: imports of pickle-based modules, torch.load without
    weights_only=True, np.load(allow_pickle=True), pandas' read_pickle/to_pickle, torch.save."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hits += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                hits.append(module)
            if module == "torch" and any(a.name in ("load", "save") for a in node.names):
                hits.append("from torch import load/save")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            name = node.func.attr
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if owner == "torch" and name == "load" and not (
                isinstance(weights_only, ast.Constant) and weights_only.value is True
            ):
                hits.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner == "torch" and name == "save":
                hits.append(f"line {node.lineno}: torch.save")
            allow = keywords.get("allow_pickle")  # numpy's default is False; only an explicit False is safe
            if owner in ("np", "numpy") and name == "load" and allow is not None and not (
                isinstance(allow, ast.Constant) and allow.value is False
            ):
                hits.append(f"line {node.lineno}: {owner}.load(allow_pickle=...)")
            if name in ("read_pickle", "to_pickle"):
                hits.append(f"line {node.lineno}: {name}")
    return hits


def test_the_pickle_scanner_finds_what_it_looks_for():
    bad = [
        "import pickle", "from dill import loads", "import joblib", "torch.load('x.pt')",
        "torch.load('x.pt', weights_only=False)", "np.load('x.npy', allow_pickle=True)", "df = pd.read_pickle('x')",
        "torch.save(model, 'x.pt')", "from torch import load",
    ]
    good = ["torch.load('x.pt', weights_only=True)", "np.load('x.npy')", "np.load('x', allow_pickle=False)",
            "json.load(f)", "x = 'never pickle'"]
    assert all(pickle_uses(source) for source in bad), [s for s in bad if not pickle_uses(s)]
    assert not any(pickle_uses(source) for source in good)


def test_no_pickle_in_the_repository():
    folders = ("edgegpt", "export", "runtime", "tests", "benchmarks")
    files = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 30 and REPO / "runtime" / "package.py" in files
    hits = {}
    for path in files:  # this file too: its patterns are strings, which the scanner does not read as code
        if found := pickle_uses(path.read_text(encoding="utf-8")):
            hits[str(path.relative_to(REPO))] = found
    assert hits == {}
