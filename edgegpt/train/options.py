"""Training options: every knob of `edgegpt train`, with defaults and checks, torch-free so the CLI can
declare its options from these defaults without importing torch."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Callable

from edgegpt.core.errors import EdgeGPTError

# With neither --max-steps nor --time-budget: long enough for `micro` to reach its best on a laptop.
DEFAULT_TIME_BUDGET_MIN = 10.0


@dataclass
class TrainOptions:
    """Defaults measured on 2 CPU cores with `micro` on tinyshakespeare (see the README)."""

    preset: str | None = None  # None: micro, or the teacher's shape with --init-from-teacher
    vocab_size: int | None = None  # None: the preset's
    batch_size: int = 8
    block_size: int | None = None  # None: the model's max_len
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to 10% of lr, not 0: the last steps still learn
    warmup: float = 0.03  # fraction of the run
    weight_decay: float = 0.1
    beta2: float = 0.99  # 0.99 rather than 0.999: small batches, noisy gradients
    grad_clip: float = 1.0
    dropout: float = 0.1
    max_steps: int | None = None
    time_budget: float | None = None  # minutes
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    save_every: int = 100  # resume state every N steps: a crash loses at most this many
    layers: int | None = None  # None: the preset's (or, from a teacher, half the teacher's)
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    # Distillation (edgegpt.train.distill): a teacher checkpoint or Hugging Face directory, the weight of the
    # label loss, the softening temperature, and whether to start from the teacher's layers.
    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    init_from_teacher: bool = False
    # A draft for speculative decoding of the teacher: the teacher's own distribution only (DRAFT_RECIPE).
    as_draft: bool = False

    def distillation(self) -> tuple[float, float]:
        """(alpha, temperature) of the distillation loss: --as-draft's recipe, else the options'."""
        return DRAFT_RECIPE if self.as_draft else (self.alpha, self.temperature)

    def validate(self) -> None:
        self._check_types()
        positive = ("batch_size", "grad_accum", "eval_every", "eval_windows", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise EdgeGPTError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
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
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise EdgeGPTError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.dropout < 1:
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
        if self.teacher is not None and self.vocab_size is not None:
            raise EdgeGPTError("--vocab-size cannot be combined with --teacher: the student takes the teacher's")

    def _check_types(self) -> None:
        """Options arrive from Python callers too: '8' < 1 must be a clear error, not a TypeError."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, optional = _option_type(f.name)
            if value is None and optional:
                continue
            wanted, accepts = _ACCEPTED[kind]
            if not accepts(value):
                raise EdgeGPTError(f"{_flag(f.name)} must be {wanted}, got {value!r}")


# A float option takes an int (`lr=1` means 1.0), but a bool is no number here even though Python counts
# True as the int 1: `dropout=True` is a mistake, not 1.0.
_ACCEPTED: dict[type, tuple[str, Callable[[object], bool]]] = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


@functools.cache
def _option_type(name: str) -> tuple[type, bool]:
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --as-draft: alpha 0, temperature 1, i.e. only KL(teacher ‖ student) on the unsoftened distributions. A
# guess is kept with probability sum(min(p, q)) (greedy: when the argmaxes agree), which grows as q nears p
# itself; labels and softening aim elsewhere. Measured (benchmarks/draft_recipes.py) on `nano` drafts of a
# `small` tinyshakespeare target, 8 minutes each on 2 cores, teacher-forced on 8,192 held-out tokens:
# argmax agreement 0.634 with the default recipe (alpha 0.5, T 2), 0.798 with this one; sum(min(p, q)) at
# T 0.8: 0.772 vs 0.877; and this with the worse validation loss (1.826 vs 1.736 nats per character).
DRAFT_RECIPE = (0.0, 1.0)

# The embedding of a larger vocabulary would dwarf any model edgegpt trains.
MAX_VOCAB = 1 << 20
