"""Faults during training: SIGKILL at random moments, a NaN loss, a full disk. Each leaves the last
complete checkpoint readable, and `--resume` finishes the very run that was interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgegpt.checkpoint import load_checkpoint
from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.train.loop import train
from edgegpt.train.options import TrainOptions
from edgegpt.train.state import read_progress

# Training runs killed and resumed: the slow tier.
pytestmark = pytest.mark.slow

STEPS = 60
SAVE_EVERY = 4
ARGS = ["--preset", "nano", "--dropout", "0", "--block-size", "32", "--batch-size", "4", "--max-steps", str(STEPS),
        "--eval-every", str(SAVE_EVERY), "--save-every", str(SAVE_EVERY), "--seed", "5", "--json"]


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("fault-corpus") / "text.txt"
    path.write_text(corpus_text[:60_000], encoding="utf-8")
    return path


def run_train(args: list[str], home: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "edgegpt", "train", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "EDGEGPT_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fault_corpus) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("uninterrupted")
    return home / "out", run_train(["--data", str(fault_corpus), "--out", str(home / "out"), *ARGS], home)


def kill_at_a_random_moment(process: subprocess.Popen, chance: random.Random) -> list[int]:
    """SIGKILL a training run at a random moment between two saves, chosen so that the run cannot have
    finished first however fast this machine trains: wait for the validation line of a random step that leaves
    at least three save periods to go, then for a random part of one period (timed on this run, between its
    last two validation lines). Returns the steps the run reported."""
    target = chance.randrange(2 * SAVE_EVERY, STEPS - 3 * SAVE_EVERY + 1, SAVE_EVERY)
    reported, seen_at, said = [], [], []
    deadline = time.monotonic() + 300
    while not reported or reported[-1] < target:
        line = process.stderr.readline()
        said.append(line)
        assert line or process.poll() is None, "training ended before it could be killed:\n" + "".join(said)[-3000:]
        steps = [int(m) for m in re.findall(r"^step (\d+):", line)]
        reported += steps
        seen_at += [time.monotonic()] * len(steps)
        assert time.monotonic() < deadline
    period = seen_at[-1] - seen_at[-2]  # the target is past the second validation, so two times are known
    time.sleep(chance.uniform(0.0, period))
    process.send_signal(signal.SIGKILL)
    process.wait()
    return reported + [int(m) for m in re.findall(r"^step (\d+):", process.stderr.read(), flags=re.M)]


def test_sigkill_at_random_moments_then_resume(tmp_path, fault_corpus, uninterrupted):
    """Three kills at random moments: every file on disk is whole, at most --save-every steps are lost,
    and the resumed run ends exactly where the uninterrupted one did."""
    reference_out, reference = uninterrupted
    chance = random.Random(2026)
    for attempt in range(3):
        out = tmp_path / f"try{attempt}"
        args = ["--data", str(fault_corpus), "--out", str(out), *ARGS]
        process = subprocess.Popen([sys.executable, "-m", "edgegpt", "train", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGEGPT_HOME": str(tmp_path)})
        reported = kill_at_a_random_moment(process, chance)
        assert max(reported) < STEPS, "the run finished before the kill"

        # Everything on disk is complete: the weights and state load, nothing half-written is read.
        progress = read_progress(out)
        assert progress["step"] % SAVE_EVERY == 0
        # The last validation line printed is followed by its state save unless the kill came in between.
        assert progress["step"] >= max(reported) - SAVE_EVERY
        load_checkpoint(out)

        resumed = run_train(["--out", str(out), "--resume", "--json"], tmp_path)
        assert resumed["steps"] == STEPS
        assert resumed["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-6)
        ours, theirs = load_file(out / "train_state.safetensors"), load_file(reference_out / "train_state.safetensors")
        assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
        assert not list(out.glob(".*.tmp")), "a crashed write's temporary file was left behind"


TINY = dict(preset="nano", batch_size=4, block_size=32, eval_every=2, save_every=2, eval_windows=4, device="cpu",
            dropout=0.0)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fault_corpus, monkeypatch):
    import edgegpt.train.loop as training

    out = tmp_path / "out"
    train([fault_corpus], [], out, TrainOptions(max_steps=4, **TINY), cache_dir=tmp_path / "cache")
    saved = {name: sha256(out / name) for name in ("model.safetensors", "train_state.safetensors")}

    real_loss = training.distillation_loss

    def nan_from_step_5(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss._replace(total=loss.total * float("nan")) if read_progress(out)["step"] >= 4 else loss

    monkeypatch.setattr(training, "distillation_loss", nan_from_step_5)
    with pytest.raises(EdgeGPTError, match=r"loss became nan at step 5.*last good checkpoint"):
        train([], [], out, TrainOptions(max_steps=8, device="cpu"), cache_dir=tmp_path / "cache", resume=True)
    assert {name: sha256(out / name) for name in saved} == saved
    load_checkpoint(out)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, fault_corpus, monkeypatch):
    import edgegpt.train.state as train_state

    out = tmp_path / "out"
    train([fault_corpus], [], out, TrainOptions(max_steps=2, **TINY), cache_dir=tmp_path / "cache")
    before = sha256(out / "train_state.safetensors")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 1000)  # a partial write, then the device is full
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(train_state, "save_file", disk_full)
    with pytest.raises(EdgeGPTError, match=r"could not write .*train_state\.safetensors.*No space left.*intact"):
        train([], [], out, TrainOptions(max_steps=4, device="cpu"), cache_dir=tmp_path / "cache", resume=True)
    assert sha256(out / "train_state.safetensors") == before
    assert read_progress(out)["step"] == 2
    assert not list(out.glob(".*.tmp"))

    # Space freed: the run resumes from the intact state.
    monkeypatch.undo()
    summary = train([], [], out, TrainOptions(max_steps=4, device="cpu"), cache_dir=tmp_path / "cache", resume=True)
    assert summary.steps == 4


def test_full_disk_is_one_line_on_the_command_line(tmp_path, fault_corpus, monkeypatch):
    import edgegpt.train.state as train_state

    def disk_full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(train_state, "save_file", disk_full)
    result = CliRunner().invoke(app, ["train", "--data", str(fault_corpus), "--preset", "nano", "--max-steps", "2",
                                      "--block-size", "32", "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("edgegpt: error: could not write")
    assert "Traceback" not in result.output

