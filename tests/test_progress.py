"""Progress of the long commands: the library reports each tensor, window and matrix through callbacks
(done rising to total, never printing); the CLI draws them as bars on a terminal, and nowhere else."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

import edgegpt.cli.console as console_module
from conftest import EVAL_TOKENS
from edgegpt.cli.app import app
from edgegpt.cli.console import StageProgress
from edgegpt.convert import convert

runner = CliRunner()
COUNT = re.compile(r"(\d+)/(\d+)")


class Recorder:
    """The two callbacks, keeping each stage's steps under the stage's message."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, list[tuple[int, int]]]] = [("(before any stage)", [])]

    def stage(self, message: str) -> None:
        self.stages.append((message, []))

    def steps(self, done: int, total: int) -> None:
        self.stages[-1][1].append((done, total))

    def counted(self, fragment: str) -> list[tuple[int, int]]:
        found = [steps for message, steps in self.stages if fragment in message]
        assert found, f"no stage says {fragment!r}: {[m for m, _ in self.stages]}"
        return found[0]


def assert_rising_to_total(steps: list[tuple[int, int]]) -> int:
    """done strictly increasing, one total throughout, the last done equal to it; returns the total."""
    assert steps, "no steps reported"
    totals = {total for _, total in steps}
    assert len(totals) == 1, totals
    done = [d for d, _ in steps]
    assert all(b > a for a, b in zip(done, done[1:])), done
    assert done[0] >= 1 and done[-1] == steps[0][1], steps
    return steps[0][1]


def terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


# -- the library's callbacks ---------------------------------------------------------------------------------


def test_converting_a_gguf_file_reports_every_tensor(tmp_path, corpus_text):
    pytest.importorskip("gguf", reason="gguf is in the [convert] extra")
    from test_convert_gguf import Q, tiny_model, tokenizer_meta, train_original, write_gguf

    tokenizer = train_original("gpt2", corpus_text[:20_000])
    model = tiny_model(tokenizer.get_vocab_size())
    source = write_gguf(tmp_path / "tiny.gguf", model, tokenizer_meta(tokenizer, "gpt2", eos=0), Q.Q8_0)
    steps: list[tuple[int, int]] = []
    convert(source, tmp_path / "checkpoint", progress=lambda done, total: steps.append((done, total)))
    stored = [name for name in model.state_dict() if name != "lm_head.weight"]  # tied: the head is the embedding
    assert assert_rising_to_total(steps) == len(stored)


def test_converting_a_hugging_face_folder_reports_every_tensor(tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    hf = tmp_path / "hf"
    convert(tiny_checkpoint, hf)
    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        tensors = len(list(f.keys()))
    steps: list[tuple[int, int]] = []
    convert(hf, tmp_path / "checkpoint", progress=lambda done, total: steps.append((done, total)))
    assert assert_rising_to_total(steps) == tensors


@pytest.mark.slow  # a quantized, gated export of the tiny model
def test_quantized_export_counts_calibration_quantization_and_gates(tmp_path, tiny_checkpoint, corpus_file):
    import onnx

    from edgegpt.export import export_package

    recorder = Recorder()
    export_package(tiny_checkpoint, tmp_path / "model", quantize=True, progress=recorder.stage,
                   steps=recorder.steps, eval_data=corpus_file, eval_tokens=EVAL_TOKENS)
    assert assert_rising_to_total(recorder.counted("calibrating")) >= 1
    matrices = assert_rising_to_total(recorder.counted("quantizing weights"))
    reference = assert_rising_to_total(recorder.counted("scoring held-out text with PyTorch"))
    gates = assert_rising_to_total(recorder.counted("scoring held-out text with the int8 package"))
    # Every projection once at 8 bits: each MatMulNBits of the package but the LM head's (quantized apart).
    graph = onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False)
    assert matrices == sum(node.op_type == "MatMulNBits" for node in graph.graph.node) - 1
    # The gates' counts: PyTorch's windows and its greedy continuations (before quantizing, so its weights can be
    # freed), then the package's.
    scoring = next(message for message, _ in recorder.stages if "scoring held-out text" in message)
    windows = int(re.search(r"\((\d+) windows of", scoring).group(1))
    assert reference == gates == windows + 1
    stages = [message for message, _ in recorder.stages]
    assert stages.index(scoring) < next(i for i, m in enumerate(stages) if "quantizing weights" in m)
    for message, steps in recorder.stages:  # whatever a stage counts rises to its total
        if steps:
            assert_rising_to_total(steps)


# -- what the CLI draws ---------------------------------------------------------------------------------------


def test_stage_progress_draws_bars_only_on_a_terminal():
    console, buffer = terminal()
    with StageProgress(console) as shown:
        shown.stage("quantizing weights")
        for done in range(1, 13):
            shown.steps(done, 12)
        shown.stage("writing the package")
    drawn = buffer.getvalue()
    assert "━" in drawn and "12/12" in drawn and "quantizing weights" in drawn and "writing the package" in drawn

    piped = io.StringIO()
    with StageProgress(Console(file=piped, width=120)) as shown:
        shown.stage("quantizing weights")
        shown.steps(3, 12)
        shown.stage("writing the package")
    assert piped.getvalue().splitlines() == ["quantizing weights", "writing the package"]  # lines, as before bars

    silent = io.StringIO()
    with StageProgress(Console(file=silent, width=120), stage_lines=False) as shown:
        shown.stage("converting")
        shown.steps(1, 1)
    assert silent.getvalue() == ""


def test_cli_convert_draws_a_bar_on_a_terminal_and_nothing_elsewhere(tmp_path, tiny_checkpoint, monkeypatch):
    hf = tmp_path / "hf"
    convert(tiny_checkpoint, hf)
    quiet = runner.invoke(app, ["convert", str(hf), str(tmp_path / "quiet")])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.startswith("huggingface → checkpoint")

    console, buffer = terminal()
    monkeypatch.setattr(console_module, "stderr", console)
    shown = runner.invoke(app, ["convert", str(hf), str(tmp_path / "shown")])
    assert shown.exit_code == 0, shown.output
    drawn = buffer.getvalue()
    counts = {(int(a), int(b)) for a, b in COUNT.findall(drawn)}
    assert "━" in drawn and any(a == b > 1 for a, b in counts), drawn[-2000:]
    assert "writing the checkpoint" in drawn
    assert shown.stdout.startswith("huggingface → checkpoint")  # the result still on stdout, bars on stderr only


@pytest.mark.slow  # two exports through the CLI
def test_cli_export_draws_stage_bars_on_a_terminal_and_none_with_json(tmp_path, tiny_checkpoint, monkeypatch):
    console, buffer = terminal()
    monkeypatch.setattr(console_module, "stderr", console)
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--json"])
    assert result.exit_code == 0, result.output
    assert buffer.getvalue() == "" and result.stderr == ""
    assert json.loads(result.stdout)["precision"] == "float32"

    shown = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model")])
    assert shown.exit_code == 0, shown.output
    drawn = buffer.getvalue()
    assert "━" in drawn and "✓" in drawn, drawn[-2000:]
    assert "building the fused float32 graph" in drawn and "checking the float32 graph against PyTorch" in drawn
    assert shown.stderr == ""  # everything went to the terminal console, nothing as plain lines

