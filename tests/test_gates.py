"""Quality gates and `edgegpt eval`: a failed gate writes nothing (or, with --no-gate, says so in the
manifest), and every bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EVAL_TOKENS, assert_one_line_error
from edgegpt.cli.app import app
from edgegpt.export import GateFailed, GateLimits, export_package

runner = CliRunner()
STRICT = GateLimits(perplexity_increase={"int8": -0.5})  # perplexity would have to halve


@pytest.mark.slow  # over half a second on two cores
def test_failed_gate_writes_nothing_and_keeps_the_old_package(tiny_checkpoint, tiny_package, corpus_file, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_package, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(GateFailed, match=r"int8 perplexity vs PyTorch .* \(limit -50\.00%\); no package") as failed:
        export_package(tiny_checkpoint, out, quantize=True, eval_data=corpus_file, eval_tokens=EVAL_TOKENS,
                       gate_limits=STRICT)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left
    report = failed.value.report.to_dict()
    assert report["written"] is False and report["gates"]["passed"] is False
    assert [m["name"] for m in report["gates"]["models"]] == ["PyTorch float32", "package (fused, int8)"]


@pytest.mark.slow  # over half a second on two cores
def test_no_gate_writes_and_records_the_failure(tiny_checkpoint, corpus_file, tmp_path):
    report = export_package(tiny_checkpoint, tmp_path / "model", quantize=True, eval_data=corpus_file,
                            eval_tokens=EVAL_TOKENS, gate=False, gate_limits=STRICT)
    gates = json.loads((tmp_path / "model" / "manifest.json").read_text())["gates"]
    assert gates["enabled"] is False and gates["passed"] is False and report.to_dict()["written"]
    info = runner.invoke(app, ["info", str(tmp_path / "model")])
    assert info.exit_code == 0 and "--no-gate" in info.stdout and "FAIL" in info.stdout


def test_float32_logit_gate(tiny_checkpoint, tmp_path):
    with pytest.raises(GateFailed, match="float32 graph max"):
        export_package(tiny_checkpoint, tmp_path / "model", gate_limits=GateLimits(logit_tolerance=-1.0))
    assert not (tmp_path / "model").exists()


@pytest.mark.slow  # over half a second on two cores
def test_cli_prints_the_table_then_one_line_when_a_gate_fails(tiny_checkpoint, corpus_file, tmp_path, monkeypatch):
    import edgegpt.export.gates as gates

    monkeypatch.setitem(gates.PERPLEXITY_LIMITS, "int8", -0.5)
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--quantize",
                                 "--eval-data", str(corpus_file), "--eval-tokens", str(EVAL_TOKENS)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("edgegpt: error: ")]
    assert error == [result.stderr.strip().splitlines()[-1]]  # after the progress lines, exactly one
    assert "quality gate failed" in error[0] and "limit -50.00%" in error[0] and "--no-gate" in error[0]
    assert "quality gates" in result.stdout and "FAIL" in result.stdout and "GroupQueryAttention" in result.stdout
    assert not (tmp_path / "model").exists()


def test_export_table_shows_census_and_gates(tiny_package_int8, tiny_checkpoint):
    info = runner.invoke(app, ["info", str(tiny_package_int8)])
    assert info.exit_code == 0, info.output
    for fragment in ("GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized", "quality gates (on): passed",
                     "int8 perplexity vs PyTorch", "PyTorch float32", "quantization"):
        assert fragment in info.stdout, fragment


@pytest.mark.parametrize("args,fragments", [
    (["--bits", "3", "--quantize"], ["--bits 3", "8 or 4"]),
    (["--bits", "3"], ["--bits 3"]),
    (["--precision", "fp16", "--quantize"], ["--quantize applies to float32"]),
    (["--precision", "bf16"], ["--precision bf16"]),
    (["--precision", "fp16", "--no-fuse"], ["fused graph"]),
    (["--quantize"], ["train_state.json", "--eval-data"]),  # the fixture checkpoint records no training data
    (["--method", "dynamic"], ["--method dynamic", "add --quantize"]),
    (["--quantize", "--bits", "4", "--method", "dynamic"], ["int8 only"]),
    (["--quantize", "--method", "gptq"], ["unknown quantization method 'gptq'", "nbits, dynamic"]),
])
def test_bad_export_options(tiny_checkpoint, tmp_path, args, fragments):
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), *args])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "model").exists()


def test_float16_gate_needs_cuda(tiny_checkpoint, tmp_path):
    from edgegpt.runtime.session import cuda_available

    if cuda_available():
        pytest.skip("this onnxruntime has CUDA: the float16 gate can run")
    fp16 = ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--precision", "fp16"]
    result = runner.invoke(app, fp16)
    assert_one_line_error(result, "float16 gate", "--no-gate")
    result = runner.invoke(app, [*fp16, "--no-gate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "float16"


def test_eval_text_below_the_minimum(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--quantize",
                                 "--eval-data", str(short)])
    assert_one_line_error(result, "too few to score", "at least 129", "short.txt")
    assert not (tmp_path / "model").exists()
    result = runner.invoke(app, ["eval", str(tiny_checkpoint), "--data", str(short)])
    assert_one_line_error(result, "too few to score", "at least 129")


def test_checkpoint_whose_config_and_weights_disagree(tiny_checkpoint, tmp_path):
    bad = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    config = json.loads((bad / "config.json").read_text())
    config["n_layers"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    for command in (["export", str(bad), "--out", str(tmp_path / "model")], ["eval", str(bad), "--data", str(bad)]):
        assert_one_line_error(runner.invoke(app, command), "config and weights disagree")
    assert not (tmp_path / "model").exists()


# -- edgegpt eval ------------------------------------------------------------------------------------


@pytest.mark.slow  # over half a second on two cores
def test_eval_checkpoint_and_package_agree(tiny_checkpoint, tiny_package, corpus_file):
    args = ["--data", str(corpus_file), "--eval-tokens", str(EVAL_TOKENS), "--json"]
    torch_run = runner.invoke(app, ["eval", str(tiny_checkpoint), *args])
    assert torch_run.exit_code == 0, torch_run.output
    (checkpoint_row,) = json.loads(torch_run.stdout)["models"]
    compared = runner.invoke(app, ["eval", str(tiny_package), "--reference", str(tiny_checkpoint), *args])
    assert compared.exit_code == 0, compared.output
    reference_row, package_row = json.loads(compared.stdout)["models"]
    assert reference_row["nats_per_token"] == pytest.approx(checkpoint_row["nats_per_token"], rel=1e-9)
    # The float32 package is PyTorch within 1e-4 in logits: the same figures, the same choices.
    assert package_row["nats_per_char"] == pytest.approx(checkpoint_row["nats_per_char"], rel=1e-4)
    assert package_row["top1_agreement"] > 0.99 and package_row["greedy_agreement"] > 0.95
    assert checkpoint_row["tokens"] == EVAL_TOKENS and checkpoint_row["perplexity"] > 1
    table = runner.invoke(app, ["eval", str(tiny_package), "--data", str(corpus_file), "--eval-tokens", "1024"])
    assert table.exit_code == 0 and "nats/char" in table.stdout and "perplexity" in table.stdout


def test_eval_of_a_package_works_without_torch(tiny_package, corpus_file):
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from edgegpt.cli.app import main\n"
            f"sys.argv = ['edgegpt', 'eval', {str(tiny_package)!r}, '--data', {str(corpus_file)!r}, "
            "'--eval-tokens', '256', '--json']\nmain()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["models"][0]["nats_per_char"] > 0


def test_eval_of_a_package_needs_data(tiny_package):
    assert_one_line_error(runner.invoke(app, ["eval", str(tiny_package)]), "--data")


@pytest.mark.slow  # over half a second on two cores
def test_the_method_option_reaches_the_quantizer(tiny_checkpoint, corpus_file, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(out), "--quantize", "--method", "dynamic",
                                 "--eval-data", str(corpus_file), "--eval-tokens", "1024", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "dynamic" and manifest["gates"]["passed"]
