"""Scoring in windows (`--window`): a text shorter than the model's context scores, the window is recorded,
a text below the minimum or a window the model cannot hold is one line; and the PyTorch reference's
shortcuts (the LM head on scored positions only, the greedy prompts as one batch) change no figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.scoring import MIN_EVAL_TOKENS, MIN_WINDOW, strided_windows

runner = CliRunner()
LONG_CONTEXT = 2048  # the copy of the tiny checkpoint below: a context longer than any text here


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a 2,048-token context: rotary positions have no weights, so only
    config.json changes, and a text of a few hundred tokens is far shorter than one context."""
    directory = Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("long") / "checkpoint"))
    config = json.loads((directory / "config.json").read_text())
    config["max_len"] = LONG_CONTEXT
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def few_hundred_tokens(corpus_text, tmp_path_factory, tiny_checkpoint) -> tuple[Path, int]:
    """A text file of a few hundred tokens, and its token count as eval counts it (end-of-text first)."""
    from edgegpt.checkpoint import load_checkpoint

    text = corpus_text[:1200]
    n_tokens = 1 + len(load_checkpoint(tiny_checkpoint)[1].encode(text).ids)
    assert 200 <= n_tokens <= 600, n_tokens
    path = tmp_path_factory.mktemp("short-text") / "few-hundred.txt"
    path.write_text(text, encoding="utf-8")
    return path, n_tokens


def test_a_text_shorter_than_the_context_scores(long_context_checkpoint, few_hundred_tokens):
    text, n_tokens = few_hundred_tokens
    result = runner.invoke(app, ["eval", str(long_context_checkpoint), "--data", str(text), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["window"] == 1024 and data["stride"] == 512  # default: min(context, 1,024)
    (row,) = data["models"]
    assert row["tokens"] == n_tokens - 1 and np.isfinite(row["nats_per_char"]) and row["perplexity"] > 1


def test_window_option_of_eval(tiny_checkpoint, few_hundred_tokens):
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.quality import prepare_eval_text
    from edgegpt.reference import TorchReference
    from edgegpt.scoring import score

    path, n_tokens = few_hundred_tokens
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    text = prepare_eval_text([path.read_text(encoding="utf-8")], "t", tokenizer, model.cfg.vocab_size, 128)
    rows = {}
    for window in (16, 64):
        result = runner.invoke(app, ["eval", str(tiny_checkpoint), "--data", str(path), "--window", str(window),
                                     "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["window"] == window and data["stride"] == window // 2
        rows[window] = data["models"][0]
        assert rows[window]["tokens"] == n_tokens - 1  # every target once, whatever the window
        # What eval printed is the text scored in windows of exactly that size.
        expected = score(TorchReference(model).logit_chunks, text.tokens, strided_windows(n_tokens, window),
                         text.char_table)
        assert rows[window]["nats_per_token"] == pytest.approx(expected.nats_per_token, rel=1e-6)
    assert rows[16]["nats_per_token"] != pytest.approx(rows[64]["nats_per_token"], rel=1e-4)
    table = runner.invoke(app, ["eval", str(tiny_checkpoint), "--data", str(path), "--window", "32"])
    assert table.exit_code == 0 and "windows of 32 tokens, stride 16" in " ".join(table.stdout.split())


@pytest.mark.slow  # over half a second on two cores
def test_export_records_the_window(long_context_checkpoint, few_hundred_tokens, tmp_path):
    text, n_tokens = few_hundred_tokens
    result = runner.invoke(app, ["export", str(long_context_checkpoint), "--out", str(tmp_path / "model"),
                                 "--quantize", "--eval-data", str(text), "--window", "256", "--json"])
    assert result.exit_code == 0, result.output
    gates = json.loads((tmp_path / "model" / "manifest.json").read_text())["gates"]
    assert gates["passed"] and gates["eval"]["window"] == 256 and gates["eval"]["stride"] == 128
    assert gates["eval"]["tokens"] == n_tokens - 1
    # The package scores the same text the same way outside the export.
    again = runner.invoke(app, ["eval", str(tmp_path / "model"), "--data", str(text), "--window", "256", "--json"])
    assert again.exit_code == 0, again.output
    package_row = [m for m in gates["models"] if m["name"].startswith("package")][0]
    assert json.loads(again.stdout)["models"][0]["nats_per_token"] == pytest.approx(package_row["nats_per_token"],
                                                                                     rel=1e-6)


@pytest.mark.parametrize("window,fragments", [
    ("4096", ["--window 4096", "context (128 tokens)", "at most 128"]),
    (str(MIN_WINDOW - 1), ["--window", f"at least {MIN_WINDOW}"]),
])
def test_a_window_the_model_cannot_hold_is_one_line(tiny_checkpoint, tiny_package, corpus_file, tmp_path, window,
                                                     fragments):
    for model in (tiny_checkpoint, tiny_package):
        result = runner.invoke(app, ["eval", str(model), "--data", str(corpus_file), "--window", window])
        assert_one_line_error(result, *fragments)
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--quantize",
                                 "--eval-data", str(corpus_file), "--window", window])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "model").exists()


def test_a_text_just_above_the_minimum_scores_and_one_below_is_refused(tiny_checkpoint, corpus_text, tmp_path):
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.core.errors import EdgeGPTError
    from edgegpt.quality import prepare_eval_text

    tokenizer = load_checkpoint(tiny_checkpoint)[1]
    ids = tokenizer.encode(corpus_text[:4000]).ids
    for n_targets, ok in ((MIN_EVAL_TOKENS, True), (MIN_EVAL_TOKENS - 1, False)):
        text = tokenizer.decode(ids[: n_targets])  # + end-of-text before it: n_targets + 1 tokens
        assert len(tokenizer.encode(text).ids) == n_targets
        if ok:
            assert len(prepare_eval_text([text], "t", tokenizer, 512, 128).tokens) == n_targets + 1
        else:
            with pytest.raises(EdgeGPTError, match=f"too few to score: it needs at least {MIN_EVAL_TOKENS + 1}"):
                prepare_eval_text([text], "t", tokenizer, 512, 128)


# -- the PyTorch reference's shortcuts -----------------------------------------------------------------


def test_reference_logits_of_scored_positions_only(tiny_checkpoint):
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.reference import TorchReference

    reference = TorchReference(load_checkpoint(tiny_checkpoint)[0])
    windows = np.random.default_rng(0).integers(0, 512, (2, 40))
    full = reference.logits(windows)
    assert full.shape == (2, 40, 512)
    np.testing.assert_allclose(reference.logits(windows, skip=25), full[:, 25:], rtol=0, atol=1e-5)
    assert reference.model.lm_head._forward_pre_hooks == {}  # the cut is removed after each call


@pytest.mark.slow  # over half a second on two cores
def test_batched_greedy_equals_one_prompt_at_a_time(tiny_checkpoint, corpus_text):
    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.reference import TorchReference

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    reference = TorchReference(model)
    ids = tokenizer.encode(corpus_text[:20000]).ids
    prompts = [ids[s : s + 32] for s in range(0, 16 * 300, 300)]
    batched = reference.greedy_all(prompts, 32)
    assert batched == [reference.greedy(p, 32) for p in prompts]
    assert len({tuple(g) for g in batched}) > 1  # different prompts, different continuations
    assert reference.greedy_all(prompts[:2], 0) == [[], []] and reference.greedy_all([], 5) == []


def test_strided_windows_cover_a_short_text_once():
    for n_tokens, window in ((300, 1024), (300, 64), (1025, 1024), (129, 16)):
        windows = strided_windows(n_tokens, window)
        targets = [start + 1 + t for start, length, first in windows for t in range(first, length)]
        assert targets == list(range(1, n_tokens))  # every target exactly once, in order
        assert all(length == min(window, n_tokens - 1) for _, length, _ in windows)
