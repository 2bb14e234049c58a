"""`edgegpt bench` on the tiny package: the report's fields exist, have sane units and relations.
No timing thresholds: speed is a benchmark, not a test (this machine's runs move by ±20%)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.cli.bench import bench_table, run_bench
from edgegpt.core.errors import EdgeGPTError


@pytest.fixture(scope="module")
def report(tiny_package):
    return run_bench(tiny_package, prompt_len=16, new_tokens=8, threads=1, provider="cpu", runs=2, positions=(4, 64))


def test_report_fields_and_units(report, tiny_package):
    assert report["provider"] == "cpu" and report["threads"] == 1
    assert (report["prompt_len"], report["new_tokens"], report["runs"]) == (16, 8, 2)
    # Seconds, not milliseconds: a tiny model loads and answers well inside a minute, and above a microsecond.
    for key in ("cold_start_s", "load_s", "ttft_s"):
        assert 1e-6 < report[key] < 60, key
    # The cold start includes an interpreter start, the imports, a load and a prefill.
    assert report["cold_start_s"] > report["load_s"] and report["cold_start_s"] > report["ttft_s"]
    assert report["decode_tokens_per_s"] > 1 and len(report["decode_runs"]) == 2
    assert set(report["decode_tokens_per_s_at"]) == {"4", "64"}
    assert all(rate > 1 for rate in report["decode_tokens_per_s_at"].values())
    # Megabytes of the child process: an interpreter with onnxruntime is tens of MB, never gigabytes.
    assert 10 < report["peak_rss_mb"] < 4000
    assert report["model_bytes"] == (tiny_package / "model.onnx").stat().st_size
    json.dumps(report)  # --json must be able to print it


def test_table_shows_every_measure(report):
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(bench_table(report))
    text = console.export_text()
    for label in ("cold start", "load", "time to first token", "decode", "peak RSS", "position 64"):
        assert label in text


def test_cli_json_and_errors(tiny_package, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(tiny_package), "--prompt-len", "4", "--new-tokens", "2",
                                 "--threads", "1", "--runs", "1", "--provider", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["new_tokens"] == 2
    result = runner.invoke(app, ["bench", str(tmp_path / "missing"), "--runs", "1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    with pytest.raises(EdgeGPTError, match="exceed"):  # the tiny model's context is 128 tokens
        run_bench(tiny_package, prompt_len=120, new_tokens=20, threads=1, provider="cpu", runs=1)


def test_max_length_reaches_the_benchmarked_generator(tiny_package, report):
    assert report["max_length"] == 128  # the default: the model's context
    result = CliRunner().invoke(app, ["bench", str(tiny_package), "--prompt-len", "4", "--new-tokens", "2",
                                      "--threads", "1", "--runs", "1", "--provider", "cpu", "--max-length", "16",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_length"] == 16
    with pytest.raises(EdgeGPTError, match=r"exceed the context of 16 \(--max-length\)"):
        run_bench(tiny_package, prompt_len=10, new_tokens=10, threads=1, provider="cpu", runs=1, max_length=16)
    with pytest.raises(EdgeGPTError, match="--max-length must be at least 1"):
        run_bench(tiny_package, max_length=0)
