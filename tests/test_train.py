"""Training: exact resume, the schedule, the data pipeline, checkpoints that export can read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.errors import EdgeGPTError
from edgegpt.scoring import char_starts_table
from edgegpt.train.corpus import read_corpus, split_documents
from edgegpt.train.data import sample_batch
from edgegpt.train.loop import learning_rate, train
from edgegpt.train.options import TrainOptions
from edgegpt.train.validation import strided_windows

TINY = dict(preset="nano", batch_size=4, block_size=64, eval_every=10, eval_windows=4, device="cpu")


@pytest.mark.slow  # a training run
def test_resume_continues_exactly(tmp_path, corpus_file):
    opts = TrainOptions(max_steps=40, **TINY)
    straight = train([corpus_file], [], tmp_path / "straight", opts, cache_dir=tmp_path / "cache")

    def interrupt(step: int) -> None:
        if step == 20:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    first = train([corpus_file], [], tmp_path / "resumed", opts, cache_dir=tmp_path / "cache", on_step=interrupt)
    assert (first.stopped, first.steps) == ("interrupted", 20)
    # Resume with no data and default options: everything comes from the saved state.
    second = train([], [], tmp_path / "resumed", TrainOptions(device="cpu"), cache_dir=tmp_path / "cache", resume=True)
    assert (second.stopped, second.steps) == ("max_steps", 40)
    assert second.train_loss == pytest.approx(straight.train_loss, abs=1e-6)
    a = load_file(tmp_path / "straight" / "train_state.safetensors")
    b = load_file(tmp_path / "resumed" / "train_state.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow  # a training run
def test_checkpoint_keeps_best_validation_weights(tmp_path, corpus_file):
    summary = train([corpus_file], [], tmp_path / "ckpt", TrainOptions(max_steps=30, **TINY), cache_dir=tmp_path / "c")
    state = json.loads((tmp_path / "ckpt" / "train_state.json").read_text())
    assert state["best_val"]["loss"] == summary.val_loss
    assert summary.val_loss < 6.0 < np.log(512) + 0.5  # learned something beyond uniform over the vocab
    model, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert model.cfg.n_layers == 4 and tokenizer.get_vocab_size() <= 512


@pytest.mark.slow  # a training run
def test_second_run_reuses_token_cache(tmp_path, corpus_file):
    opts = TrainOptions(max_steps=1, **TINY)
    train([corpus_file], [], tmp_path / "a", opts, cache_dir=tmp_path / "cache")
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.bin"))
    logs = []

    class Log:
        def __getattr__(self, name):
            return lambda *a, **k: logs.append(a[0]) if name == "log" else None

    train([corpus_file], [], tmp_path / "b", opts, cache_dir=tmp_path / "cache", reporter=Log())
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.bin")) == cached
    assert not any("tokeniz" in message for message in logs)


@pytest.mark.slow  # a training run
def test_nan_loss_stops_with_named_step_and_keeps_checkpoint(tmp_path, corpus_file):
    with pytest.raises(EdgeGPTError, match=r"step \d+"):
        train([corpus_file], [], tmp_path / "x", TrainOptions(max_steps=30, **{**TINY, "lr": 1e30}),
              cache_dir=tmp_path / "c")


def test_learning_rate_schedule():
    opts = TrainOptions(lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert learning_rate(0.05, opts) == pytest.approx(0.5)
    assert learning_rate(0.1, opts) == pytest.approx(1.0)
    assert learning_rate(1.0, opts) == pytest.approx(0.1)
    assert learning_rate(0.55, opts) == pytest.approx(0.55)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = sample_batch(tokens, 4, 16, seed=1, step=7)
    assert np.array_equal(a, sample_batch(tokens, 4, 16, seed=1, step=7))
    assert not np.array_equal(a, sample_batch(tokens, 4, 16, seed=1, step=8))
    assert np.array_equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows, targets shifted by one


@pytest.mark.parametrize("n_tokens,block", [(1000, 64), (65, 64), (10, 64), (1001, 63)])
def test_strided_windows_score_every_token_once(n_tokens, block):
    scored = np.zeros(n_tokens, dtype=int)
    for start, length, first in strided_windows(n_tokens, block):
        assert length <= block and start + length <= n_tokens - 1
        scored[start + 1 + first : start + 1 + length] += 1
        if start > 0:
            assert first >= length // 2 - 1  # at least half a context of history
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_char_table_counts_characters_exactly(tiny_checkpoint):
    _, tokenizer = load_checkpoint(tiny_checkpoint)
    table = char_starts_table(tokenizer, 512)
    text = "naïve café — 東京 🎉👩‍👩‍👧 x\ty\n"
    assert table[tokenizer.encode(text).ids].sum() == len(text)


def test_split_is_first_90_percent_then_last_10(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 900)
    (tmp_path / "b.md").write_text("b" * 100)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ignored? no: jsonl counts"}) + "\n")
    docs = read_corpus([tmp_path])
    assert docs == ["a" * 900, "b" * 100, "ignored? no: jsonl counts"]
    train_docs, val_docs = split_documents(["x" * 1000])
    assert (len(train_docs[0]), len(val_docs[0])) == (900, 100)


def test_block_size_longer_than_context_is_refused(tmp_path, corpus_file):
    with pytest.raises(EdgeGPTError, match="exceeds the model's context"):
        train([corpus_file], [], tmp_path / "x", TrainOptions(max_steps=1, **{**TINY, "block_size": 4096}),
              cache_dir=tmp_path / "c")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option,value,message", [
    ("batch_size", "8", "--batch-size must be an integer, got '8'"),
    ("batch_size", True, "--batch-size must be an integer, got True"),
    ("dropout", True, "--dropout must be a number, got True"),
    ("lr", "0.1", "--lr must be a number, got '0.1'"),
    ("compile", 1, "--compile must be true or false, got 1"),
    ("device", 3, "--device must be a string, got 3"),
    ("max_steps", 2.5, "--max-steps must be an integer, got 2.5"),
    ("time_budget", "5", "--time-budget must be a number, got '5'"),
    ("tokenizer", 3, "--tokenizer must be a string, got 3"),
])
def test_option_of_the_wrong_type_is_one_line_naming_the_flag(option, value, message):
    with pytest.raises(EdgeGPTError) as raised:
        TrainOptions(**{option: value}).validate()
    assert str(raised.value) == message


def test_options_accept_their_types_an_int_for_a_float_and_none_where_optional():
    TrainOptions(lr=1, time_budget=5, max_steps=None, vocab_size=None, tokenizer=None, compile=True).validate()
