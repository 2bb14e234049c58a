"""Training options: every knob of `edgegpt train`, with defaults and checks, torch-free so the CLI can
build the command from them without importing torch.

TrainOptions is the one place an option is declared. A field made with `option(default, help)` is also an
`edgegpt train --flag` (the field's name with dashes) with that help and the field's default: cli/train.py
builds the command's parameters from these fields, in their order, and passes the values straight back in.
A plain field is tuned here and not offered on the command line. Adding a training option is adding a field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from edgegpt.core.errors import EdgeGPTError

# With neither --max-steps nor --time-budget: long enough for `micro` to reach its best on a laptop.
DEFAULT_TIME_BUDGET_MIN = 10.0

# Learning rates and dropout when the user gives none (TrainOptions.resolved). From scratch: what micro was
# tuned with (DESIGN.md). Fine-tuning every weight of a pretrained model: 5e-5, transformers' Trainer default
# and the usual order for full fine-tuning; a from-scratch rate moves the weights far from where pretraining
# left them within a few steps and the model forgets what it knew. LoRA: the adapters start at zero and only
# their small update moves, so they take a larger step, 2e-4 (the QLoRA paper's rate for its smaller models).
SCRATCH_LR = 2e-3
FULL_FINETUNE_LR = 5e-5
LORA_LR = 2e-4
SCRATCH_DROPOUT = 0.1
# The projections LoRA adapts by default: all of attention's and the MLP's (adapting the MLP too matches full
# fine-tuning more closely than attention alone, for a few more parameters). 0.05: a light dropout on the
# adapters' input, the value common in PEFT recipes for small models. The scale alpha / rank defaults to 2
# whatever the rank (alpha = 2 × rank), so trying another rank does not also change the update's size and
# need another learning rate.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DROPOUT = 0.05

# A package teacher's top k when --teacher-top-k is not given: how much of the teacher's distribution is kept
# against the cache's size, which is 2 bytes (a float16 log-probability) plus 2 (an id of a vocabulary up to
# 65,536 tokens) or 4 per training token and k: with 32, 128 or 192 bytes per token.
DEFAULT_TEACHER_TOP_K = 32


@dataclass(frozen=True)
class Flag:
    """How a TrainOptions field is given on the command line (`edgegpt train --help` shows `help`)."""

    help: str
    path: bool = False  # the value names a file: the command line takes a path and passes on its string
    absolute: bool = False  # a path made absolute first, so that a run resumed from elsewhere still finds it
    name: str | None = None  # the flag when it is not the field's name with dashes (`from_checkpoint`: --from)


def option(default: Any, help: str, *, path: bool = False, absolute: bool = False, name: str | None = None) -> Any:
    """A TrainOptions field that `edgegpt train` also takes as an option."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, path=path, absolute=absolute, name=name)})


@dataclass
class TrainOptions:
    """What a training run does. The defaults suit `micro` on a laptop CPU (the runs behind them:
    docs/benchmarks.md); with --from they suit fine-tuning (resolved()). `edgegpt train --help` lists the
    fields made with option() in this order."""

    # Fine-tuning (edgegpt.train.finetune): start from a checkpoint's weights, tokenizer and shape.
    from_checkpoint: str | None = option(
        None, "Fine-tune this edgegpt checkpoint (trained here, or converted from Hugging Face or GGUF with "
        "`edgegpt convert`): its shape, weights, tokenizer, generation config and chat template.",
        path=True, absolute=True, name="--from")
    # JSONL examples (edgegpt.train.examples): which tokens train, and what happens to those too long for a row.
    include_prompts: bool = option(
        False, "With JSONL examples: train on every token (prompts, system and user turns too), not only the "
        "assistant's turns and the completions.")
    drop_long: bool = option(
        False, "With JSONL examples: leave out examples longer than --block-size + 1 tokens instead of "
        "truncating them (the run's first line counts both).")
    # The model (preset None: micro, or the teacher's shape with --init-from-teacher; layers None: the
    # preset's, or from a teacher half the teacher's).
    preset: str | None = option(None, "Model size: nano, micro (default), small or base.")
    layers: int | None = option(None, "Override the preset's number of layers.")
    # When to stop and how often to save.
    max_steps: int | None = option(None, "Stop after this many optimizer steps.")
    epochs: int | None = option(
        None, "Stop after this many passes over the training data (converted to steps from its size and the "
        "global batch); instead of --max-steps.")
    time_budget: float | None = option(  # minutes
        None, f"Stop after this many minutes (default {DEFAULT_TIME_BUDGET_MIN:g} without --max-steps or --epochs).")
    save_every: int = option(100, "Save the resume state every N steps (a crash loses at most N).")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda or mps. Under torchrun: one device per process.")
    seed: int = option(0, "Seed for initialisation, batches and dropout (reproducible on the CPU).")
    # Batches and the optimizer (block_size None: the model's max_len).
    batch_size: int = option(8, "Sequences per micro-batch, per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    block_size: int | None = option(None, "Training sequence length (default: the model's context).")
    lr: float | None = option(
        None, f"Peak learning rate (default {SCRATCH_LR:g}; with --from {FULL_FINETUNE_LR:g}, with --lora "
        f"{LORA_LR:g}).")
    dropout: float | None = option(
        None, f"Residual and embedding dropout (default {SCRATCH_DROPOUT:g}; with --from 0).")
    # LoRA (edgegpt.train.lora): low-rank adapters on the projections, the base frozen.
    lora: int | None = option(
        None, "With --from: train low-rank adapters of this rank instead of every weight; the base stays frozen, "
        "and every save merges them into the weights (and writes them on their own, in PEFT's layout).")
    lora_alpha: float | None = option(
        None, "With --lora: the adapters' update is scaled by alpha / rank (default 2 × rank).")
    lora_dropout: float = option(LORA_DROPOUT, "With --lora: dropout on the adapters' input.")
    lora_targets: str = option(
        ",".join(LORA_TARGETS), "With --lora: the projections that get adapters, comma-separated.")
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in the backward pass: less memory for long sequences, "
        "more compute per step.")
    # The tokenizer: trained on the data with vocab_size tokens (None: the preset's), or this tokenizer.json.
    vocab_size: int | None = option(None, "BPE vocabulary size (default: the preset's).")
    tokenizer: str | None = option(None, "Use this tokenizer.json instead of training one.", path=True)
    # Distillation (edgegpt.train.distill): a teacher checkpoint, Hugging Face directory or package, the weight of the
    # label loss, the softening temperature, and whether to start from the teacher's layers.
    teacher: str | None = option(
        None, "Distil from this teacher: an edgegpt checkpoint, a local Hugging Face causal-LM directory "
        "(safetensors and tokenizer.json; nothing is downloaded) or an exported model package (run by onnxruntime, "
        "its top-k cached: --teacher-top-k). The student takes its tokenizer.",
        path=True, absolute=True)
    alpha: float = option(0.5, "With --teacher: weight of the label loss; 1 - alpha weighs the teacher's.")
    temperature: float = option(2.0, "With --teacher: softening temperature of both distributions.")
    init_from_teacher: bool = option(
        False, "With --teacher: start from every k-th teacher layer (the student takes the teacher's width; "
        "--layers sets its depth, default half).")
    # A draft for speculative decoding of the teacher: the teacher's own distribution only (DRAFT_RECIPE).
    as_draft: bool = option(
        False, "With --teacher: train a draft for speculative decoding of the teacher (`edgegpt export TEACHER "
        "--draft OUT`): learn the teacher's own distribution (alpha 0, temperature 1), which keeps more guesses "
        "than the default recipe.")
    # An exported package as the teacher (edgegpt.train.teacher_cache): its top-k, cached on disk per window.
    teacher_top_k: int | None = option(
        None, f"With --teacher: learn the teacher's k most likely next tokens at each position instead of its whole "
        f"distribution (default {DEFAULT_TEACHER_TOP_K} for a package teacher, whose top k is cached on disk; a "
        "checkpoint or Hugging Face teacher gives its full logits unless this is given).")
    teacher_cache: str | None = option(
        None, "With a package --teacher: keep its top-k cache here (default: beside the tokenized data, "
        "--cache-dir/teacher-top-k).", path=True, absolute=True)
    eval_every: int = option(100, "Validate (and keep the best weights) every N steps.")
    compile: bool = option(False, "Use torch.compile (helps on GPUs, not on laptop CPUs).")

    # Tuned here, not on the command line.
    min_lr_ratio: float = 0.1  # cosine decays to 10% of lr, not 0: the last steps still learn
    warmup: float = 0.03  # fraction of the run
    weight_decay: float = 0.1
    beta2: float = 0.99  # 0.99 rather than 0.999: small batches, noisy gradients
    grad_clip: float = 1.0
    eval_windows: int = 32

    def resolved(self) -> TrainOptions:
        """These options with the learning rate, dropout and LoRA scale the user left to the defaults filled in:
        from scratch, or (--from) fine-tuning's. A saved run stores them resolved, so a resume keeps them."""
        if self.from_checkpoint is None:
            lr, dropout = SCRATCH_LR, SCRATCH_DROPOUT
        else:
            # A pretrained model's weights already sit where its loss is low: dropout would only add noise to
            # what little data fine-tuning sees, and the learning rate must be small (see FULL_FINETUNE_LR).
            lr, dropout = (LORA_LR if self.lora else FULL_FINETUNE_LR), 0.0
        alpha = self.lora_alpha if self.lora_alpha is not None or not self.lora else 2.0 * self.lora
        return dataclasses.replace(self, lr=lr if self.lr is None else self.lr,
                                   dropout=dropout if self.dropout is None else self.dropout, lora_alpha=alpha)

    def lora_target_names(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def distillation(self) -> tuple[float, float]:
        """(alpha, temperature) of the distillation loss: --as-draft's recipe, else the options'."""
        return DRAFT_RECIPE if self.as_draft else (self.alpha, self.temperature)

    def validate(self) -> None:
        self._check_types()
        positive = ("batch_size", "grad_accum", "eval_every", "eval_windows", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise EdgeGPTError(f"{flag_name(name)} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise EdgeGPTError(f"--seed must be 0 or more, got {self.seed}")
        if self.vocab_size is not None and not 258 <= self.vocab_size <= MAX_VOCAB:
            raise EdgeGPTError(
                f"--vocab-size must be between 258 (byte-level BPE) and {MAX_VOCAB:,}, got {self.vocab_size}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise EdgeGPTError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise EdgeGPTError(f"--time-budget must be a positive number of minutes, got {self.time_budget}")
        if self.block_size is not None and self.block_size < 2:
            raise EdgeGPTError(f"--block-size must be at least 2, got {self.block_size}")
        if self.epochs is not None and self.epochs < 1:
            raise EdgeGPTError(f"--epochs must be at least 1, got {self.epochs}")
        if self.epochs is not None and self.max_steps is not None:
            raise EdgeGPTError("--epochs and --max-steps both say when to stop; give one of them")
        if self.lr is not None and (not self.lr > 0 or not math.isfinite(self.lr)):
            raise EdgeGPTError(f"--lr must be a positive number, got {self.lr}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise EdgeGPTError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise EdgeGPTError(f"--device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.layers is not None and self.layers < 1:
            raise EdgeGPTError(f"--layers must be at least 1, got {self.layers}")
        if not 0 <= self.alpha <= 1:
            raise EdgeGPTError(f"--alpha must be in [0, 1] (the weight of the label loss), got {self.alpha}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise EdgeGPTError(f"--temperature must be a positive number, got {self.temperature}")
        if self.teacher is None and (self.init_from_teacher or self.alpha != 0.5 or self.temperature != 2.0):
            raise EdgeGPTError("--alpha, --temperature and --init-from-teacher need --teacher")
        if self.as_draft and self.teacher is None:
            raise EdgeGPTError("--as-draft trains a draft of a teacher: give --teacher (the model it will speed up)")
        if self.as_draft and (self.alpha != 0.5 or self.temperature != 2.0):
            raise EdgeGPTError(f"--as-draft sets alpha {DRAFT_RECIPE[0]} and temperature {DRAFT_RECIPE[1]:g}; "
                               "drop --alpha and --temperature")
        if self.teacher is None and (self.teacher_top_k is not None or self.teacher_cache is not None):
            raise EdgeGPTError("--teacher-top-k and --teacher-cache need --teacher")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise EdgeGPTError(f"--teacher-top-k must be at least 1, got {self.teacher_top_k}")
        if self.teacher is not None and self.vocab_size is not None:
            raise EdgeGPTError("--vocab-size cannot be combined with --teacher: the student takes the teacher's")
        self._validate_fine_tuning()

    def _validate_fine_tuning(self) -> None:
        """--from fixes the model and its tokenizer; --lora needs --from and sensible adapters."""
        if self.from_checkpoint is not None:
            for name in ("preset", "layers", "vocab_size", "tokenizer"):
                if getattr(self, name) is not None:
                    raise EdgeGPTError(f"{flag_name(name)} cannot be combined with --from: the model takes the "
                                       "checkpoint's shape and tokenizer; drop it")
            if self.init_from_teacher:
                raise EdgeGPTError("--init-from-teacher cannot be combined with --from: the weights come from the "
                                   "checkpoint; drop one of them")
        if self.lora is None:
            if self.lora_alpha is not None or self.lora_dropout != LORA_DROPOUT or \
                    self.lora_targets != ",".join(LORA_TARGETS):
                raise EdgeGPTError("--lora-alpha, --lora-dropout and --lora-targets need --lora RANK")
            return
        if self.from_checkpoint is None:
            raise EdgeGPTError("--lora adapts a trained model: give --from CHECKPOINT (from scratch, train every "
                               "weight: drop --lora)")
        if self.lora < 1:
            raise EdgeGPTError(f"--lora must be a rank of at least 1, got {self.lora}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise EdgeGPTError(f"--lora-alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise EdgeGPTError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        names = self.lora_target_names()
        unknown = [name for name in names if name not in LORA_TARGETS]
        if unknown or not names or len(set(names)) != len(names):
            raise EdgeGPTError(f"--lora-targets {self.lora_targets!r}: give a comma-separated list of distinct "
                               f"projections out of {','.join(LORA_TARGETS)}")

    def _check_types(self) -> None:
        """Options arrive from Python callers too: '8' < 1 must be a clear error, not a TypeError."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, optional = option_type(f.name)
            if value is None and optional:
                continue
            wanted, accepts = _ACCEPTED[kind]
            if not accepts(value):
                raise EdgeGPTError(f"{flag_name(f.name)} must be {wanted}, got {value!r}")


# A float option takes an int (`lr=1` means 1.0), but a bool is no number here even though Python counts
# True as the int 1: `dropout=True` is a mistake, not 1.0.
_ACCEPTED: dict[type, tuple[str, Callable[[object], bool]]] = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


@functools.cache
def option_type(name: str) -> tuple[type, bool]:
    """The type a TrainOptions field holds, and whether it may be None.

    The annotations are strings (``from __future__ import annotations``); get_type_hints evaluates them."""
    hint = typing.get_type_hints(TrainOptions)[name]
    args = typing.get_args(hint)
    rest = tuple(a for a in args if a is not type(None))
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(rest) < len(args)
    kind = rest[0] if optional and len(rest) == 1 else hint
    if kind not in _ACCEPTED:  # a new option of a type this check does not know yet: a bug, not a user error
        raise TypeError(f"TrainOptions.{name}: no type check for {hint!r}")
    return kind, optional


def flag_name(name: str) -> str:
    """The command-line flag of a TrainOptions field (`batch_size` -> `--batch-size`), as errors name it."""
    flag = _FIELDS[name].metadata.get("flag") if name in _FIELDS else None
    return flag.name if flag is not None and flag.name else "--" + name.replace("_", "-")


def flags() -> list[tuple[dataclasses.Field, Flag]]:
    """The fields `edgegpt train` takes as options, in their order, each with how it is given."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(TrainOptions) if "flag" in f.metadata]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}

# --as-draft: alpha 0, temperature 1, i.e. only KL(teacher ‖ student) on the unsoftened distributions. A
# guess is kept with probability sum(min(p, q)) (greedy: when the argmaxes agree), which grows as q nears p
# itself; labels and softening aim elsewhere. `benchmarks/speculative.py draft-recipes` compares the recipes (agreement
# with the target, kept guesses, validation loss): its figures are in docs/benchmarks.md.
DRAFT_RECIPE = (0.0, 1.0)

# The embedding of a larger vocabulary would dwarf any model edgegpt trains.
MAX_VOCAB = 1 << 20
