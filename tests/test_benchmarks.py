"""Every benchmark subcommand runs end to end with --smoke (a tiny random model, seconds), so none can rot.

Each runs as a user runs it, `python benchmarks/X.py COMMAND --smoke`, in a fresh process, on one smoke kit
built once here (benchmarks/common.py: a random `nano` target whose later layers are silenced, a draft of its
first layers, the int8 package with that draft inside, a slice of text). The checks are on the printed table:
its header, its rows, numbers that parse, and the properties the kit was built to have (the draft computes the
target's very function; an int8 cache holds a quarter of float32's bytes), never on timings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """One smoke kit for every smoke run (building it is most of what a smoke run would spend alone)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    common = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = common  # its dataclass looks its module up while the module runs
    try:
        spec.loader.exec_module(common)
    finally:
        del sys.modules[spec.name]
    work = tmp_path_factory.mktemp("bench")
    return common.smoke_kit(work / "kit", work).root


def smoke(script: str, command: str, *options: str, kit: Path | None = None, prefix: tuple[str, ...] = ()) -> str:
    """`python benchmarks/SCRIPT COMMAND --smoke [--kit KIT] OPTIONS` in a fresh process: its stdout, after
    checking it exited 0. A wide COLUMNS keeps every table row on one line."""
    argv = [*prefix, sys.executable, str(BENCHMARKS / script), command, "--smoke", *options]
    if kit is not None:
        argv += ["--kit", str(kit)]
    env = {**os.environ, "COLUMNS": "260"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(argv[-6:])} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def rows(stdout: str) -> dict[str, list[str]]:
    """A rich table's body rows, by their first cell: {first cell: the other cells}."""
    table = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if line.lstrip().startswith("│") and len(cells) > 1:
            table[cells[0]] = cells[1:]
    return table


def number(cell: str) -> float:
    """A table cell as a number: '1,234', '12.5', '97.9%', '+0.20%', '-0.00%'."""
    return float(cell.replace(",", "").rstrip("%").replace("+", ""))


# -- speculative.py ------------------------------------------------------------------------------------------


def test_speculative_run_measures_every_mode_and_skips_a_missing_peer(kit, tmp_path):
    out = smoke("speculative.py", "run", "--genai", "--peers-work", str(tmp_path / "no-peers"), kit=kit)
    assert "acceptance" in out and "tokens/step" in out and "x plain" in out
    body = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
            if line.lstrip().startswith("│")]
    modes = {(r[0], r[2], r[3]) for r in body}
    for sampling in ("greedy", "T 0.8", "T 0.8 rep 1.1"):
        for mode in ("plain", "draft", "lookup", "draft+lookup"):
            assert ("shakespeare", sampling, mode) in modes
        for mode in ("plain", "lookup"):
            assert ("smol", sampling, mode) in modes
    for r in body:
        if r[3] in ("plain", "draft", "lookup", "draft+lookup"):
            assert number(r[6]) > 0  # decode tok/s
            assert number(r[5]) >= 1  # tokens per pass of the target
            assert r[3] == "plain" or r[4] == "–" or 0 <= number(r[4]) <= 100
    assert re.search(r"onnxruntime-genai .*skipped: RuntimeError: .*venv-builder.* is missing", out)


def test_speculative_costs_times_passes_by_length(kit):
    out = smoke("speculative.py", "costs", kit=kit)
    assert "median ms" in out
    timed = [line.split() for line in out.splitlines() if line.split()[:1] in (["target"], ["draft"])]
    assert {t[0] for t in timed} == {"target", "draft"}
    assert all(float(t[2]) > 0 and int(t[3]) >= 1 for t in timed)


def test_draft_recipes_finds_the_kits_draft_agrees_with_its_target(kit):
    # The kit's target adds exactly zero after the draft's layers: the same logits, so agreement is whole.
    out = smoke("speculative.py", "draft-recipes", kit=kit)
    assert "argmax" in out and "T0.8" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(kit / "draft")[-40:]])
    assert [float(x) for x in row[-3:]] == [1.0, 1.0, 1.0]


def test_target_continuations_writes_the_tokens_asked_for(kit, tmp_path):
    out_file = tmp_path / "continuations.txt"
    out = smoke("speculative.py", "target-continuations", "--out", str(out_file), kit=kit)
    count, tokens = map(lambda s: int(s.replace(",", "")),
                        re.search(r"(\d+) continuations, ([\d,]+) new tokens", out).groups())
    assert tokens >= 48 and count >= 1
    assert out_file.read_text(encoding="utf-8").strip()


# -- formats.py ----------------------------------------------------------------------------------------------


def test_quantization_builds_and_measures_each_kind_of_format(kit):
    out = smoke("formats.py", "quantization", kit=kit)
    assert "Δ perplexity" in out and "prefill ms" in out
    table = rows(out)
    for name in ("fp32", "fp32 + int8 cache", "int8 (default)", "int4 rtn sym (before)", "auto 1%"):
        assert name in table, name
        assert number(table[name][0]) > 0  # MB
    assert table["int8 (default)"][1] == "1.000"  # × int8
    assert number(table["fp32"][2]) == 4 * number(table["fp32 + int8 cache"][2])  # cache bytes per token
    assert number(table["int4 rtn sym (before)"][0]) < number(table["int8 (default)"][0]) < number(table["fp32"][0])


def test_kv_cache_measures_each_cache_with_its_bytes(kit):
    out = smoke("formats.py", "kv-cache", kit=kit)
    assert "KV-cache precision" in out and "× fp32 cache" in out
    table = rows(out)
    assert table["int8 weights, fp32 cache"][1] == "1.00"
    assert table["int8 weights, int8 cache"][1] == "0.25"
    assert all(number(cell) > 0 for cell in table["int8 weights, int8 cache"][2:4])  # decode tok/s @16, @64


def test_kernels_time_every_matmulnbits_case():
    out = smoke("formats.py", "kernels")
    assert "ms, 1 token" in out
    body = [line for line in out.splitlines() if line.lstrip().startswith("│")]
    assert [line.split("│")[1].strip() for line in body] == ["8"] * 3 + ["4"] * 6  # bits of each case
    assert all(float(line.split("│")[5]) >= 0 and float(line.split("│")[6]) >= 0 for line in body)  # ms, 1 and 16


def test_export_memory_measures_a_quantized_export_in_a_child_process():
    out = json.loads(smoke("formats.py", "export-memory", "--external-data-threshold", "0", "--json"))
    cfg = out["config"]
    head = cfg.get("head_dim") or cfg["dim"] // cfg["n_heads"]
    assert out["float32_weight_bytes"] == 4 * (cfg["vocab_size"] * cfg["dim"] + cfg["n_layers"] * (
        2 * cfg["dim"] + cfg["dim"] * (cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * head
        + cfg["n_heads"] * head * cfg["dim"] + 3 * cfg["dim"] * cfg["ffn_dim"]) + cfg["dim"])
    assert out["peak_rss_bytes"] >= out["baseline_rss_bytes"] > 0
    assert out["peak_over_weights"] == out["peak_rss_bytes"] / out["float32_weight_bytes"]
    assert {"model.onnx", "model.onnx.data", "manifest.json"} <= set(out["package_files"])  # threshold 0


def test_scale_takes_a_llama32_shaped_folder_through_convert_export_and_generate():
    out = json.loads(smoke("formats.py", "scale", "--json").strip().splitlines()[-1])
    cfg = out["config"]
    dim, head, ffn = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    per_layer = 2 * dim + dim * head * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2) + 3 * dim * ffn
    assert out["parameters"] == cfg["vocab_size"] * dim + dim + cfg["num_hidden_layers"] * per_layer  # tied head
    assert out["float32_weight_bytes"] == 4 * out["parameters"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"]
    steps = out["steps"]
    assert list(steps) == ["write folder", "convert", "export int8", "generate int8", "export int4", "generate int4"]
    for step in steps.values():
        assert step["seconds"] > 0 and step["peak_rss_bytes"] > 0
        assert step["peak_over_weights"] == step["peak_rss_bytes"] / out["float32_weight_bytes"]
    assert steps["generate int4"]["package_bytes"] < steps["generate int8"]["package_bytes"]
    assert steps["generate int8"]["text"].startswith("The first")  # the prompt, then its continuation
    assert set(out["within_bounds"]) == {"convert", "export int8", "export int4"}
    assert all(checks for checks in out["gates"].values())



def test_convert_memory_measures_convert_in_a_process_of_its_own():
    out = json.loads(smoke("formats.py", "convert-memory", "--json"))
    # The smoke folder's shape (formats.py SMOKE_SHAPE): vocabulary 512, hidden 64, 2 layers of 4 query heads
    # and 2 KV heads of 16 channels, FFN 128, a tied head.
    per_layer = 2 * 64 + 64 * 16 * (4 + 2 + 2 + 4) + 3 * 64 * 128
    assert out["float32_weight_bytes"] == 4 * (512 * 64 + 64 + 2 * per_layer)
    assert out["seconds"] > 0 and out["peak_rss_bytes"] > 0
    assert out["peak_over_weights"] == out["peak_rss_bytes"] / out["float32_weight_bytes"]
    assert out["within_bound"] == (out["peak_over_weights"] <= 2.5)

def test_pass_numerics_compares_a_one_token_pass_with_a_longer_one(kit):
    out = smoke("formats.py", "pass-numerics", kit=kit)
    found = re.search(r"at (\d+) positions: \|Δ logit\| median (\S+), largest (\S+); argmax differs at (\d+)", out)
    positions, median, largest, flips = found.groups()
    assert int(positions) >= 1 and 0 <= float(median) <= float(largest.rstrip(";")) and int(flips) <= int(positions)


# -- training.py ---------------------------------------------------------------------------------------------


def test_training_shakespeare_trains_and_scores_the_held_out_split():
    table = rows(smoke("training.py", "shakespeare"))
    assert table["steps"] == ["2"]
    assert number(table["val_nats_per_char"][0]) > 0 and number(table["val_chars"][0]) > 0


def test_training_distill_scores_teacher_and_both_students():
    table = rows(smoke("training.py", "distill"))
    for name in ("teacher_nats_per_char", "scratch_nats_per_char", "distilled_nats_per_char"):
        assert number(table[name][0]) > 0
    assert not math.isinf(float(table["gap_closed"][0]))  # a share, or nan when there is no gap to close


def test_training_teacher_speed_times_every_teacher(kit):
    table = rows(smoke("training.py", "teacher-speed", kit=kit))
    timed = {name.split(" (")[0]: cells for name, cells in table.items() if " (" in name}
    assert set(timed) == {"PyTorch", "package fp32", "package int8", "cached epoch"}
    assert all(number(cells[0]) > 0 and number(cells[1]) > 0 for cells in timed.values())  # tokens/s, × PyTorch
    assert timed["PyTorch"][1:] == ["1.00", "100.0%"]
    assert timed["cached epoch"][2] == timed["package fp32"][2]  # the very values the float32 package stored


# -- runtimes.py ---------------------------------------------------------------------------------------------


def test_runtimes_compare_measures_edgegpt_and_skips_peers_not_set_up(kit):
    out = smoke("runtimes.py", "compare", kit=kit)
    table = rows(out)
    for name in ("edgegpt fp32", "edgegpt int8", "edgegpt int4"):
        assert number(table[name][1]) > 0 and number(table[name][3]) > 0  # decode tok/s, TTFT ms
    assert table["edgegpt fp32"][-1] == "16/16"  # greedy tokens equal to edgegpt fp32's own
    for peer in ("PyTorch eager fp32", "optimum int8 dynamic", "onnxruntime-genai int4", "llama.cpp Q8_0"):
        assert re.search(rf"skipped {re.escape(peer)}: RuntimeError: .*runtimes.py setup", out), peer


def test_runtimes_cuda_measures_on_the_cpu_without_a_gpu():
    out = smoke("runtimes.py", "cuda")
    row = next(line.split() for line in out.splitlines() if line.startswith("nano"))
    assert [number(cell) > 0 for cell in row[2:]] == [True, True, True]


def test_runtimes_setup_installs_nothing_in_a_smoke_run():
    assert "skipped setup" in smoke("runtimes.py", "setup")


# -- real_model.py ------------------------------------------------------------------------------------------


def test_real_model_takes_a_gguf_file_through_every_command_and_skips_peers_not_set_up(tmp_path):
    out = smoke("real_model.py", "run", "--peers", "--peers-work", str(tmp_path / "no-peers"), "--json")
    figures = json.loads(out.strip().splitlines()[-1])["models"]["smoke"]
    assert figures["convert"]["seconds"] > 0 and figures["convert"]["peak_rss_mb"] > 0
    formats = figures["formats"]
    for name, row in formats.items():
        assert row["gate"] in ("pass", "FAIL (written with --no-gate)"), name
        assert row["export_peak_rss_mb"] > 0 and row["decode_tokens_per_s"] > 0 and row["perplexity"] > 1
        assert len(row["completions"]) == 6 and 0 <= row["completions_right"] <= 6
    assert formats["int4"]["size_mb"] < formats["int8"]["size_mb"] < formats["fp32"]["size_mb"]
    assert formats["fp32"]["delta_vs_fp32_package"] == 0
    table = rows(out)
    assert [table[name][3] for name in ("fp32", "int8", "int4")] == [formats[n]["gate"] for n in formats]
    # The converted weights are what transformers' own GGUF loader reads from the same file.
    assert figures["import_max_abs_logit_diff"] < 1e-3
    assert "tokenization check skipped: tokenizer.ggml.model is 'gpt2'" in out
    peers = figures["peers"]
    assert peers["decode_median"]["edgegpt int8"] > 0 and peers["perplexity"]["edgegpt int8"]["perplexity"] > 1
    assert re.search(r"skipped onnxruntime-genai int8: RuntimeError: .*runtimes.py setup", out)
    assert re.search(r"skipped llama.cpp: not built under .*no-peers", out)


# -- serving.py ----------------------------------------------------------------------------------------------


def test_serving_load_serves_every_client_count(kit):
    out = smoke("serving.py", "load", kit=kit)
    body = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
            if line.lstrip().startswith("│")]
    assert [(r[0], r[1]) for r in body] == [("2", "1"), ("2", "2")]
    assert all(number(r[2]) > 0 and r[-1] == "0" for r in body)  # edgegpt tok/s, no errors
    assert "skipped llama.cpp" in out


def test_serving_soak_passes_its_memory_and_idle_checks(kit):
    out = smoke("serving.py", "soak", kit=kit)
    assert "30 generations" in out and out.strip().splitlines()[-1].startswith("PASS")


def test_serving_startup_times_the_desktop_app(kit):
    if shutil.which("xvfb-run") is None:  # no display to open a window on: the smoke run says so and ends
        out = smoke("serving.py", "startup", kit=kit)
        assert "skipped startup: no DISPLAY" in out
        return
    out = smoke("serving.py", "startup", kit=kit, prefix=("xvfb-run", "-a"))
    row = next(line.split() for line in out.splitlines() if line.startswith("python "))
    assert number(row[1]) > 0 and number(row[2]) >= number(row[1])  # start → window, start → model ready


# -- cache_memory.py -----------------------------------------------------------------------------------------


def test_cache_memory_counts_window_sized_buffers_below_a_full_cache():
    """--smoke: a tiny sliding model past its window holds fewer cache bytes than every layer holding it all."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cache_memory.py"), "--smoke"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["sliding_layers"] == 2 and row["n_layers"] == 3
    assert 0 < row["held_bytes"] < row["full_cache_bytes"]


# -- finetune.py ---------------------------------------------------------------------------------------------


def test_finetune_faq_trains_three_wordings_and_scores_others(tmp_path):
    smoke("finetune.py", "faq", "--out", str(tmp_path))
    read = [[json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "val", "heldout")]
    train, val, held_out = read
    faq = [q for q in held_out if q["kind"] == "faq"]
    assert len(faq) >= 20 and len(train) == 3 * len(faq) and len(val) == len(faq)
    assert sum(q["kind"] == "general" for q in held_out) == 5
    trained = {r["messages"][0]["content"] for r in train}
    validated = {r["messages"][0]["content"] for r in val}
    assert not trained & validated and not (trained | validated) & {q["question"] for q in held_out}
    answers = [r["messages"][1]["content"] for r in train]
    for question in faq:  # each key is in the answer trained for it (three times), never in a question
        (key,) = question["keys"]
        assert sum(key.lower() in answer.lower() for answer in answers) >= 3, key
        assert not any(key.lower() in q.lower() for q in trained | validated | {question["question"]}), key


def test_finetune_run_trains_exports_and_asks_every_model():
    out = smoke("finetune.py", "run", "--json")
    figures = json.loads(out.strip().splitlines()[-1])
    rows = figures["rows"]
    assert set(rows) == {"base", "LoRA", "LoRA int8", "full", "full int8", "base (transformers)", "transformers LoRA",
                         "transformers full"}
    for name, row in rows.items():
        assert (row["held_out"], row["general"], len(row["replies"])) == (25, 5, 30), name
        assert 0 <= row["held_out_right"] <= 25 and row["held_out_right"] == sum(row["right"][:25]), name
    for name in ("LoRA", "full", "transformers LoRA", "transformers full"):
        assert rows[name]["steps"] == 2 and rows[name]["tokens_per_s"] > 0 and rows[name]["peak_rss_mb"] > 0, name
    for name in ("LoRA", "full"):  # edgegpt's steps alone, and its whole run with validation and saving
        assert rows[name]["tokens_per_s"] > rows[name]["run_tokens_per_s"] > 0, name
    for name in ("LoRA int8", "full int8"):
        assert rows[name]["gate"] in ("pass", "FAIL") and rows[name]["export_peak_rss_mb"] > 0
    assert "LoRA: edgegpt tokens/s >= transformers'" in figures["acceptance"]


def test_finetune_steps_are_reused_only_with_the_outputs_they_read(tmp_path, monkeypatch):
    """A step whose command is unchanged runs again when a step it reads ran again (an export of a model
    trained anew is a new export), and not otherwise."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_finetune", BENCHMARKS / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)

    def write(name: str) -> list:
        return [sys.executable, "-c", f"import pathlib; pathlib.Path(r'{tmp_path / name}').mkdir(); "
                                      f"(pathlib.Path(r'{tmp_path / name}') / 'out').write_text('x')"]

    def both(steps):
        train = steps.run("train", tmp_path / "train" / "out", write("train"))
        return train, steps.run("export", tmp_path / "export" / "out", write("export"), after=(train,))

    train, export = both(finetune.Steps(tmp_path, fresh=False))
    again = both(finetune.Steps(tmp_path, fresh=False))
    assert [step["made"] for step in again] == [train["made"], export["made"]]  # nothing ran
    (tmp_path / "train" / "out").unlink()  # the model is trained again: its export must be made again
    retrained, reexported = both(finetune.Steps(tmp_path, fresh=False))
    assert retrained["made"] > train["made"] and reexported["made"] > export["made"]
    assert reexported["after"] == [retrained["made"]]


def test_finetune_memory_trains_lora_on_a_qwen2_shaped_model():
    out = json.loads(smoke("finetune.py", "memory", "--json").strip().splitlines()[-1])
    cfg = out["config"]
    dim, head, ffn = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = 2 * dim + dim * head * (2 * heads + 2 * kv) + head * (heads + 2 * kv) + 3 * dim * ffn  # + biases
    assert cfg["model_type"] == "qwen2"
    assert out["parameters"] == cfg["vocab_size"] * dim + dim + cfg["num_hidden_layers"] * per_layer  # tied head
    assert out["steps"] == 2 and out["train"]["peak_rss_mb"] > 0 and out["train"]["tokens_per_s"] > 0
    assert out["within_bound"] == (out["train"]["peak_rss_mb"] * 1e6 <= 8e9)


def test_stage_memory_attributes_each_peak_to_the_stage_that_made_it():
    """A child that announces two stages and allocates 200 MB only in the second: the second's peak is the
    larger by about that much, and the exit status is reported."""
    script = ("import time; print('stage one', flush=True); time.sleep(0.3); "
              "print('stage two', flush=True); block = bytearray(200_000_000); time.sleep(0.3)")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "stage_memory.py"),
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    peaks = {m.group(2): int(m.group(1).replace(",", ""))
             for m in re.finditer(r"^\s*([\d,]+) MiB  (.+)$", done.stdout, re.MULTILINE)}
    assert peaks["stage two"] - peaks["stage one"] > 150, done.stdout
    assert "exit status 0" in done.stdout
