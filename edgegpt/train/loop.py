"""Training: AdamW with warmup and cosine decay, periodic validation, best-weights checkpoint, resume.

The checkpoint directory always holds the weights with the best validation loss (what export reads)
and the latest state for resuming. Batches and dropout are drawn from (seed, step) alone, so a
resumed run is the run that was interrupted.

One run, as every process under torchrun does it (rank 0 alone writes and reports)::

    train ─► _train
               ├─ prepare_run        options (a resumed run's own, defaults resolved), device and process
               │                     group, teacher, tokenizer, model shape (--from: the checkpoint's,
               │                     edgegpt.train.finetune), block size; the teacher's weights last
               ├─ load_run_data      tokens (rank 0 first, the other ranks from its cache), or JSONL examples
               │                     packed into rows (edgegpt.train.batches); checked; --epochs becomes
               │                     --max-steps
               ├─ open_teaching      what a step asks of the teacher; a package teacher's top-k cache (rank 0
               │                     makes it, edgegpt.train.teacher_cache)
               ├─ build_training     seeded model (--from: its weights; --lora: adapters on the frozen base),
               │                     optimizer; a resumed run's weights, moments, progress
               ├─ write_run_files    config.json, tokenizer.json (--from: its generation config, template)
               ├─ wrap_model         DistributedDataParallel under torchrun, torch.compile with --compile
               ├─ report_start
               ├─ run_steps ◄─────┐  until --max-steps, the time budget (any rank) or Ctrl-C: stop_reason
               │   optimizer_step │  lr, dropout seed, this rank's rows, _train_step, clip, update
               │   validate       │  every --eval-every: a new best loss ─► model.safetensors (--lora:
               │                  │  merged, and adapter/)
               │   save_state ────┘  every --save-every: train_state.*
               ├─ finish             a last validation if due, the final state, ranks wait for rank 0
               └─ summarize          TrainSummary
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel

from edgegpt.core.config import ModelConfig, preset
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, TOKENIZER, TRAIN_STATE, WEIGHTS
from edgegpt.core.io import write_bytes_atomic
from edgegpt.model import GPT
from edgegpt.scoring import char_starts_table
from edgegpt.tokenizer import load_tokenizer
from edgegpt.train import distributed
from edgegpt.train.batches import (
    Batch,
    CountedLogits,
    Examples,
    check_example_data,
    draw_batch,
    evaluate_rows,
    load_example_rows,
)
from edgegpt.train.corpus import default_corpus, read_corpus, split_documents
from edgegpt.train.data import TokenData, grid_windows, prepare_data
from edgegpt.train.distill import (
    Teacher,
    Teaching,
    check_student_tokenizer,
    distillation_loss,
    init_from_teacher,
    open_teacher,
    open_top_k_cache,
    student_config_from_teacher,
)
from edgegpt.train.finetune import (
    check_teacher_vocabulary,
    copy_base_files,
    example_format,
    load_base_model,
    open_base,
    save_best,
    steps_for_epochs,
    with_adapters,
)
from edgegpt.train.options import DEFAULT_TEACHER_TOP_K, DEFAULT_TIME_BUDGET_MIN, TrainOptions
from edgegpt.train.reporting import Reporter
from edgegpt.train.state import load_train_state, read_progress, save_train_state
from edgegpt.train.validation import evaluate_sample

# DDP's "accumulate locally" context, entered for all but the last micro-batch of a step.
NoSync = Callable[[], contextlib.AbstractContextManager]


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float
    val_nats_per_char: float
    tokens_per_s: float  # over this process's whole run: the steps, validation and saving
    checkpoint: str
    elapsed_s: float
    stopped: str  # "max_steps", "time_budget" or "interrupted"
    parameters: int
    device: str
    processes: int = 1
    teacher: str | None = None
    base: str | None = None  # --from's checkpoint
    trainable_parameters: int | None = None  # with --lora, the adapters'; else every parameter
    # With a top-k teacher: the rows (windows) whose top k this run read from the cache, and those the teacher ran
    # on, over every process.
    teacher_rows_cached: int | None = None
    teacher_rows_computed: int | None = None
    step_tokens_per_s: float | None = None  # over the optimizer steps' own time (what a plain training loop times)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunPlan:
    """What the run is, settled before any data is read or any weight exists."""

    out: Path
    opts: TrainOptions  # a resumed run's own, with a default time budget when nothing else stops it
    data: list[Path]
    val_data: list[Path]
    world: distributed.World
    device: torch.device
    teacher: Teacher | None
    tokenizer: Tokenizer | None  # None: train one on the data
    cfg: ModelConfig
    block_size: int
    resume: bool
    saved: dict[str, Any]  # the progress of the run being resumed; empty for a fresh run
    examples: bool = False  # the data is JSONL examples (packed rows), not plain text

    @property
    def fixed_windows(self) -> bool:
        """Plain text's windows come from the fixed grid: a package teacher's top k is cached per window of it."""
        return self.teacher is not None and self.teacher.kind == "package" and not self.examples

    @property
    def budget_s(self) -> float | None:
        return self.opts.time_budget * 60 if self.opts.time_budget else None

    @property
    def rows_per_rank(self) -> int:
        return self.opts.batch_size * self.opts.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_rank * self.world.size * self.block_size

    @property
    def first_step(self) -> int:
        """The step this process started from: throughput counts only the steps it trained."""
        return self.saved.get("step", 0)

    def fraction_done(self, step: int, elapsed_s: float) -> float:
        """How far through the run, by steps or by the time budget, whichever is further."""
        return max(step / self.opts.max_steps if self.opts.max_steps else 0.0,
                   elapsed_s / self.budget_s if self.budget_s else 0.0)


@dataclass
class Training:
    """A run in progress: its plan, data, model and optimizer, and how far it has got."""

    plan: RunPlan
    tokens: TokenData | Examples
    char_table: np.ndarray
    model: GPT
    optimizer: torch.optim.AdamW
    trainable: int  # parameters the optimizer updates (--lora: the adapters')
    forward: torch.nn.Module  # the model as the step calls it: wrapped by DDP and torch.compile when asked
    no_sync: NoSync | None = None
    teaching: Teaching | None = None
    teacher_rows: dict[str, int] | None = None  # with a top-k teacher: {"cached": n, "computed": n}, every process
    step: int = 0
    elapsed_before: float = 0.0  # seconds earlier processes of this run trained
    best_val: dict[str, float] = field(default_factory=lambda: {"loss": math.inf, "nats_per_char": math.inf})
    started: float = 0.0  # perf_counter() when this process began stepping
    step_s: float = 0.0  # seconds in optimizer_step, this process
    last_loss: float = math.nan
    stopped: str = "max_steps"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeGPTError("--device cuda: this PyTorch has no CUDA device; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EdgeGPTError("--device mps: no Apple GPU is available; use --device cpu or auto")
    return torch.device(name)


def learning_rate(progress: float, opts: TrainOptions) -> float:
    """Linear warmup over the first `warmup` of the run, then cosine from lr down to lr·min_lr_ratio."""
    if progress < opts.warmup:
        return opts.lr * max(progress, 1e-3) / opts.warmup
    t = min((progress - opts.warmup) / max(1 - opts.warmup, 1e-9), 1.0)
    low = opts.lr * opts.min_lr_ratio
    return low + 0.5 * (opts.lr - low) * (1 + math.cos(math.pi * t))


def make_optimizer(model: GPT, opts: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters that train (a frozen base under --lora has neither updates nor moments)."""
    # Decay matrices only: decaying norm gains pulls them toward 0 for no regularising benefit.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    # The fused kernel updates each tensor in one pass where the default runs a dozen elementwise ops over it,
    # on the CPU too (torch >= 2.4).
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, opts.beta2), fused=device.type in ("cpu", "cuda"))


def load_data(data: list[Path], val_data: list[Path], vocab_size: int, cache_dir: Path, tokenizer: Tokenizer | None,
              reporter: Reporter) -> TokenData:
    documents = read_corpus(data) if data else default_corpus()
    if val_data:
        train_docs, val_docs = documents, read_corpus(val_data)
    else:
        train_docs, val_docs = split_documents(documents)
    return prepare_data(train_docs, val_docs, vocab_size, cache_dir, tokenizer=tokenizer, log=reporter.log)


def choose_tokenizer(opts: TrainOptions, teacher: Teacher | None) -> Tokenizer | None:
    """The teacher's tokenizer when distilling, else --tokenizer, else None (train one on the data)."""
    if teacher is not None:
        if opts.tokenizer:
            check_student_tokenizer(teacher, Path(opts.tokenizer))
        return teacher.tokenizer
    return load_tokenizer(Path(opts.tokenizer)) if opts.tokenizer else None


def student_config(opts: TrainOptions, teacher: Teacher | None, tokenizer: Tokenizer | None) -> ModelConfig:
    """The preset (with --layers), over the teacher's vocabulary when distilling; with
    --init-from-teacher, the teacher's own shape with fewer layers."""
    if teacher is not None and opts.init_from_teacher:
        cfg = student_config_from_teacher(teacher, opts.layers)
        if opts.preset is not None:
            wanted = preset(opts.preset)
            shape = (wanted.dim, wanted.n_heads, wanted.n_kv_heads, wanted.ffn_dim)
            if shape != (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim):
                raise EdgeGPTError(
                    f"--init-from-teacher needs the student as wide as the teacher: preset {opts.preset} has dim "
                    f"{wanted.dim}, the teacher {cfg.dim}; drop --preset to take the teacher's shape"
                )
        return cfg
    if teacher is not None:
        vocab = teacher.vocab_size
    else:
        vocab = opts.vocab_size or (tokenizer.get_vocab_size() if tokenizer else None)
    cfg = preset(opts.preset or "micro", vocab_size=vocab, n_layers=opts.layers)
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
        raise EdgeGPTError(
            f"--tokenizer has {tokenizer.get_vocab_size()} tokens, more than --vocab-size {cfg.vocab_size}"
        )
    return cfg


def resumed_options(given: TrainOptions, saved: dict[str, Any]) -> TrainOptions:
    """The run's identity (model, data, teacher, schedule shape) comes from the saved state; only the
    stopping rule, the device and how often to save may change on resume."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    merged = {**{k: v for k, v in saved.items() if k in known}, "device": given.device, "save_every": given.save_every,
              "max_steps": given.max_steps or saved.get("max_steps"),
              "time_budget": given.time_budget or saved.get("time_budget")}
    return TrainOptions(**merged)


def train(
    data: list[Path],
    val_data: list[Path],
    out: Path,
    opts: TrainOptions,
    cache_dir: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainSummary:
    """Train (or resume) into `out`. Ctrl-C and a spent time budget both end with a saved checkpoint.

    Under torchrun every process runs this; rank 0 alone writes and reports (edgegpt.train.distributed)."""
    world = distributed.world_from_env()
    reporter = reporter if reporter is not None and world.is_main else Reporter()
    try:
        return _train(list(data), list(val_data), Path(out), opts, Path(cache_dir), resume, reporter, on_step, world)
    finally:
        distributed.stop(world)


def _train(data: list[Path], val_data: list[Path], out: Path, opts: TrainOptions, cache_dir: Path, resume: bool,
           reporter: Reporter, on_step: Callable[[int], None] | None, world: distributed.World) -> TrainSummary:
    plan = prepare_run(data, val_data, out, opts, resume, world, reporter)
    tokens = load_run_data(plan, cache_dir, reporter)
    teaching = open_teaching(plan, tokens, cache_dir, reporter)
    run = build_training(plan, tokens, char_starts_table(tokens.tokenizer, plan.cfg.vocab_size), reporter)
    run.teaching = teaching
    write_run_files(plan, tokens)
    run.forward, run.no_sync = wrap_model(run.model, plan)
    report_start(run, reporter)
    run_steps(run, reporter, on_step)
    finish(run, reporter)
    return summarize(run)


def prepare_run(data: list[Path], val_data: list[Path], out: Path, opts: TrainOptions, resume: bool,
                world: distributed.World, reporter: Reporter) -> RunPlan:
    """Settle what the run is: a resumed run's options and data, the device (joining torchrun's group),
    the teacher, the tokenizer and the model's shape. The teacher's weights load last, once nothing
    left here can refuse the run."""
    saved: dict[str, Any] = {}
    if resume:
        saved = read_progress(out)
        opts = resumed_options(opts, saved["options"])
        data = data or [Path(p) for p in saved["data"]]
        val_data = val_data or [Path(p) for p in saved["val_data"]]
    if opts.max_steps is None and opts.time_budget is None and opts.epochs is None:
        opts = dataclasses.replace(opts, time_budget=DEFAULT_TIME_BUDGET_MIN)
    opts.validate()
    opts = opts.resolved()
    base = open_base(Path(opts.from_checkpoint), out) if opts.from_checkpoint and not resume else None
    examples = check_example_data(data, opts, resume)
    device = distributed.start(world, opts.device) if world.distributed else pick_device(opts.device)
    teacher = open_teacher(Path(opts.teacher), device, world.local_size) if opts.teacher else None
    if teacher is not None:
        opts = teacher_top_k(opts, teacher)
    if resume:
        tokenizer = load_tokenizer(out / TOKENIZER)
    else:
        tokenizer = base[1] if base else choose_tokenizer(opts, teacher)
    if "config" in saved:
        cfg = ModelConfig.from_dict(saved["config"], source=str(out / TRAIN_STATE))
    else:
        cfg = base[0] if base else student_config(opts, teacher, tokenizer)
    if base is not None and teacher is not None:
        check_teacher_vocabulary(teacher, tokenizer, cfg)
    block_size = training_block_size(opts, cfg, teacher)
    if teacher is not None:
        teacher.load(device, log=reporter.log)
    return RunPlan(out, opts, data, val_data, world, device, teacher, tokenizer, cfg, block_size, resume, saved,
                   examples)


def teacher_top_k(opts: TrainOptions, teacher: Teacher) -> TrainOptions:
    """--teacher-top-k checked against the teacher, and a package teacher's default filled in (a resumed run keeps
    it, as it keeps every option)."""
    if teacher.kind == "package" and opts.teacher_top_k is None:
        opts = dataclasses.replace(opts, teacher_top_k=min(DEFAULT_TEACHER_TOP_K, teacher.vocab_size))
    if opts.teacher_top_k is not None and opts.teacher_top_k > teacher.vocab_size:
        raise EdgeGPTError(f"--teacher-top-k {opts.teacher_top_k} exceeds the teacher's vocabulary of "
                           f"{teacher.vocab_size} tokens; give at most {teacher.vocab_size}")
    if opts.teacher_cache is not None and teacher.kind != "package":
        raise EdgeGPTError("--teacher-cache keeps an exported package teacher's top k; this teacher is a "
                           f"{'checkpoint' if teacher.kind == 'edgegpt' else 'Hugging Face model'}: drop it")
    return opts


def training_block_size(opts: TrainOptions, cfg: ModelConfig, teacher: Teacher | None) -> int:
    """--block-size, else the longest window both the student and the teacher can take."""
    block_size = opts.block_size or min(cfg.max_len, teacher.max_len if teacher else cfg.max_len)
    if block_size > cfg.max_len:
        raise EdgeGPTError(f"--block-size {block_size} exceeds the model's context of {cfg.max_len} tokens")
    if teacher is not None and block_size > teacher.max_len:
        raise EdgeGPTError(f"--block-size {block_size} exceeds the teacher's context of {teacher.max_len} tokens")
    return block_size


def load_run_data(plan: RunPlan, cache_dir: Path, reporter: Reporter) -> TokenData | Examples:
    """The run's tokens or packed examples, refused when they are not the resumed run's; --epochs as steps."""
    if plan.examples:
        fmt = example_format(plan.opts, plan.out, plan.resume, plan.tokenizer)
        data = load_example_rows(plan.data, plan.val_data, fmt, plan.block_size, plan.opts.seed,
                                 plan.opts.include_prompts, plan.opts.drop_long)
        reporter.log(data.summary.describe())
        unit, count = "rows", len(data.train)
    else:
        data = load_text(plan, cache_dir, reporter)
        unit, count = "windows", len(data.train) // plan.block_size
        if plan.fixed_windows:
            count = grid_windows(len(data.train), plan.block_size)
    if plan.resume and plan.saved.get("data_key") != data.key:
        raise EdgeGPTError("cannot resume: the training data differs from the run being resumed; pass the same --data")
    if plan.opts.epochs is not None:  # from here on a number of steps, which a resumed run keeps
        steps = steps_for_epochs(plan.opts.epochs, count, plan.rows_per_rank * plan.world.size)
        reporter.log(f"{plan.opts.epochs} epochs of {count:,} {unit}: {steps:,} steps")
        plan.opts = dataclasses.replace(plan.opts, max_steps=steps, epochs=None)
    return data


def load_text(plan: RunPlan, cache_dir: Path, reporter: Reporter) -> TokenData:
    """Plain text's tokens, refused when too few to train and validate on."""
    world = plan.world
    if not world.is_main:
        distributed.barrier(world)  # rank 0 trains the tokenizer and fills the token cache, once
    tokens = load_data(plan.data, plan.val_data, plan.cfg.vocab_size, cache_dir, plan.tokenizer, reporter)
    if world.is_main:
        distributed.barrier(world)
    if len(tokens.train) < plan.block_size + 2:
        raise EdgeGPTError(
            f"the training split has only {len(tokens.train)} tokens, fewer than one window of {plan.block_size + 1}; "
            "add data or lower --block-size"
        )
    if len(tokens.val) < 2:
        raise EdgeGPTError("the validation split is empty after tokenization; add data or pass --val-data")
    return tokens


def open_teaching(plan: RunPlan, tokens: TokenData | Examples, cache_dir: Path,
                  reporter: Reporter) -> Teaching | None:
    """What a step asks of the teacher; a package teacher's top-k cache, --teacher-cache or beside the tokens in
    cache_dir (rank 0 makes it, the others open it after)."""
    if plan.teacher is None:
        return None
    teaching = Teaching(plan.teacher, plan.opts.teacher_top_k)
    if plan.fixed_windows:
        root = Path(plan.opts.teacher_cache) if plan.opts.teacher_cache else cache_dir / "teacher-top-k"
        if not plan.world.is_main:
            distributed.barrier(plan.world)
        teaching.cache = open_top_k_cache(plan.teacher, root, tokens.key, grid_windows(len(tokens.train),
                                          plan.block_size), plan.block_size, plan.opts.teacher_top_k, reporter.log)
        if plan.world.is_main:
            distributed.barrier(plan.world)
    return teaching


def build_training(plan: RunPlan, tokens: TokenData | Examples, char_table: np.ndarray, reporter: Reporter) -> Training:
    """The model from the seed (or the teacher's layers, or --from's weights; --lora's adapters from the seed),
    its optimizer, and, when resuming, the saved weights, moments and progress."""
    opts = plan.opts
    torch.manual_seed(opts.seed)
    if opts.from_checkpoint and not plan.resume:
        model, trainable = load_base_model(Path(opts.from_checkpoint), opts)
    else:  # a resumed run's weights (a base and its adapters under --lora) come from its state below
        model, trainable = with_adapters(GPT(plan.cfg, dropout=opts.dropout), opts)
    model = model.to(plan.device)
    model.gradient_checkpointing = opts.gradient_checkpointing
    if opts.from_checkpoint:
        how = f"LoRA rank {opts.lora}, alpha {opts.lora_alpha:g}" if opts.lora else "every weight"
        reporter.log(f"fine-tuning {opts.from_checkpoint} ({how}: {trainable:,} trainable parameters)")
    if plan.teacher is not None and opts.init_from_teacher and not plan.resume:
        reporter.log(f"initialising the student from the teacher's layers {init_from_teacher(model, plan.teacher)}")
    optimizer = make_optimizer(model, opts, plan.device)
    run = Training(plan, tokens, char_table, model, optimizer, trainable, forward=model)
    if plan.resume:
        load_train_state(plan.out, model, optimizer)
        run.step, run.elapsed_before = plan.saved["step"], plan.saved["elapsed_s"]
        run.best_val = plan.saved["best_val"]
    return run


def write_run_files(plan: RunPlan, tokens: TokenData | Examples) -> None:
    """config.json and tokenizer.json first: a resume needs them even before the first best weights."""
    if not plan.world.is_main:
        return
    plan.out.mkdir(parents=True, exist_ok=True)
    for stale in plan.out.glob(".*.tmp"):  # a write a crash interrupted (edgegpt.core.io.atomic_path)
        stale.unlink(missing_ok=True)
    plan.cfg.save(plan.out / CONFIG)
    write_bytes_atomic(plan.out / TOKENIZER, tokens.tokenizer.to_str().encode())
    if plan.opts.from_checkpoint and not plan.resume:
        copy_base_files(Path(plan.opts.from_checkpoint), plan.out)


def wrap_model(model: GPT, plan: RunPlan) -> tuple[torch.nn.Module, NoSync | None]:
    """The module the step calls (CountedLogits; DDP- and compile-wrapped when asked), and DDP's no_sync."""
    forward: torch.nn.Module = CountedLogits(model)
    no_sync = None
    if plan.world.distributed:
        forward = DistributedDataParallel(forward, device_ids=[plan.device] if plan.device.type == "cuda" else None)
        no_sync = forward.no_sync
    if plan.opts.compile:
        forward = torch.compile(forward)
    return forward, no_sync


def report_start(run: Training, reporter: Reporter) -> None:
    plan, opts, teacher = run.plan, run.plan.opts, run.plan.teacher
    alpha, temperature = opts.distillation()
    recipe = f"alpha {alpha}, temperature {temperature:g}{', as a draft' if opts.as_draft else ''}"
    recipe += f", top {opts.teacher_top_k}" if opts.teacher_top_k else ""
    data = run.tokens
    train_tokens, val_tokens = (data.train_tokens, data.val_tokens) if plan.examples else (len(data.train),
                                                                                            len(data.val))
    reporter.start(opts.max_steps, plan.budget_s, {
        "parameters": run.model.num_parameters(), "device": str(plan.device), "train_tokens": train_tokens,
        "val_tokens": val_tokens, "tokens_per_step": plan.tokens_per_step, "resumed_at": run.step,
        "processes": plan.world.size,
        "teacher": f"{teacher.path} ({teacher.parameters / 1e6:.1f}M parameters, {recipe})" if teacher else None,
    })


def run_steps(run: Training, reporter: Reporter, on_step: Callable[[int], None] | None) -> None:
    """Step until --max-steps, the time budget or Ctrl-C (run.stopped says which), validating and saving
    the resume state on their schedules."""
    plan, opts = run.plan, run.plan.opts
    run.started = time.perf_counter()
    run.model.train()
    try:
        while True:
            elapsed = run.elapsed_before + time.perf_counter() - run.started
            stop = stop_reason(plan, run.step, elapsed)
            if stop is not None:
                run.stopped = stop
                break
            step_started = time.perf_counter()
            loss, parts = optimizer_step(run, elapsed)
            run.step_s += time.perf_counter() - step_started
            run.step += 1
            run.last_loss = loss
            run_s = time.perf_counter() - run.started
            reporter.step(run.step, loss, plan.tokens_per_step * (run.step - plan.first_step) / max(run_s, 1e-9),
                          plan.fraction_done(run.step, run.elapsed_before + run_s), parts)
            if run.step % opts.eval_every == 0:
                validate(run, reporter)
            if run.step % opts.save_every == 0:
                save_state(run, "running")
            if on_step:
                on_step(run.step)
    except KeyboardInterrupt:
        run.stopped = "interrupted"
    finally:
        reporter.stop()


def stop_reason(plan: RunPlan, step: int, elapsed: float) -> str | None:
    """Why the run ends before `step + 1`, or None; every rank gets the same answer."""
    if plan.opts.max_steps is not None and step >= plan.opts.max_steps:
        return "max_steps"
    if distributed.any_rank(plan.world, plan.budget_s is not None and elapsed >= plan.budget_s, plan.device):
        return "time_budget"
    return None


def optimizer_step(run: Training, elapsed: float) -> tuple[float, dict[str, float]]:
    """One update at run.step; returns the loss and its parts (distillation), averaged across ranks."""
    plan, opts, world = run.plan, run.plan.opts, run.plan.world
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(plan.fraction_done(run.step, elapsed), opts)
    # Dropout masks depend on (seed, step, rank) only; rank 0's are a single process's.
    torch.manual_seed(opts.seed * 1_000_003 + run.step + world.rank * (1 << 40))
    batch = draw_batch(run.tokens, plan.rows_per_rank * world.size, plan.block_size, opts.seed, run.step,
                       plan.fixed_windows)
    counted_per_rank = batch.counted / world.size
    batch = batch.of_rank(world).to(plan.device)
    losses = _train_step(run.forward, run.teaching, batch, counted_per_rank, opts, plan.device, run.no_sync)
    losses = distributed.mean(world, losses, plan.device)
    loss = losses.pop("loss")
    if not math.isfinite(loss):
        raise EdgeGPTError(
            f"the loss became {loss} at step {run.step + 1}; the last good checkpoint in {plan.out} is kept. "
            "Lower --lr or check the data"
        )
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), opts.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, losses


def _train_step(forward: torch.nn.Module, teaching: Teaching | None, batch: Batch, counted_per_rank: float,
                opts: TrainOptions, device: torch.device, no_sync: NoSync | None) -> dict[str, float]:
    """Forward and backward over this rank's rows in --grad-accum micro-batches, each weighed by its share of
    the global batch's labels (Batch.weight); returns the losses. Gradients are averaged across ranks once, on
    the last micro-batch."""
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    chunks = batch.chunk(opts.grad_accum)
    for i, micro in enumerate(chunks):
        last = i == len(chunks) - 1
        weight = micro.weight(counted_per_rank)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward(micro.inputs, documents=micro.input_documents, counted=micro.loss_mask)
            teacher = teaching.targets(micro.inputs, micro.windows) if teaching is not None else None  # (plain text)
            loss = distillation_loss(logits, teacher, micro.counted_labels, *opts.distillation())
            (loss.total * weight).backward()
        for key, value in zip(("loss", "ce", "kd"), loss):
            sums[key] += value.item() * weight
    if teaching is None:
        del sums["kd"], sums["ce"]
    return sums


def validate(run: Training, reporter: Reporter) -> None:
    """Score the validation sample on rank 0; weights better than any before become the checkpoint's."""
    plan = run.plan
    if not plan.world.is_main:
        return
    if plan.examples:
        result = evaluate_rows(run.model, run.tokens.val, run.char_table, plan.opts.eval_windows, plan.device)
    else:
        result = evaluate_sample(run.model, run.tokens.val, run.char_table, plan.block_size, plan.opts.eval_windows,
                                 plan.device)
    is_best = result.nats_per_token < run.best_val["loss"]
    if is_best:
        run.best_val.update(loss=result.nats_per_token, nats_per_char=result.nats_per_char, step=run.step)
        save_best(plan.out, run.model, plan.opts)  # a checkpoint is complete once its weights exist
    reporter.evaluated(run.step, result, is_best)


def save_state(run: Training, stopped: str) -> None:
    """The resume state (rank 0): weights, moments and progress in one atomic file."""
    plan = run.plan
    if not plan.world.is_main:
        return
    save_train_state(plan.out, run.model, run.optimizer, {
        "step": run.step, "elapsed_s": run.elapsed_before + (time.perf_counter() - run.started),
        "best_val": run.best_val, "options": dataclasses.asdict(plan.opts), "config": plan.cfg.to_dict(),
        "data": [str(Path(p).resolve()) for p in plan.data],
        "val_data": [str(Path(p).resolve()) for p in plan.val_data],
        "data_key": run.tokens.key, "stopped": stopped,
    })


def finish(run: Training, reporter: Reporter) -> None:
    """Validate the last weights unless they just were (or no checkpoint exists yet), save the final state,
    and keep every rank until rank 0 has written it."""
    plan = run.plan
    report_teacher_rows(run, reporter)
    if plan.world.is_main and (run.step % plan.opts.eval_every or not (plan.out / WEIGHTS).exists()):
        validate(run, reporter)
    save_state(run, run.stopped)
    distributed.barrier(plan.world)  # no rank leaves (and tears down the group) while rank 0 still writes


def report_teacher_rows(run: Training, reporter: Reporter) -> None:
    """How many rows' top k came from the cache and how many the teacher ran on, summed over the processes."""
    teaching, world = run.teaching, run.plan.world
    if teaching is None or teaching.k is None:
        return
    means = distributed.mean(world, {"cached": teaching.cached, "computed": teaching.computed}, run.plan.device)
    run.teacher_rows = {name: round(value * world.size) for name, value in means.items()}
    filled = f"; the cache holds {teaching.cache.filled_count():,} of {teaching.cache.shape.windows:,} windows" \
        if teaching.cache is not None else ""
    reporter.log(f"teacher top {teaching.k}: {run.teacher_rows['cached']:,} rows from the cache, "
                 f"{run.teacher_rows['computed']:,} computed{filled}")


def summarize(run: Training) -> TrainSummary:
    plan = run.plan
    run_s = time.perf_counter() - run.started
    trained_steps = run.step - plan.first_step
    return TrainSummary(
        steps=run.step, tokens=run.step * plan.tokens_per_step, train_loss=run.last_loss,
        val_loss=run.best_val["loss"], val_nats_per_char=run.best_val["nats_per_char"],
        tokens_per_s=trained_steps * plan.tokens_per_step / max(run_s, 1e-9), checkpoint=str(plan.out),
        elapsed_s=run.elapsed_before + run_s, stopped=run.stopped, parameters=run.model.num_parameters(),
        device=str(plan.device), processes=plan.world.size, teacher=str(plan.teacher.path) if plan.teacher else None,
        base=plan.opts.from_checkpoint, trainable_parameters=run.trainable,
        teacher_rows_cached=run.teacher_rows["cached"] if run.teacher_rows else None,
        teacher_rows_computed=run.teacher_rows["computed"] if run.teacher_rows else None,
        step_tokens_per_s=trained_steps * plan.tokens_per_step / run.step_s if run.step_s else None,
    )
