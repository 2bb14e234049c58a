"""Fine-tuning with `edgegpt train --from CHECKPOINT` (edgegpt.train.finetune): the run starts from the checkpoint's
weights with its tokenizer and files, takes fine-tuning's defaults, resumes exactly (every weight and LoRA), keeps
a LoRA run's base frozen and its checkpoint merged, converts --epochs to steps, and refuses what contradicts it."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import assert_one_line_error
from edgegpt.checkpoint import load_checkpoint, save_checkpoint
from edgegpt.cli.app import app
from edgegpt.core.config import preset
from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT
from edgegpt.train.loop import train
from edgegpt.train.options import FULL_FINETUNE_LR, LORA_LR, SCRATCH_DROPOUT, SCRATCH_LR, TrainOptions

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Small enough for seconds of training on two cores; dropout left to the fine-tuning default (0).
FT = dict(batch_size=2, block_size=32, eval_every=3, save_every=2, eval_windows=2, device="cpu", seed=5)
LORA = dict(lora=4, lora_dropout=0.1)  # dropout on: a resumed run must replay its masks too


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_text) -> Path:
    """A random nano checkpoint with an imported chat model's extra files (generation config, ChatML template)."""
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "checkpoint"
    tokenizer = train_tokenizer([corpus_text[:20_000]], 298)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    generation = {"eos_token_id": tokenizer.token_to_id("<|im_end|>"), "bos_token_id": 0, "temperature": 0.7}
    save_checkpoint(directory, GPT(preset("nano", vocab_size=300, max_len=64)), tokenizer, generation=generation,
                    chat_template=CHATML)
    return directory


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """Short conversations of uneven length: rows hold one to a few, and trained tokens differ row to row."""
    rng = random.Random(0)
    words = ["red", "blue", "green", "large", "small", "round", "square", "quiet"]
    lines = []
    for i in range(40):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{i}?"},
                                              {"role": "assistant", "content": answer}]}))
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text(corpus_text[20_000:50_000], encoding="utf-8")
    return path


def fine_tune(base: Path, data: Path, out: Path, **options) -> object:
    return train([data], [], out, TrainOptions(from_checkpoint=str(base), **{**FT, **options}),
                 cache_dir=out.parent / "cache")


def saved_options(out: Path) -> dict:
    return json.loads((out / "train_state.json").read_text())["options"]


def test_fine_tuning_defaults_unless_given():
    assert (TrainOptions().resolved().lr, TrainOptions().resolved().dropout) == (SCRATCH_LR, SCRATCH_DROPOUT)
    full = TrainOptions(from_checkpoint="ckpt").resolved()
    assert (full.lr, full.dropout, full.lora_alpha) == (FULL_FINETUNE_LR, 0.0, None)
    lora = TrainOptions(from_checkpoint="ckpt", lora=8).resolved()
    assert (lora.lr, lora.dropout, lora.lora_alpha) == (LORA_LR, 0.0, 16.0)
    given = TrainOptions(from_checkpoint="ckpt", lora=8, lr=1e-3, dropout=0.2, lora_alpha=4.0).resolved()
    assert (given.lr, given.dropout, given.lora_alpha) == (1e-3, 0.2, 4.0)
    assert FULL_FINETUNE_LR < LORA_LR < SCRATCH_LR


@pytest.mark.slow  # a training run
def test_fine_tuning_starts_from_the_checkpoint_and_carries_its_files(base, text, tmp_path):
    out = tmp_path / "out"
    # A step this small leaves every weight where it started: what the run started from is what it saved.
    summary = fine_tune(base, text, out, max_steps=1, lr=1e-12)
    assert summary.base == str(base) and summary.trainable_parameters == summary.parameters
    ours, theirs = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-8
    for name in ("config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    _, tokenizer = load_checkpoint(out)
    assert tokenizer.get_vocab() == load_checkpoint(base)[1].get_vocab()
    options = saved_options(out)
    assert (options["lr"], options["dropout"]) == (1e-12, 0.0)  # the given rate kept, fine-tuning's dropout


@pytest.mark.slow  # six training runs
@pytest.mark.parametrize("kind, data", [("full", "text"), ("full", "chats"), ("lora", "chats")])
def test_resume_continues_exactly(kind, data, base, text, chats, tmp_path):
    """Interrupted at step 5 and resumed with nothing but --resume: the weights, the adapters and the optimizer's
    moments equal the uninterrupted run's, on plain text and on packed chat examples."""
    text = {"text": text, "chats": chats}[data]
    options = dict(max_steps=10, block_size=63 if data == "chats" else 32,  # chats: two or three a row
                   **(LORA if kind == "lora" else {"dropout": 0.1}))
    straight = fine_tune(base, text, tmp_path / "straight", **options)

    def interrupt(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    first = train([text], [], tmp_path / "resumed", TrainOptions(from_checkpoint=str(base), **{**FT, **options}),
                  cache_dir=tmp_path / "cache", on_step=interrupt)
    assert (first.stopped, first.steps) == ("interrupted", 5)
    second = train([], [], tmp_path / "resumed", TrainOptions(device="cpu"), cache_dir=tmp_path / "cache", resume=True)
    assert (second.stopped, second.steps) == ("max_steps", 10)
    assert second.train_loss == straight.train_loss
    for name in ("train_state.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
        assert not differ, f"{name}: {len(differ)} of {len(a)} tensors differ, e.g. {sorted(differ.items())[:4]}"
    state = load_file(tmp_path / "resumed" / "train_state.safetensors")
    assert any(".lora_A" in k for k in state) == (kind == "lora")


@pytest.mark.slow  # a training run
def test_lora_keeps_the_base_frozen_and_saves_it_merged_and_apart(base, text, tmp_path):
    out = tmp_path / "out"
    summary = fine_tune(base, text, out, max_steps=6, lr=1e-2, **LORA)
    assert 0 < summary.trainable_parameters < summary.parameters / 5
    state, original = load_file(out / "train_state.safetensors"), load_file(base / "model.safetensors")
    # The resume state: the base exactly as it was, the adapters apart, moments for the adapters alone.
    for name, tensor in original.items():
        assert torch.equal(state[f"model.{name}"], tensor), name
    moments = {k for k in state if k.startswith("optimizer.")}
    assert moments and all(".lora_A." in k or ".lora_B." in k for k in moments)
    # The checkpoint: a plain one (base + adapter merged), and the adapter in adapter/, PEFT's layout.
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == original.keys()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert (config["r"], scale) == (4, 2.0)  # alpha defaults to 2 × rank
    changed = 0
    for name, weight in original.items():
        parts = name.split(".")  # layers.{i}.attn.q_proj.weight
        if len(parts) == 5 and parts[3].endswith("_proj"):
            module = f"model.layers.{parts[1]}.{'self_attn' if parts[2] == 'attn' else 'mlp'}.{parts[3]}"
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            weight = weight + scale * b @ a
            changed += 1
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6, msg=name)
    assert changed == 7 * 4 and not torch.equal(merged["layers.0.mlp.up_proj.weight"],
                                                 original["layers.0.mlp.up_proj.weight"])


@pytest.mark.slow  # training runs
def test_epochs_become_steps_from_the_data_and_the_batch(base, corpus_text, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(corpus_text[:4_000], encoding="utf-8")
    rows = dict(batch_size=4, eval_every=1000)
    one = fine_tune(base, short, tmp_path / "one", epochs=1, **rows)
    two = fine_tune(base, short, tmp_path / "two", epochs=2, **{**rows, "batch_size": 2, "grad_accum": 2})
    assert one.stopped == two.stopped == "max_steps"
    (meta,) = (tmp_path / "cache").rglob("meta.json")  # the training split's size, as tokenized
    windows = json.loads(meta.read_text())["train_tokens"] // FT["block_size"]
    assert windows >= 8
    assert (one.steps, two.steps) == (math.ceil(windows / 4), math.ceil(2 * windows / 4))  # 4 rows a step
    assert saved_options(tmp_path / "two")["max_steps"] == two.steps
    # Without --from too: from scratch, the same rule.
    scratch = train([short], [], tmp_path / "scratch", TrainOptions(preset="nano", vocab_size=300, epochs=1,
                                                                    **{**FT, **rows}), cache_dir=tmp_path / "cache")
    assert scratch.steps >= 1 and math.isfinite(scratch.train_loss)


@pytest.mark.slow  # a training run with recomputed activations
def test_gradient_checkpointing_trains_the_same_weights(base, text, tmp_path, monkeypatch):
    import edgegpt.model

    plain = fine_tune(base, text, tmp_path / "plain", max_steps=3, **LORA)
    layers_recomputed = []

    def counted_checkpoint(function, *args, **kwargs):
        layers_recomputed.append(function)
        return checkpoint(function, *args, **kwargs)

    checkpoint = edgegpt.model.checkpoint
    monkeypatch.setattr(edgegpt.model, "checkpoint", counted_checkpoint)
    recomputed = fine_tune(base, text, tmp_path / "recomputed", max_steps=3, gradient_checkpointing=True, **LORA)
    assert len(layers_recomputed) == 3 * 4  # every layer of every step (validation computes no gradients)
    assert recomputed.train_loss == pytest.approx(plain.train_loss, abs=1e-6)
    a, b = load_file(tmp_path / "plain" / "train_state.safetensors"), \
        load_file(tmp_path / "recomputed" / "train_state.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def hugging_face_folder(directory: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


@pytest.mark.parametrize("options, where, message", [
    (dict(preset="small"), "checkpoint", "--preset cannot be combined with --from"),
    (dict(layers=2), "checkpoint", "--layers cannot be combined with --from"),
    (dict(vocab_size=1000), "checkpoint", "--vocab-size cannot be combined with --from"),
    (dict(tokenizer="tokenizer.json"), "checkpoint", "--tokenizer cannot be combined with --from"),
    (dict(teacher="teacher", init_from_teacher=True), "checkpoint", "--init-from-teacher cannot be combined"),
    (dict(epochs=2, max_steps=5), "checkpoint", "--epochs and --max-steps"),
    (dict(epochs=0), "checkpoint", "--epochs must be at least 1"),
    (dict(lora=0), "checkpoint", "--lora must be a rank of at least 1"),
    (dict(lora=4, lora_targets="q_proj,lm_head"), "checkpoint", "--lora-targets 'q_proj,lm_head'"),
    (dict(lora=4, lora_targets=""), "checkpoint", "--lora-targets ''"),
    (dict(lora=4, lora_alpha=-1.0), "checkpoint", "--lora-alpha must be a positive number"),
    (dict(lora=4, lora_dropout=1.0), "checkpoint", "--lora-dropout must be in [0, 1)"),
    (dict(lora_alpha=8.0), "checkpoint", "need --lora RANK"),
    (dict(lora=4), None, "--lora adapts a trained model: give --from"),
    (dict(), "nowhere", "no such directory"),
    (dict(), "notes.txt", "is a file, not a checkpoint directory"),
    (dict(), "empty", "is not an edgegpt checkpoint (model.safetensors, config.json, tokenizer.json missing)"),
    (dict(), "hugging-face", "is a Hugging Face model folder, not an edgegpt checkpoint; convert it first"),
    (dict(), "out", "is the checkpoint --from starts from"),
])
def test_contradictions_and_non_checkpoints_are_one_line_and_write_nothing(options, where, message, base, text,
                                                                          tmp_path):
    places = {"checkpoint": base, "nowhere": tmp_path / "nowhere", "notes.txt": text, "empty": tmp_path,
              "hugging-face": hugging_face_folder(tmp_path / "hf"), "out": tmp_path / "out", None: None}
    if where == "out":
        shutil.copytree(base, tmp_path / "out")
    before = sorted(tmp_path.rglob("*"))
    source = places[where]
    opts = TrainOptions(from_checkpoint=None if source is None else str(source), **{**FT, "max_steps": 1, **options})
    with pytest.raises(EdgeGPTError) as raised:
        train([text], [], tmp_path / "out", opts, cache_dir=tmp_path / "cache")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_refuses_from_with_a_preset_in_one_line(base, tmp_path):
    result = CliRunner().invoke(app, ["train", "--from", str(base), "--preset", "nano", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "--preset cannot be combined with --from")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a training run
def test_chat_examples_train_the_assistants_tokens_packed(base, chats, tmp_path):
    logs = []

    class Log:
        def __getattr__(self, name):
            return (lambda message: logs.append(message)) if name == "log" else (lambda *a, **k: None)

    summary = train([chats], [], tmp_path / "out", TrainOptions(from_checkpoint=str(base), epochs=1, lora=4,
                                                               **{**FT, "block_size": 63}),
                    cache_dir=tmp_path / "cache", reporter=Log())
    (described,) = [m for m in logs if "examples" in m]
    assert "36 examples" in described and "4 validation examples" in described  # 10% held out
    rows = int(described.split(" in ")[1].split(" rows")[0])
    assert rows < 36  # short examples share rows
    assert summary.steps == math.ceil(rows / FT["batch_size"]) and math.isfinite(summary.val_loss)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # four forward and backward passes
def test_micro_batches_and_masks_weigh_every_counted_label_once():
    """A step's loss and gradients are the mean over the global batch's counted labels, however the rows are cut
    into micro-batches: rows with few trained tokens weigh no more than their tokens."""
    from edgegpt.train.batches import Batch, CountedLogits
    from edgegpt.train.loop import _train_step

    torch.manual_seed(0)
    model = GPT(preset("nano", vocab_size=300, max_len=64))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (4, 17), generator=generator)
    loss_mask = torch.rand(4, 16, generator=generator) < torch.tensor([[0.9], [0.1], [0.5], [0.3]])
    documents = torch.zeros(4, 17, dtype=torch.long)
    documents[:, 9:] = 1  # two examples a row
    batch = Batch(tokens, loss_mask, documents)
    logits = model(batch.inputs, documents=batch.input_documents)
    expected = torch.nn.functional.cross_entropy(logits[loss_mask], tokens[:, 1:][loss_mask])
    expected.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    for accumulation in (1, 2, 4):
        model.zero_grad()
        opts = TrainOptions(grad_accum=accumulation).resolved()
        losses = _train_step(CountedLogits(model), None, batch, batch.counted, opts, torch.device("cpu"), None)
        assert losses["loss"] == pytest.approx(expected.item(), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("options, message", [
    (dict(teacher="teacher"), "drop --teacher"),
    (dict(from_checkpoint=None, preset="nano"), "need the model's tokenizer: fine-tune a checkpoint with --from"),
])
def test_example_data_refusals(options, message, base, chats, tmp_path):
    opts = TrainOptions(**{"from_checkpoint": str(base), **FT, "max_steps": 1, **options})
    with pytest.raises(EdgeGPTError, match=message):
        train([chats], [], tmp_path / "out", opts, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_example_options_on_plain_text_are_refused(base, text, tmp_path):
    with pytest.raises(EdgeGPTError, match="--include-prompts and --drop-long apply to JSONL examples"):
        fine_tune(base, text, tmp_path / "out", max_steps=1, include_prompts=True)
    assert not (tmp_path / "out").exists()


def test_a_model_tuned_on_chats_exports_calibrated_and_scored_on_its_chats(base, tmp_path):
    """With no --calibration-data or --eval-data, export reads the run's own data: JSONL examples as the model
    reads them (each conversation rendered by its chat template), not as plain text, which they are not."""
    chats = tmp_path / "chats.jsonl"  # enough that the last 10% holds the gates' minimum of tokens
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": "red blue green " * (i % 4 + 1)}]})
        + "\n" for i in range(120)), encoding="utf-8")
    from edgegpt.export.package import export_package
    from edgegpt.export.quantize_package import calibration_text
    from edgegpt.quality import validation_documents
    from edgegpt.tokenizer import load_tokenizer

    out = tmp_path / "out"
    fine_tune(base, chats, out, epochs=1, lora=4)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    calibration = calibration_text(out, None, tokenizer)
    assert calibration.source.startswith("training text")
    turns = calibration.tokens.tolist().count(tokenizer.token_to_id("<|im_start|>"))
    assert turns >= 100  # a user and an assistant turn a conversation, over its last 4,096 tokens
    documents, source = validation_documents(out)
    assert source.startswith("last 10% of") and documents[-1].endswith("<|im_end|>\n")
    assert documents[-1].split("<|im_start|>")[1] == "user\n119?<|im_end|>\n"  # the file's last conversation
    export_package(out, tmp_path / "model", quantize=True, gate=False)
    assert (tmp_path / "model" / "model.onnx").is_file()
