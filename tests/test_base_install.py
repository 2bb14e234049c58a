"""The base install (runtime and CLI, no torch): the commands that need the [train] or [distill] extra say
so in one line, exit code 2, with the pip command; generate, chat, eval PACKAGE, bench and info work.

Each command runs as `python -m edgegpt` in a fresh process whose sitecustomize makes the optional
dependencies unimportable exactly as a missing package is (ModuleNotFoundError naming it). The blocker is
inherited by any Python child process (bench measures in one), since it rides on PYTHONPATH.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgegpt.cli.errors import user_errors
from edgegpt.runtime import Generator

# Every test runs edgegpt in fresh processes with modules blocked: the slow tier.
pytestmark = pytest.mark.slow

TRAIN_EXTRA = ("torch", "onnx", "onnxscript", "safetensors")
BASE_INSTALL_LACKS = (*TRAIN_EXTRA, "transformers")
SITECUSTOMIZE = '''
import os
import sys


class NotInstalled:
    """Importing any of `names` (or a submodule) fails as it does when the package is not installed."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled(frozenset(os.environ["EDGEGPT_TEST_NOT_INSTALLED"].split(","))))
'''


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("not-installed")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


@pytest.fixture
def edgegpt(blocker, tmp_path):
    """Runs `python -m edgegpt ARGS` with `missing` unimportable, in tmp_path with its own EDGEGPT_HOME."""

    def run(*args: object, missing: tuple[str, ...] = BASE_INSTALL_LACKS, stdin: str = "",
            ) -> subprocess.CompletedProcess:
        env = {**os.environ, "EDGEGPT_HOME": str(tmp_path / "home"), "EDGEGPT_TEST_NOT_INSTALLED": ",".join(missing),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, "-m", "edgegpt", *map(str, args)], input=stdin, capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)

    return run


def assert_needs_extra(proc: subprocess.CompletedProcess, extra: str) -> None:
    assert proc.returncode == 2, f"exit code {proc.returncode}\nstderr: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgegpt: error: "), lines[0]
    assert f"[{extra}]" in lines[0] and f"pip install 'edgegpt[{extra}]'" in lines[0], lines[0]
    assert proc.stdout == ""


# -- what needs [train] -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "export", "convert", "eval-checkpoint", "eval-reference-checkpoint"])
def test_a_command_that_needs_torch_names_the_train_extra(command, edgegpt, tmp_path, tiny_checkpoint, tiny_package,
                                                          corpus_file):
    args = {
        "train": ["train", "--data", corpus_file, "--out", tmp_path / "written", "--max-steps", "1"],
        "export": ["export", tiny_checkpoint, "--out", tmp_path / "written"],
        "convert": ["convert", tiny_checkpoint, tmp_path / "written"],
        "eval-checkpoint": ["eval", tiny_checkpoint, "--data", corpus_file],
        "eval-reference-checkpoint": ["eval", tiny_package, "--data", corpus_file, "--reference", tiny_checkpoint],
    }[command]
    proc = edgegpt(*args)
    assert_needs_extra(proc, "train")
    assert "torch" in proc.stderr
    assert not (tmp_path / "written").exists() and not (tmp_path / "home").exists()


def test_converting_a_gguf_file_names_the_convert_extra(edgegpt, tmp_path):
    """[train] alone would not do (the file needs gguf too): the line names [convert], which brings both."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    proc = edgegpt("convert", source, tmp_path / "written")
    assert_needs_extra(proc, "convert")
    assert "convert of a .gguf file needs torch" in proc.stderr
    assert not (tmp_path / "written").exists()


@pytest.mark.parametrize("missing", TRAIN_EXTRA[1:])
def test_export_with_torch_but_not_the_rest_of_the_extra_names_what_is_missing(missing, edgegpt, tmp_path,
                                                                               tiny_checkpoint):
    """Before any work: without onnxscript the export used to get as far as writing the package."""
    proc = edgegpt("export", tiny_checkpoint, "--out", tmp_path / "written", missing=(missing,))
    assert_needs_extra(proc, "train")
    assert f"needs {missing}," in proc.stderr
    assert not (tmp_path / "written").exists()


def test_a_hugging_face_teacher_without_transformers_names_the_distill_extra(edgegpt, tmp_path, tiny_checkpoint,
                                                                             corpus_file):
    from edgegpt.convert import convert

    convert(tiny_checkpoint, tmp_path / "hf-teacher")
    proc = edgegpt("train", "--data", corpus_file, "--teacher", tmp_path / "hf-teacher", "--out", tmp_path / "written",
                   "--max-steps", "1", missing=("transformers",))
    assert_needs_extra(proc, "distill")
    assert "transformers" in proc.stderr
    assert not (tmp_path / "written").exists()


# -- what works without torch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen(tiny_package) -> Generator:
    return Generator.load(tiny_package, provider="cpu")


def test_generate_and_chat_work_without_torch(edgegpt, gen, tiny_package):
    greedy = ["--model", tiny_package, "--max-new-tokens", "12", "--temperature", "0", "--provider", "cpu"]
    generated = edgegpt("generate", "The import statement", *greedy)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == "The import statement" + gen.generate("The import statement", max_new_tokens=12,
                                                                     temperature=0) + "\n"
    chatted = edgegpt("chat", *greedy, stdin="def f\n")
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == gen.generate("def f\n", max_new_tokens=12, temperature=0, stop="\n\n") + "\n"


def test_eval_of_a_package_works_without_torch(edgegpt, tiny_package, corpus_file):
    """The same scores as with every extra installed: the package's evaluation never needed torch."""
    args = ("eval", tiny_package, "--data", corpus_file, "--eval-tokens", "512", "--json")
    base, full = edgegpt(*args), edgegpt(*args, missing=())
    assert base.returncode == 0 and full.returncode == 0, base.stderr + full.stderr
    assert "Traceback" not in base.stderr
    [scored], [expected] = (json.loads(p.stdout.strip().splitlines()[-1])["models"] for p in (base, full))
    assert scored["name"] == str(tiny_package) and scored["tokens"] == 512
    assert scored["perplexity"] == pytest.approx(math.exp(scored["nats_per_token"]))
    assert {k: v for k, v in scored.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}


def table_value(text: str, key: str) -> str:
    """The value in the row of a rich table whose first cell is `key`."""
    match = re.search(rf"^\W*{re.escape(key)}\s*[│┃]\s*(\S+)", text, flags=re.M)
    assert match, f"no row {key} in:\n{text}"
    return match.group(1)


def test_info_works_without_torch(edgegpt, tiny_package, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    package = edgegpt("info", tiny_package)
    assert package.returncode == 0, package.stderr
    checkpoint = edgegpt("info", tiny_checkpoint)
    assert checkpoint.returncode == 0, checkpoint.stderr
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len"):
        assert table_value(package.stdout, key) == table_value(checkpoint.stdout, key) == str(config[key]), key
    assert "fused graph, float32" in package.stdout and "MatMul" in package.stdout
    kv_width = config["n_kv_heads"] * config["dim"] // config["n_heads"]
    assert table_value(package.stdout, "bytes per token") == f"{2 * config['n_layers'] * kv_width * 4:,}"  # K, V
    from edgegpt.core.config import ModelConfig

    parameters = ModelConfig(**config).num_parameters()
    assert f"({parameters / 1e6:.2f}M parameters)" in checkpoint.stdout


def test_bench_works_without_torch(edgegpt, tiny_package):
    proc = edgegpt("bench", tiny_package, "--prompt-len", "4", "--new-tokens", "4", "--runs", "1", "--provider", "cpu",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["model"], report["provider"], report["prompt_len"], report["new_tokens"], report["runs"]) == (
        str(tiny_package), "cpu", 4, 4, 1)
    assert report["model_bytes"] == (tiny_package / "model.onnx").stat().st_size
    assert len(report["decode_runs"]) == 1 and report["decode_tokens_per_s"] > 0 and report["ttft_s"] > 0


def test_importing_the_cli_imports_no_heavy_module():
    heavy = ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "safetensors")
    code = f"import sys, edgegpt.cli.app; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


# -- only a missing optional dependency becomes the one line ------------------------------------------------


def test_a_missing_base_dependency_keeps_its_traceback(edgegpt, tiny_package):
    proc = edgegpt("generate", "x", "--model", tiny_package, missing=("onnxruntime",))
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "ModuleNotFoundError: No module named 'onnxruntime'" in proc.stderr


@pytest.mark.parametrize("bug", [
    ModuleNotFoundError("No module named 'torch._C'", name="torch._C"),  # torch there, but broken
    ModuleNotFoundError("No module named 'edgegpt.nope'", name="edgegpt.nope"),
    KeyError("a bug"),
])
def test_a_bug_is_not_turned_into_the_one_line(bug):
    with pytest.raises(type(bug)) as raised, user_errors("train"):
        raise bug
    assert raised.value is bug
