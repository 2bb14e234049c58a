"""Data-parallel training under torchrun on the CPU (gloo): two processes train exactly what one process
trains with the same global batch, only rank 0 writes, and --resume works the same; fine-tuning a checkpoint
(every weight and LoRA, on packed chat examples) too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# torchrun jobs: the slow tier.
pytestmark = pytest.mark.slow

STEPS = 40
COMMON = ["--preset", "nano", "--dropout", "0", "--block-size", "32", "--eval-every", "20", "--save-every", "4",
          "--seed", "3", "--max-steps", str(STEPS), "--json"]


def train_command(args: list[str], processes: int | None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes else [sys.executable]
    return [*launcher, "-m", "edgegpt", "train", *args]


def train_env(home: Path) -> dict[str, str]:
    return {**os.environ, "EDGEGPT_HOME": str(home), "OMP_NUM_THREADS": "1"}


def edgegpt_train(args: list[str], processes: int | None, home: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(args, processes), capture_output=True, text=True, timeout=900,
                            env=train_env(home))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def saved_step(out: Path) -> int:
    try:
        return json.loads((out / "train_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_after_saved_step(command: list[str], out: Path, step: int, home: Path) -> int:
    """Run `command` and SIGKILL its whole process group once a resume state at `step` or later is on
    disk; returns the step of the state it left."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=train_env(home),
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while saved_step(out) < step:
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return saved_step(out)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout  # rank 0 alone reports
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def ddp_corpus(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("ddp-corpus") / "text.txt"
    path.write_text(corpus_text[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, ddp_corpus) -> Path:
    home = tmp_path_factory.mktemp("ddp-single")
    result = edgegpt_train(["--data", str(ddp_corpus), "--batch-size", "4", "--out", str(home / "out"), *COMMON],
                           None, home)
    return home / "out", summary_of(result)


def assert_same_training(out: Path, summary: dict, reference_out: Path, reference: dict) -> None:
    assert summary["steps"] == reference["steps"] == STEPS
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-4)
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-4)
    for name in ("model.safetensors", "train_state.safetensors"):  # best and latest weights, optimizer moments
        ours, theirs = load_file(out / name), load_file(reference_out / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")


@pytest.mark.parametrize("batch_size, grad_accum", [(2, 1), (1, 2)])
def test_two_processes_equal_one_with_the_same_global_batch(batch_size, grad_accum, tmp_path, ddp_corpus,
                                                            single_process_run):
    """2 processes × batch × accumulation = the single process's 4 rows; with accumulation, gradients are
    averaged across ranks once per step (DDP's no_sync on the other micro-batches)."""
    reference_out, reference = single_process_run
    out = tmp_path / "out"
    result = edgegpt_train(["--data", str(ddp_corpus), "--batch-size", str(batch_size), "--grad-accum",
                            str(grad_accum), "--out", str(out), *COMMON], 2, tmp_path)
    summary = summary_of(result)
    assert summary["processes"] == 2
    assert summary["tokens"] == reference["tokens"]  # the same global batch of 4 rows
    assert_same_training(out, summary, reference_out, reference)
    # Only rank 0 wrote: one checkpoint, no per-rank leftovers.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_out.iterdir())


def test_killed_torchrun_job_resumes_exactly(tmp_path, ddp_corpus, single_process_run):
    """SIGKILL to the whole job mid-run; `--resume` under torchrun then finishes the same run."""
    reference_out, reference = single_process_run
    out = tmp_path / "out"
    args = ["--data", str(ddp_corpus), "--batch-size", "2", "--out", str(out), *COMMON]
    left_at = kill_after_saved_step(train_command(args, 2), out, 8, tmp_path)
    assert 8 <= left_at < STEPS
    resumed = summary_of(edgegpt_train([*args, "--resume"], 2, tmp_path))
    assert_same_training(out, resumed, reference_out, reference)


# -- fine-tuning a checkpoint (edgegpt.train.finetune) under torchrun -----------------------------------------------

FINE_TUNE_STEPS = 8
FINE_TUNE = ["--block-size", "63", "--eval-every", "4", "--save-every", "2", "--seed", "3",
             "--max-steps", str(FINE_TUNE_STEPS), "--json"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, corpus_text) -> tuple[Path, Path]:
    """A random nano chat checkpoint (ChatML) and conversations of uneven length: rows hold two or three, and
    each rank's rows count different numbers of trained tokens."""
    import random

    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.core.config import preset
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ddp-fine-tune")
    tokenizer = train_tokenizer([corpus_text[:20_000]], 298)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    save_checkpoint(root / "base", GPT(preset("nano", vocab_size=300, max_len=64)), tokenizer,
                    generation={"eos_token_id": tokenizer.token_to_id("<|im_end|>")}, chat_template=CHATML)
    rng = random.Random(0)
    words = ["red", "blue", "green", "large", "small", "round", "square", "quiet"]
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": " ".join(
        rng.choice(words) for _ in range(rng.randint(1, 4)))}]}) for i in range(60)]
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "base", root / "chats.jsonl"


@pytest.mark.parametrize("adapters", [[], ["--lora", "4", "--lora-dropout", "0"]], ids=["full", "lora"])
def test_fine_tuning_on_two_processes_equals_one_with_the_same_global_batch(adapters, tmp_path, chat_base):
    """Fine-tuning every weight and LoRA, on packed chat examples (a loss mask and documents per row): two processes
    with 2 rows each train what one process trains with 4."""
    base, chats = chat_base
    runs = {}
    for processes, rows in ((None, "4"), (2, "2")):
        out = tmp_path / f"out-{processes or 1}"
        result = edgegpt_train(["--from", str(base), "--data", str(chats), "--batch-size", rows, "--out", str(out),
                                *adapters, *FINE_TUNE], processes, tmp_path / f"home-{processes or 1}")
        runs[processes] = out, summary_of(result)
    (one_out, one), (two_out, two) = runs[None], runs[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["steps"] == one["steps"] == FINE_TUNE_STEPS and two["tokens"] == one["tokens"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    files = ["model.safetensors", "train_state.safetensors", *(["adapter/adapter_model.safetensors"] * bool(adapters))]
    for name in files:
        ours, theirs = load_file(two_out / name), load_file(one_out / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")
    assert sorted(p.name for p in two_out.iterdir()) == sorted(p.name for p in one_out.iterdir())
