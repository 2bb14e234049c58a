"""The command line: the three commands chain through the default workspace, and every user mistake
is one line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import edgegpt
from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.scoring import DEFAULT_EVAL_TOKENS
from edgegpt.train.options import TrainOptions, flag_name, flags, option_type

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEGPT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgegpt: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow  # a training run
def test_train_export_generate_chain_through_default_workspace(workspace, corpus_file):
    trained = runner.invoke(app, ["train", "--data", str(corpus_file), "--preset", "nano", "--max-steps", "20",
                                  "--block-size", "64", "--eval-every", "10", "--json"])
    assert trained.exit_code == 0, trained.output
    summary = __import__("json").loads(trained.stdout.strip().splitlines()[-1])
    fields = {"steps", "tokens", "train_loss", "val_loss", "val_nats_per_char", "tokens_per_s", "checkpoint"}
    assert fields <= summary.keys()
    assert summary["steps"] == 20 and (workspace / "checkpoint" / "model.safetensors").is_file()
    # The steps' own rate leaves out the validations and saves the whole run's includes.
    assert summary["step_tokens_per_s"] > summary["tokens_per_s"] > 0

    exported = runner.invoke(app, ["export", "--quantize", "--json"])
    assert exported.exit_code == 0, exported.output
    assert (workspace / "model" / "model.onnx").is_file() and (workspace / "model" / "manifest.json").is_file()

    generated = runner.invoke(app, ["generate", "The import statement", "--max-new-tokens", "12", "--seed", "1"])
    assert generated.exit_code == 0, generated.output
    prompt = "The import statement"
    assert generated.stdout.startswith(prompt) and len(generated.stdout) > len(prompt) + 5

    info = runner.invoke(app, ["info", str(workspace / "model")])
    assert info.exit_code == 0 and "operators" in info.stdout and "MatMul" in info.stdout


def test_missing_data_path(workspace):
    result = runner.invoke(app, ["train", "--data", "no/such/file.txt", "--max-steps", "1"])
    assert_one_line_error(result, "no/such/file.txt", "does not exist")
    assert not workspace.exists()


def test_empty_corpus(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "empty"), "--max-steps", "1"])
    assert_one_line_error(result, "empty")
    assert not workspace.exists()


def test_non_utf8_file_is_named(workspace, tmp_path, corpus_file):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    result = runner.invoke(app, ["train", "--data", str(corpus_file), "--data", str(bad), "--max-steps", "1"])
    assert_one_line_error(result, "latin1.txt", "UTF-8")
    assert not workspace.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--max-steps", "0"], "--max-steps"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--preset", "huge"], "unknown preset"),
    (["--lr", "-0.1"], "--lr"),
    (["--resume"], "nothing to resume"),
])
def test_bad_train_options(workspace, corpus_file, args, fragment):
    result = runner.invoke(app, ["train", "--data", str(corpus_file), *args])
    assert_one_line_error(result, fragment)


def test_export_of_missing_checkpoint(workspace, tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "pkg")])
    assert_one_line_error(result, "no checkpoint", "edgegpt train")
    assert not (tmp_path / "pkg").exists()


def test_generate_before_any_model_exists(workspace):
    result = runner.invoke(app, ["generate", "hello"])
    assert_one_line_error(result, "edgegpt train", "edgegpt export")


def test_corrupt_model_onnx(workspace, tmp_path, tiny_package):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    (package / "model.onnx").write_bytes(b"\x00garbage, not a protobuf" * 10)
    result = runner.invoke(app, ["generate", "hello", "--model", str(package)])
    assert_one_line_error(result, "model.onnx")


def test_info_on_a_directory_that_is_neither(workspace, tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert_one_line_error(result, "neither")


def test_console_script_exit_code_and_single_line(tmp_path):
    env = {**os.environ, "EDGEGPT_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "edgegpt", "generate", "hello"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_option_defaults_are_the_librarys():
    """train's defaults are TrainOptions' and --eval-tokens' is the scorer's: one place to change each."""
    commands = get_command(app).commands
    train = {p.name: p.default for p in commands["train"].params}
    shared = [f.name for f in dataclasses.fields(TrainOptions) if f.name in train]
    assert len(shared) >= 20, shared
    assert {name: train[name] for name in shared} == {name: getattr(TrainOptions(), name) for name in shared}
    for command in ("export", "eval"):
        (eval_tokens,) = [p for p in commands[command].params if p.name == "eval_tokens"]
        assert eval_tokens.default == DEFAULT_EVAL_TOKENS


def test_every_training_option_is_a_train_flag_with_the_fields_help_and_default():
    """TrainOptions is the one declaration: each field made with option() is `edgegpt train --<name>`,
    with the field's help and default; a tuned field (warmup) is not on the command line."""
    params = {p.name: p for p in get_command(app).commands["train"].params}
    declared = flags()
    assert len(declared) >= 20
    for field, flag in declared:
        param = params[field.name]
        assert param.opts == [flag_name(field.name)] and param.secondary_opts == [], param.opts
        assert param.help == flag.help and param.default == field.default
    offered = {field.name for field, _ in declared}
    tuned = {f.name for f in dataclasses.fields(TrainOptions)} - offered
    assert "warmup" in tuned and not tuned & params.keys()
    shown = runner.invoke(app, ["train", "--help"])
    assert shown.exit_code == 0
    for name in [*offered, "data", "val_data", "out", "resume", "cache_dir"]:
        assert flag_name(name) in shown.stdout, name


def test_train_passes_each_flag_into_train_options(workspace, tmp_path, monkeypatch):
    """Every training flag given on the command line reaches TrainOptions (a path as its string, the
    teacher's made absolute), and the command's own options reach the training run."""
    import edgegpt.train.loop

    runs = []

    def run_training(data, val_data, out, opts, cache_dir, resume, reporter):
        runs.append(dict(data=data, val_data=val_data, out=out, opts=opts, cache_dir=cache_dir, resume=resume))
        raise EdgeGPTError("stopped before training")

    monkeypatch.setattr(edgegpt.train.loop, "train", run_training)
    given = {int: 7, float: 0.25, str: "given"}
    args, expected = [], {}
    for field, flag in flags():
        kind, _ = option_type(field.name)
        if kind is bool:
            args.append(flag_name(field.name))
            expected[field.name] = True
        elif flag.path:
            args += [flag_name(field.name), f"dir/{field.name}.json"]
            path = Path(f"dir/{field.name}.json")
            expected[field.name] = str(path.resolve() if flag.absolute else path)
        else:
            args += [flag_name(field.name), str(given[kind])]
            expected[field.name] = given[kind]
    result = runner.invoke(app, ["train", *args, "--data", "a.txt", "--val-data", "b.txt", "--out", "ckpt",
                                 "--cache-dir", "cache", "--resume"])
    assert_one_line_error(result, "stopped before training")
    (run,) = runs
    assert run["opts"] == TrainOptions(**expected)
    assert Path(expected["teacher"]).is_absolute() and not Path(expected["tokenizer"]).is_absolute()
    assert run["data"] == [Path("a.txt")] and run["val_data"] == [Path("b.txt")] and run["resume"] is True
    assert run["out"] == Path("ckpt") and run["cache_dir"] == Path("cache")


def test_version_is_the_installed_distributions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"edgegpt {metadata.version('edgegpt')}\n"
    proc = subprocess.run([sys.executable, "-m", "edgegpt", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == result.stdout and proc.stderr == ""


def test_version_falls_back_to_the_package_when_not_installed(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setattr(edgegpt, "__version__", "9.8.7-source")
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == "edgegpt 9.8.7-source\n"


def test_the_process_bench_times_imports_no_cli_framework():
    """`edgegpt bench`'s cold start is what generating costs in a fresh process: its child must not pay
    for typer (or the rest of the command line) on top."""
    code = "import sys, edgegpt.cli.bench_child; print(sorted(m for m in sys.modules if m.split('.')[0] == 'typer'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
