"""Distillation from an exported package: the top-k loss, the package teacher's top k against the checkpoint it
was exported from, the fixed grid of windows, the on-disk cache (a second run never runs the teacher and trains the
same weights; resume stays exact; a damaged cache is computed again), and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.train.data import sample_grid
from edgegpt.train.distill import TopK, distillation_loss, open_teacher

runner = CliRunner()
CPU = torch.device("cpu")
# A student small enough that a run of a few steps takes about a second; windows short enough that the text makes
# a few hundred of them.
STUDENT = dict(preset="nano", layers=1, batch_size=2, block_size=32, eval_every=3, eval_windows=2, device="cpu")


# -- the top-k loss --------------------------------------------------------------------------------

def logits_of(seed: int, shape=(3, 5, 40), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def top_k_of_logits(logits: torch.Tensor, k: int) -> TopK:
    values, ids = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return TopK(values, ids)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_top_k_loss_over_the_whole_vocabulary_is_the_full_loss(temperature):
    student, teacher = logits_of(0), logits_of(1)
    labels = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100  # positions the loss leaves out, left out of both forms alike
    full = distillation_loss(student, teacher, labels, 0.3, temperature)
    top = distillation_loss(student, top_k_of_logits(teacher, 40), labels, 0.3, temperature)
    torch.testing.assert_close(top.kd, full.kd, rtol=0, atol=1e-5)
    torch.testing.assert_close(top.total, full.total, rtol=0, atol=1e-5)
    assert full.kd > 0.1


def test_top_k_loss_gradients_reach_the_student_only():
    student = logits_of(0).requires_grad_(True)
    top = top_k_of_logits(logits_of(1), 8)
    teacher = TopK(top.log_probs.clone().requires_grad_(True), top.ids)
    distillation_loss(student, teacher, torch.zeros(3, 5, dtype=torch.long), 0.0, 2.0).total.backward()
    assert teacher.log_probs.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_gradcheck_of_the_top_k_loss():
    top = top_k_of_logits(logits_of(1, shape=(2, 3, 9)), 4)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    student = logits_of(0, shape=(2, 3, 9)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, top, labels, 0.3, 2.5).total, (student,))


# -- the fixed grid --------------------------------------------------------------------------------

def test_grid_epochs_visit_every_window_once_drawn_from_seed_and_step():
    draws = np.concatenate([sample_grid(10, 3, seed=5, step=step) for step in range(10)])
    for epoch in range(3):
        assert sorted(draws[epoch * 10 : epoch * 10 + 10].tolist()) == list(range(10))
    assert not np.array_equal(draws[:10], draws[10:20])  # each epoch in its own order
    assert np.array_equal(sample_grid(10, 3, seed=5, step=4), draws[12:15])
    assert not np.array_equal(sample_grid(10, 30, seed=6, step=0), draws)


# -- the cache on its own ---------------------------------------------------------------------------

def test_a_window_is_flagged_only_once_committed_and_read_back_as_stored(tmp_path):
    from edgegpt.train.teacher_cache import CacheShape, TopKCache

    shape = CacheShape(windows=5, block_size=4, k=3, vocab_size=10)
    cache = TopKCache.open(tmp_path, {"teacher": "a"}, shape)
    log_probs = np.log(np.tile(np.array([0.5, 0.3, 0.1], np.float16), (4, 1)))
    ids = np.tile(np.array([7, 2, 9]), (4, 1))
    cache.put(2, log_probs, ids)
    assert TopKCache.open(tmp_path, {"teacher": "a"}, shape).get(2) is None  # what a crash before the commit leaves
    cache.commit()
    stored = TopKCache.open(tmp_path, {"teacher": "a"}, shape).get(2)
    np.testing.assert_array_equal(stored[0], log_probs)
    np.testing.assert_array_equal(stored[1], ids)
    assert TopKCache.open(tmp_path, {"teacher": "b"}, shape).get(2) is None  # another teacher: another folder


def test_a_cache_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from edgegpt.core.errors import EdgeGPTError
    from edgegpt.train import teacher_cache

    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(EdgeGPTError, match="needs 2.0 MiB .* only 0.0 MiB is free; lower --teacher-top-k"):
        teacher_cache.TopKCache.open(tmp_path, {}, teacher_cache.CacheShape(1000, 64, 8, 300))
    assert not list(tmp_path.glob("*/*.bin"))


# -- the package teacher ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("teacher-text") / "notes.txt"
    path.write_text(corpus_text[:30_000], encoding="utf-8")
    return path


def test_package_teacher_top_k_is_its_checkpoints(tiny_checkpoint, tiny_package, corpus_text, monkeypatch):
    """The float32 package's top k equals the PyTorch checkpoint's, a few positions per pass of the runtime."""
    monkeypatch.setattr("edgegpt.scoring.MAX_CHUNK_POSITIONS", 16)  # three passes per row of 48
    package = open_teacher(tiny_package, CPU).load(CPU)
    checkpoint = open_teacher(tiny_checkpoint, CPU).load(CPU)
    assert package.kind == "package" and package.model is None
    assert (package.vocab_size, package.max_len) == (checkpoint.vocab_size, checkpoint.max_len)
    assert package.tokenizer.get_vocab() == checkpoint.tokenizer.get_vocab()
    ids = torch.tensor(checkpoint.tokenizer.encode(corpus_text[:2000]).ids[: 2 * 48]).view(2, 48)
    got, want = package.top_k(ids, 8), checkpoint.top_k(ids, 8)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=0, atol=1e-4)
    assert (got.log_probs <= 0).all() and (got.log_probs[..., 0] > got.log_probs[..., -1]).all()


def distil(out: Path, text: Path, teacher: Path, cache: Path, **options):
    from edgegpt.train.loop import train
    from edgegpt.train.options import TrainOptions

    opts = TrainOptions(teacher=str(teacher), **{**STUDENT, "max_steps": 4, **options})
    return train([text], [], out, opts, cache_dir=cache)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "train_state.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Every pass the runtime's Generator runs (the package teacher's forward), counted."""
    from edgegpt.runtime import Generator

    calls: list[int] = []
    original = Generator.forward

    def counted(self, token_ids, cache):
        calls.append(len(token_ids))
        return original(self, token_ids, cache)

    monkeypatch.setattr(Generator, "forward", counted)
    return calls


def test_a_second_run_reads_the_cache_and_trains_the_same_weights(tmp_path, text, tiny_package, forward_calls):
    first = distil(tmp_path / "first", text, tiny_package, tmp_path / "cache", teacher_top_k=8)
    assert forward_calls and (first.teacher_rows_cached, first.teacher_rows_computed) == (0, 8)
    assert len(list((tmp_path / "cache" / "teacher-top-k").iterdir())) == 1
    forward_calls.clear()
    second = distil(tmp_path / "second", text, tiny_package, tmp_path / "cache", teacher_top_k=8)
    assert forward_calls == []
    assert (second.teacher_rows_cached, second.teacher_rows_computed) == (8, 0)
    assert_same_weights(tmp_path / "first", tmp_path / "second")
    assert second.train_loss == first.train_loss


def test_the_cache_is_where_teacher_cache_says_and_the_default_k_is_recorded(tmp_path, text, tiny_package):
    distil(tmp_path / "out", text, tiny_package, tmp_path / "cache", teacher_cache=str(tmp_path / "elsewhere"),
           max_steps=1)
    (folder,) = (tmp_path / "elsewhere").iterdir()
    assert json.loads((folder / "meta.json").read_text())["k"] == 32
    assert not (tmp_path / "cache" / "teacher-top-k").exists()
    options = json.loads((tmp_path / "out" / "train_state.json").read_text())["options"]
    assert options["teacher_top_k"] == 32  # a resumed run keeps it


@pytest.mark.slow  # three training runs
def test_resume_with_a_package_teacher_is_exact(tmp_path, text, tiny_package):
    from edgegpt.train.loop import train
    from edgegpt.train.options import TrainOptions

    straight = distil(tmp_path / "straight", text, tiny_package, tmp_path / "cache-a", max_steps=6)

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    opts = TrainOptions(teacher=str(tiny_package), **{**STUDENT, "max_steps": 6})
    first = train([text], [], tmp_path / "resumed", opts, cache_dir=tmp_path / "cache-b", on_step=interrupt)
    assert (first.stopped, first.steps) == ("interrupted", 3)
    second = train([], [], tmp_path / "resumed", TrainOptions(device="cpu"), cache_dir=tmp_path / "cache-b",
                   resume=True)
    assert (second.stopped, second.steps) == ("max_steps", 6)
    assert second.teacher_rows_computed == 6  # steps 4 to 6 were never computed in this cache before
    assert second.train_loss == pytest.approx(straight.train_loss, abs=1e-6)  # as tests/test_train.py holds resume
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert max((a[name] - b[name]).abs().max().item() for name in a) <= 1e-6


@pytest.mark.parametrize("damage", ["zeroed values", "truncated ids", "garbled meta"])
def test_a_damaged_cache_is_computed_again(damage, tmp_path, text, tiny_package):
    distil(tmp_path / "first", text, tiny_package, tmp_path / "cache", teacher_top_k=8)
    (folder,) = (tmp_path / "cache" / "teacher-top-k").iterdir()
    if damage == "zeroed values":  # the right size, the flags set, the values gone
        size = (folder / "log_probs.bin").stat().st_size
        (folder / "log_probs.bin").write_bytes(bytes(size))
    elif damage == "truncated ids":
        (folder / "ids.bin").write_bytes((folder / "ids.bin").read_bytes()[:100])
    else:
        (folder / "meta.json").write_text("{not json")
    second = distil(tmp_path / "second", text, tiny_package, tmp_path / "cache", teacher_top_k=8)
    assert (second.teacher_rows_cached, second.teacher_rows_computed) == (0, 8)
    assert_same_weights(tmp_path / "first", tmp_path / "second")
    third = distil(tmp_path / "third", text, tiny_package, tmp_path / "cache", teacher_top_k=8)
    assert (third.teacher_rows_cached, third.teacher_rows_computed) == (8, 0)  # and it is whole again


def test_a_checkpoint_teacher_with_top_k_trains_without_a_cache(tmp_path, text, tiny_checkpoint):
    summary = distil(tmp_path / "out", text, tiny_checkpoint, tmp_path / "cache", teacher_top_k=8, max_steps=2)
    assert (summary.teacher_rows_cached, summary.teacher_rows_computed) == (0, 4)
    assert not (tmp_path / "cache" / "teacher-top-k").exists()
    plain = distil(tmp_path / "plain", text, tiny_checkpoint, tmp_path / "cache", max_steps=1)
    assert plain.teacher_rows_computed is None  # full logits, as before


# -- one line, exit 2 ------------------------------------------------------------------------------

def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}?", "completion": "yes"}) + "\n" for i in range(20)))
    return path


@pytest.mark.parametrize("teacher, args, words", [
    ("tiny_package", ["--teacher-top-k", "0"], "--teacher-top-k must be at least 1"),
    ("tiny_package", ["--teacher-top-k", "513"], "exceeds the teacher's vocabulary of 512"),
    ("tiny_package", ["--init-from-teacher"], "is an exported package"),
    ("tiny_checkpoint", ["--teacher-cache", "somewhere"], "--teacher-cache keeps an exported package"),
    (None, ["--teacher-top-k", "8"], "need --teacher"),
])
def test_bad_package_teacher_options(teacher, args, words, request, tmp_path, text):
    given = ["--teacher", str(request.getfixturevalue(teacher))] if teacher else []
    line = one_line_error(runner.invoke(app, ["train", *given, *args, "--data", str(text),
                                              "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]))
    assert words in line
    assert not (tmp_path / "out").exists()


def test_examples_with_a_package_teacher_are_refused(tmp_path, examples, tiny_package, tiny_checkpoint):
    line = one_line_error(runner.invoke(app, [
        "train", "--teacher", str(tiny_package), "--data", str(examples), "--tokenizer",
        str(tiny_checkpoint / "tokenizer.json"), "--out", str(tmp_path / "out"),
    ]))
    assert "drop --teacher" in line
