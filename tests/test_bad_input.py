"""Bad input to every command and to the Python API: missing, empty, binary, non-UTF-8 and huge data;
wrong types and absurd values in the options; damaged checkpoints and packages.

Every case must end the same way: on the command line exit code 2 and exactly one line on stderr,
`edgegpt: error: ...`, naming what is wrong; from Python an EdgeGPTError saying the same. And nothing
is half-written: each case runs in its own directory, and after the failure every file in it (a
pre-existing checkpoint or package given as --out included) is exactly what it was before; only the
token cache may have been added to.

The session fixtures (tiny_checkpoint, tiny_package, ...) are shared: a case copies them before
damaging anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export import export_package
from edgegpt.runtime import Generator
from edgegpt.train.loop import train
from edgegpt.train.options import TrainOptions

runner = CliRunner()

# Not UTF-8 from the second byte on (a PNG signature, then bytes no UTF-8 text contains).
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfa" * 64
LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50
# Longer than the tiny model's 128-token context however it tokenizes (~1 token per 2-4 characters).
LONG_PROMPT = "The import statement combines two operations. " * 60
HUGE_LINE_CHARS = 50_000_000


# -- the scene a case builds on -----------------------------------------------------------------------


class Scene:
    """One case's directory, with copies of the shared fixtures made on demand (so damaging them is safe).

    Commands that write are pointed into `out`, which exists (empty, or holding a copy of a good package
    or checkpoint) before the command runs."""

    def __init__(self, root: Path, request: pytest.FixtureRequest) -> None:
        self.root = root
        self.request = request
        self.out = root / "out"
        self.out.mkdir()
        self.cache = root / "cache"

    def copy_of(self, fixture: str, where: Path) -> Path:
        if not where.exists():
            shutil.copytree(self.request.getfixturevalue(fixture), where)
        return where

    @property
    def checkpoint(self) -> Path:
        return self.copy_of("tiny_checkpoint", self.root / "checkpoint")

    @property
    def package(self) -> Path:
        return self.copy_of("tiny_package", self.root / "package")

    def package_without_manifest(self) -> Path:
        """A hand-edited package: no manifest.json, so the runtime parses the files instead of refusing
        them for their sha256 (both are errors; this reaches the field-level checks)."""
        (self.package / "manifest.json").unlink()
        return self.package

    @property
    def corpus(self) -> Path:
        return self.request.getfixturevalue("corpus_file")

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def edit_json(self, path: Path, edit: Callable[[dict], object]) -> Path:
        """Change the JSON object in `path` in place with `edit` (whatever it returns is ignored)."""
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return path

    def train(self, *args: object, data: Path | None = None) -> list[str]:
        """`edgegpt train` on a tiny model into out/checkpoint: one step once the input is good."""
        return ["train", "--data", str(data or self.corpus), "--out", str(self.out / "checkpoint"),
                "--cache-dir", str(self.cache), "--preset", "nano", "--max-steps", "1", "--block-size", "32",
                *map(str, args)]

    def export(self, *args: object, checkpoint: Path | None = None) -> list[str]:
        return ["export", str(checkpoint or self.checkpoint), "--out", str(self.out / "model"), *map(str, args)]

    def existing_package_as_out(self) -> Path:
        """A good package already at out/model: a failed export must leave it exactly as it is."""
        return self.copy_of("tiny_package", self.out / "model")


@pytest.fixture
def scene(tmp_path, request, monkeypatch) -> Scene:
    monkeypatch.setenv("EDGEGPT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return Scene(tmp_path, request)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`, hidden ones included, with the sha256 of each file;
    the token cache is left out (writing it is allowed: it is keyed by content and written atomically)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == "cache" or relative.parts[:2] == ("home", "cache"):
            continue
        seen[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def assert_one_line_error(exit_code: int, stdout: str, stderr: str, words: tuple[str, ...]) -> None:
    assert exit_code == 2, f"exit code {exit_code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("edgegpt: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


# -- the cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    build: Callable[[Scene], object]  # CLI: the arguments; API: a callable that must raise
    words: tuple[str, ...]  # each must appear in the error message
    subprocess: bool = False  # run as `python -m edgegpt`, a real process (CLI cases only)
    marks: list = field(default_factory=list)


CLI_CASES: dict[str, Case] = {}
API_CASES: dict[str, Case] = {}


def cli(name: str, *words: str, subprocess: bool = False, xfail: str | None = None, slow: bool = False):
    def register(build):
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        marks += [pytest.mark.slow] if slow else []
        CLI_CASES[name] = Case(build, words, subprocess, marks)
        return build
    return register


def api(name: str, *words: str, xfail: str | None = None):
    def register(build):
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        API_CASES[name] = Case(build, words, marks=marks)
        return build
    return register


# train: data ---------------------------------------------------------------------------------------

cli("train-empty-file", "empty")(lambda s: s.train(data=s.file("empty.txt", b"")))
cli("train-binary-file", "photo.png", "UTF-8")(lambda s: s.train(data=s.file("photo.png", BINARY)))
cli("train-latin1-jsonl", "notes.jsonl", "UTF-8")(
    lambda s: s.train(data=s.file("notes.jsonl", b'{"text": "' + LATIN1[:40] + b'"}\n')))
cli("train-jsonl-not-json", "notes.jsonl:2", "JSON")(
    lambda s: s.train(data=s.file("notes.jsonl", '{"text": "fine"}\n{"text": "cut off\n')))
cli("train-jsonl-without-text", "notes.jsonl:1", "text")(
    lambda s: s.train(data=s.file("notes.jsonl", '{"body": "no text field"}\n')))
cli("train-missing-val-data", "no/such/val.txt", "does not exist")(
    lambda s: s.train("--val-data", "no/such/val.txt"))


@cli("train-directory-without-text", "contains no .txt")
def _(s):
    s.file("tables/data.csv", "a,b\n1,2\n")
    return s.train(data=s.root / "inputs" / "tables")


@cli("train-existing-checkpoint-kept", "photo.png", "UTF-8", slow=True)  # trains until it meets the bad file
def _(s):
    s.copy_of("tiny_checkpoint", s.out / "checkpoint")
    return s.train(data=s.file("photo.png", BINARY))


# train: options --------------------------------------------------------------------------------------

cli("train-negative-steps", "--max-steps")(lambda s: s.train("--max-steps", "-5"))
cli("train-zero-batch", "--batch-size")(lambda s: s.train("--batch-size", "0"))
cli("train-dropout-1.5", "--dropout")(lambda s: s.train("--dropout", "1.5"))
cli("train-lr-nan", "--lr")(lambda s: s.train("--lr", "nan"))
cli("train-block-beyond-context", "--block-size", "context")(lambda s: s.train("--block-size", "100000"))
cli("train-unknown-device", "--device")(lambda s: s.train("--device", "tpu"))
cli("train-unknown-preset", "unknown preset")(lambda s: s.train("--preset", "huge"))
cli("train-vocab-too-small", "--vocab-size", "258")(lambda s: s.train("--vocab-size", "100"))
cli("train-too-little-data", "tokens", "--block-size")(
    lambda s: s.train("--block-size", "200", data=s.file("note.txt", "A short note about sockets.\n" * 15)))
cli("train-negative-seed", "--seed")(
    lambda s: s.train("--seed", "-1"))
cli("train-steps-not-a-number", "--max-steps")(lambda s: s.train("--max-steps", "ten"))


# export --------------------------------------------------------------------------------------------


@cli("export-bits-3", "--bits")
def _(s):
    s.existing_package_as_out()
    return s.export("--quantize", "--bits", "3")


@cli("export-precision-int2", "--precision")
def _(s):
    s.existing_package_as_out()
    return s.export("--precision", "int2")


@cli("export-eval-tokens-zero", "--eval-tokens")
def _(s):
    s.existing_package_as_out()
    return s.export("--quantize", "--eval-data", s.corpus, "--eval-tokens", "0")


@cli("export-eval-tokens-negative-unused", "--eval-tokens")
def _(s):
    # float32 with no held-out text: nothing reads the count, which is still no reason to accept -5.
    s.existing_package_as_out()
    return s.export("--eval-tokens", "-5")


cli("export-eval-data-binary", "photo.png", "UTF-8")(
    lambda s: s.export("--quantize", "--eval-data", s.file("photo.png", BINARY)))
cli("export-eval-data-empty", "empty")(lambda s: s.export("--quantize", "--eval-data", s.file("empty.txt", b"")))
cli("export-config-wrong-type", "dim", "positive integer")(
    lambda s: s.export(checkpoint=s.edit_json(s.checkpoint / "config.json", lambda c: c.update(dim="128")).parent))
cli("export-config-missing-key", "missing", "n_layers")(
    lambda s: s.export(checkpoint=s.edit_json(s.checkpoint / "config.json", lambda c: c.pop("n_layers")).parent))


@cli("export-config-not-json", "config.json", "JSON")
def _(s):
    (s.checkpoint / "config.json").write_bytes(BINARY)
    return s.export()


@cli("export-tokenizer-not-a-tokenizer", "tokenizer.json")
def _(s):
    (s.checkpoint / "tokenizer.json").write_text('{"vocab": ["a", "b"], "note": "not a tokenizer"}')
    return s.export()


@cli("export-weights-truncated", "model.safetensors")
def _(s):
    weights = s.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return s.export()


@cli("export-weights-zero-bytes", "model.safetensors")
def _(s):
    (s.checkpoint / "model.safetensors").write_bytes(b"")
    return s.export()


def poison_weights(checkpoint: Path) -> Path:
    """A checkpoint whose training diverged: one norm's weights are NaN (otherwise a valid file)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(n for n in sorted(weights) if "norm" in n)
    weights[name] = weights[name] * float("nan")
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    return checkpoint


@cli("export-weights-nan", "model.safetensors", "NaN")
def _(s):
    # Used to fail only after three progress lines, while checking the graph against PyTorch.
    s.existing_package_as_out()
    return s.export(checkpoint=poison_weights(s.checkpoint))


@cli("export-missing-tokenizer", "tokenizer.json", "missing")
def _(s):
    (s.checkpoint / "tokenizer.json").unlink()
    return s.export()


@cli("export-out-is-a-file", "is a file")
def _(s):
    (s.out / "model").write_text("my notes")
    return s.export()


@cli("export-out-is-someone-elses-directory", "not an edgegpt model package")
def _(s):
    (s.out / "model").mkdir()
    (s.out / "model" / "thesis.tex").write_text("\\documentclass{article}")
    return s.export()


@cli("export-out-is-the-checkpoint", "overwrite the checkpoint")
def _(s):
    checkpoint = s.copy_of("tiny_checkpoint", s.out / "checkpoint")
    return ["export", str(checkpoint), "--out", str(checkpoint)]


cli("export-bits-not-a-number", "--bits")(lambda s: s.export("--quantize", "--bits", "four"))


# eval ----------------------------------------------------------------------------------------------

cli("eval-missing-model", "no/such/model", "does not exist")(
    lambda s: ["eval", "no/such/model", "--data", str(s.corpus)])
cli("eval-missing-reference", "no/such/ref", "does not exist")(
    lambda s: ["eval", str(s.package), "--data", str(s.corpus), "--reference", "no/such/ref"])
cli("eval-threads-zero", "threads")(lambda s: ["eval", str(s.package), "--data", str(s.corpus), "--threads", "0"])
cli("eval-tokens-zero", "--eval-tokens")(
    lambda s: ["eval", str(s.package), "--data", str(s.corpus), "--eval-tokens", "0"])
cli("eval-data-binary", "photo.png", "UTF-8")(
    lambda s: ["eval", str(s.package), "--data", str(s.file("photo.png", BINARY))])


cli("eval-checkpoint-weights-nan", "model.safetensors", "NaN")(
    lambda s: ["eval", str(poison_weights(s.checkpoint)), "--data", str(s.corpus)])


@cli("eval-truncated-model-onnx", "model.onnx")
def _(s):
    model = s.package / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return ["eval", str(s.package), "--data", str(s.corpus)]


# generate ------------------------------------------------------------------------------------------

cli("generate-top-p-1.5", "top_p")(lambda s: ["generate", "Hi", "--model", str(s.package), "--top-p", "1.5"])
cli("generate-temperature-negative", "temperature")(
    lambda s: ["generate", "Hi", "--model", str(s.package), "--temperature", "-1"])
cli("generate-max-new-tokens-negative", "max_new_tokens")(
    lambda s: ["generate", "Hi", "--model", str(s.package), "--max-new-tokens", "-1"])
cli("generate-repetition-penalty-zero", "repetition_penalty")(
    lambda s: ["generate", "Hi", "--model", str(s.package), "--repetition-penalty", "0"])
cli("generate-empty-stop-string", "stop")(lambda s: ["generate", "Hi", "--model", str(s.package), "--stop", ""])
cli("generate-prompt-longer-than-context", "context")(
    lambda s: ["generate", LONG_PROMPT, "--model", str(s.package)])
cli("generate-model-is-a-file", "no model package")(
    lambda s: ["generate", "Hi", "--model", str(s.file("model.onnx", b"onnx?"))])
cli("generate-unknown-provider", "--provider")(
    lambda s: ["generate", "Hi", "--model", str(s.package), "--provider", "tpu"])


# Python hands a program argv bytes that are not UTF-8 as lone surrogates (surrogateescape); run as a
# real process, "caf\udce9" reaches the command as the Latin-1 bytes b"caf\xe9".
cli("generate-prompt-not-utf8", "UTF-8", subprocess=True)(
    lambda s: ["generate", "caf\udce9 cr\udce8me", "--model", str(s.package)])


@cli("generate-zero-byte-model-onnx", "model.onnx")
def _(s):
    (s.package / "model.onnx").write_bytes(b"")
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-truncated-model-onnx", "model.onnx", subprocess=True)
def _(s):
    model = s.package / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-package-missing-tokenizer", "tokenizer.json", "missing")
def _(s):
    (s.package / "tokenizer.json").unlink()
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-config-wrong-type", "n_layers")
def _(s):
    s.edit_json(s.package_without_manifest() / "config.json", lambda c: c["model"].update(n_layers="four"))
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-config-missing-key", "graph")
def _(s):
    s.edit_json(s.package_without_manifest() / "config.json", lambda c: c.pop("graph"))
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-tokenizer-not-a-tokenizer", "tokenizer.json")
def _(s):
    (s.package_without_manifest() / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    return ["generate", "Hi", "--model", str(s.package)]


@cli("generate-generation-config-top-p-7", "generation_config.json", "top_p")
def _(s):
    s.edit_json(s.package_without_manifest() / "generation_config.json", lambda g: g.update(top_p=7))
    return ["generate", "Hi", "--model", str(s.package)]


# bench (measures in a child process: its errors must come back as the parent's one line) ------------

cli("bench-threads-zero", "--threads")(lambda s: ["bench", str(s.package), "--threads", "0", "--runs", "1"])
cli("bench-prompt-len-zero", "--prompt-len")(lambda s: ["bench", str(s.package), "--prompt-len", "0"])
cli("bench-runs-zero", "--runs")(lambda s: ["bench", str(s.package), "--runs", "0"])
cli("bench-prompt-beyond-context", "context")(
    lambda s: ["bench", str(s.package), "--prompt-len", "1000000000", "--runs", "1"])
cli("bench-positions-not-numbers", "--positions")(lambda s: ["bench", str(s.package), "--positions", "64,lots"])
cli("bench-negative-position", "--positions")(lambda s: ["bench", str(s.package), "--positions", "-5", "--runs", "1"])


@cli("bench-truncated-model-onnx", "model.onnx")
def _(s):
    model = s.package / "model.onnx"
    model.write_bytes(model.read_bytes()[:4096])
    return ["bench", str(s.package), "--runs", "1", "--new-tokens", "2"]


# convert -------------------------------------------------------------------------------------------

cli("convert-missing-source", "no/such/model", "neither")(lambda s: ["convert", "no/such/model", str(s.out / "hf")])


@cli("convert-into-someone-elses-directory", "not empty")
def _(s):
    (s.out / "docs").mkdir()
    (s.out / "docs" / "thesis.tex").write_text("\\documentclass{article}")  # deleted by the swap today
    return ["convert", str(s.checkpoint), str(s.out / "docs")]


@cli("convert-onto-itself", "overwrite")
def _(s):
    checkpoint = s.copy_of("tiny_checkpoint", s.out / "checkpoint")
    return ["convert", str(checkpoint), str(checkpoint)]


@cli("convert-hf-config-wrong-type", "hidden_size")
def _(s):
    from edgegpt.convert import to_huggingface

    hf = to_huggingface(s.checkpoint, s.root / "hf")
    s.edit_json(hf / "config.json", lambda c: c.update(hidden_size="big"))
    return ["convert", str(hf), str(s.out / "checkpoint")]


# info ----------------------------------------------------------------------------------------------

cli("info-missing-directory", "not a directory")(lambda s: ["info", "no/such/dir"])


@cli("info-config-not-json", "config.json", "JSON")
def _(s):
    (s.package / "config.json").write_bytes(BINARY)
    return ["info", str(s.package)]


@cli("info-config-a-list", "config.json")
def _(s):
    (s.package / "config.json").write_text("[1, 2, 3]")
    return ["info", str(s.package)]


@cli("info-manifest-a-string", "manifest.json")
def _(s):
    (s.package / "manifest.json").write_text('"hello"')
    return ["info", str(s.package)]


@cli("info-truncated-safetensors", "model.safetensors")
def _(s):
    weights = s.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["info", str(s.checkpoint)]


@cli("info-safetensors-header-without-shapes", "model.safetensors")
def _(s):
    header = json.dumps({"tok_emb.weight": {"dtype": "F32"}}).encode()
    (s.checkpoint / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return ["info", str(s.checkpoint)]


@pytest.mark.parametrize("case", [pytest.param(c, id=n, marks=c.marks) for n, c in CLI_CASES.items()])
def test_cli_bad_input_is_one_line_and_writes_nothing(case: Case, scene: Scene):
    args = case.build(scene)
    before = snapshot(scene.root)
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "edgegpt", *args], capture_output=True, text=True,
                              cwd=scene.root, env=os.environ, timeout=120)
        assert proc.stdout == ""
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, case.words)
    else:
        result = runner.invoke(app, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a crash: show its traceback, not just exit code 1
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, case.words)
    assert snapshot(scene.root) == before


# -- the Python API -----------------------------------------------------------------------------------


def generator(s: Scene, **load) -> Generator:
    return Generator.load(s.package, **{"provider": "cpu", **load})


# The builders below make their inputs now (copies, files) and return the call, so the snapshot taken
# between the two sees everything that existed before the call.


def loading(s: Scene, **load):
    s.package
    return lambda: generator(s, **load)


def generating(s: Scene, prompt, **options):
    s.package
    return lambda: generator(s).generate(prompt, **options)


def training(s: Scene, data: list[Path] | None = None, **options):
    opts = TrainOptions(**{"preset": "nano", "max_steps": 1, "block_size": 32, **options})
    data = [s.corpus] if data is None else data
    return lambda: train(data, [], s.out / "checkpoint", opts, cache_dir=s.cache)


def exporting(s: Scene, **options):
    checkpoint, out = s.checkpoint, s.existing_package_as_out()
    return lambda: export_package(checkpoint, out, **options)


api("generator-max-length-10^9", "max_length")(lambda s: loading(s, max_length=10**9))
api("generator-threads-zero", "threads")(lambda s: loading(s, threads=0))
api("generator-threads-a-string", "threads")(lambda s: loading(s, threads="4"))
api("generator-unknown-provider", "provider")(lambda s: loading(s, provider="tpu"))
api("generator-missing-package", "no model package")(
    lambda s: lambda: Generator.load(s.root / "nowhere"))
api("generate-top-p-1.5", "top_p")(lambda s: generating(s, "Hi", top_p=1.5))
api("generate-temperature-a-string", "temperature")(lambda s: generating(s, "Hi", temperature="hot"))
api("generate-max-new-tokens-a-float", "max_new_tokens")(lambda s: generating(s, "Hi", max_new_tokens=2.5))
api("generate-unknown-option", "top_q")(lambda s: generating(s, "Hi", top_q=0.5))
api("generate-prompt-bytes", "prompt", "string")(lambda s: generating(s, b"Hi"))
api("generate-prompt-lone-surrogate", "UTF-8")(lambda s: generating(s, "caf\udce9"))
api("generate-prompt-longer-than-context", "context")(lambda s: generating(s, LONG_PROMPT))
api("export-bits-3", "--bits")(lambda s: exporting(s, quantize=True, bits=3))
api("export-precision-int2", "--precision")(lambda s: exporting(s, precision="int2"))
api("export-eval-tokens-zero", "--eval-tokens")(
    lambda s: exporting(s, quantize=True, eval_data=s.corpus, eval_tokens=0))
api("export-missing-checkpoint", "no checkpoint")(
    lambda s: lambda: export_package(s.root / "nowhere", s.out / "model"))
api("train-negative-steps", "--max-steps")(lambda s: training(s, max_steps=-1))
api("train-unknown-preset", "unknown preset")(lambda s: training(s, preset="huge"))
api("train-missing-data", "does not exist")(lambda s: training(s, data=[s.root / "nowhere.txt"]))
api("train-binary-data", "UTF-8")(lambda s: training(s, data=[s.file("photo.png", BINARY)]))
api("train-batch-size-a-string", "--batch-size")(
    lambda s: training(s, batch_size="8"))
api("train-options-seed-negative", "--seed")(
    lambda s: TrainOptions(seed=-1).validate)
api("train-options-vocab-10^9", "--vocab-size")(
    lambda s: TrainOptions(vocab_size=10**9).validate)


@pytest.mark.parametrize("case", [pytest.param(c, id=n, marks=c.marks) for n, c in API_CASES.items()])
def test_api_bad_input_raises_edgegpt_error_and_writes_nothing(case: Case, scene: Scene):
    call = case.build(scene)
    before = snapshot(scene.root)
    with pytest.raises(EdgeGPTError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message  # the CLI prints it as one line
    for word in case.words:
        assert word in message, f"{word!r} not in {message!r}"
    assert snapshot(scene.root) == before


# -- inputs that are odd but legitimate: they work ----------------------------------------------------


def test_empty_prompt_starts_from_end_of_text(scene):
    """The runtime documents "" as starting from the end-of-text token (a document boundary), so it
    generates rather than erring, from the CLI and from Python."""
    g = generator(scene)
    assert g.encode("") == [g.package.generation.eos_token_id]
    assert g.generate_ids("", max_new_tokens=4, temperature=0, stop_at_eos=False) == \
        g.generate_ids("<|endoftext|>", max_new_tokens=4, temperature=0, stop_at_eos=False)
    result = runner.invoke(app, ["generate", "", "--model", str(scene.package), "--max-new-tokens", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")


def test_max_new_tokens_beyond_the_context_stops_at_the_context(scene):
    g = generator(scene)
    prompt = "The import statement"
    ids = g.generate_ids(prompt, max_new_tokens=10**9, temperature=0, stop_at_eos=False)
    # Every position of the context is used; the last token is predicted from the full context and,
    # never being fed back, needs no position of its own.
    assert len(g.encode(prompt)) + len(ids) == g.max_length + 1


def test_huge_single_line_eval_reads_only_what_it_scores(scene):
    """50 MB on one line: eval tokenizes only the characters its --eval-tokens can use."""
    huge = scene.root / "huge.txt"
    huge.write_text("the socket module " * (HUGE_LINE_CHARS // 18))
    result = runner.invoke(app, ["eval", str(scene.package), "--data", str(huge), "--eval-tokens", "512", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["capped"] is True and report["models"][0]["tokens"] == 512


@pytest.mark.slow  # a training run
def test_huge_line_without_whitespace_trains(scene):
    """A 2 MB line with no whitespace is one pre-token, and the BPE trainer's time grows with the square
    of a pre-token's length: 2.7 s at 100,000 characters, so ~20 minutes here (days at 50 MB). Training
    must cut it up and finish in seconds. A separate process, so that a regression fails at the timeout
    instead of hanging the suite. (50 MB lines are handled too, in bounded memory, but take ~30 s.)"""
    line = scene.file("genome.txt", "".join("ACGT"[(i * 7 + i // 3) % 4] for i in range(2_000_000)))
    proc = subprocess.run([sys.executable, "-m", "edgegpt", *scene.train("--json", data=line)], capture_output=True,
                          text=True, cwd=scene.root, env=os.environ, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["steps"] == 1
    assert (scene.out / "checkpoint" / "model.safetensors").is_file()


def test_long_text_is_tokenized_in_pieces_exactly_as_whole(tiny_checkpoint):
    """tokenize() encodes long documents piece by piece (bounded memory); the cuts must not change a token."""
    import numpy as np

    from edgegpt.tokenizer import PIECE_CHARS, load_tokenizer
    from edgegpt.train.data import tokenize

    tokenizer = load_tokenizer(tiny_checkpoint / "tokenizer.json")
    words = ["import", "x", "  ", "\n", "\n\n", " \n ", "\t", "42", "...", "'s", "café", "日本"]
    text = "".join(words[(i * 7 + i // 5) % len(words)] + " " * (i % 3) for i in range(4 * PIECE_CHARS // 3))
    assert len(text) > 3 * PIECE_CHARS
    whole = [0, *tokenizer.encode(text).ids]  # 0: <|endoftext|> starts every document
    assert np.array_equal(tokenize(tokenizer, [text]), whole)


def test_huge_prompt_is_refused_without_encoding_it(tiny_package, tmp_path):
    """A 50 MB prompt (from an app: argv cannot carry one) must be refused as longer than the context
    without tokenizing all of it, which takes ~10 GB. Run under a 2 GB address-space limit."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from edgegpt.core.errors import EdgeGPTError\n"
        "from edgegpt.runtime import Generator\n"
        "g = Generator.load(sys.argv[1], provider='cpu')\n"
        f"try:\n    g.generate('the socket module ' * {HUGE_LINE_CHARS // 18})\n"
        "except EdgeGPTError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_package)], capture_output=True, text=True,
                          cwd=tmp_path, env=os.environ, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "context" in proc.stdout
