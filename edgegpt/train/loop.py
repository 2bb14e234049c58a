"""Training: AdamW with warmup and cosine decay, periodic validation, best-weights checkpoint, resume.

The checkpoint directory always holds the weights with the best validation loss (what export reads)
and the latest state for resuming. Batches and dropout are drawn from (seed, step) alone, so a
resumed run is the run that was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel

from edgegpt.train import distributed
from edgegpt.checkpoint import CONFIG, TOKENIZER, save_weights, WEIGHTS
from edgegpt.core.config import ModelConfig, preset
from edgegpt.train.corpus import default_corpus, read_corpus, split_documents
from edgegpt.train.data import TokenData, char_starts_table, prepare_data, sample_batch
from edgegpt.train.distill import (Teacher, check_student_tokenizer, distillation_loss, init_from_teacher, open_teacher,
                             student_config_from_teacher)
from edgegpt.core.errors import EdgeGPTError
from edgegpt.train.validation import EvalResult, evaluate_sample
from edgegpt.core.io import write_bytes_atomic
from edgegpt.model import GPT
from edgegpt.tokenizer import load_tokenizer
from edgegpt.train.options import DEFAULT_TIME_BUDGET_MIN, TrainOptions
from edgegpt.train.state import STATE_JSON, load_train_state, read_progress, save_train_state


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float
    val_nats_per_char: float
    tokens_per_s: float
    checkpoint: str
    elapsed_s: float
    stopped: str  # "max_steps", "time_budget" or "interrupted"
    parameters: int
    device: str
    processes: int = 1
    teacher: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reporter:
    """What training tells the user; the CLI draws a progress bar, tests stay silent."""

    def start(self, total_steps: int | None, budget_s: float | None, info: dict[str, Any]) -> None: ...
    def step(self, step: int, loss: float, tokens_per_s: float, progress: float,
             parts: dict[str, float] | None = None) -> None: ...
    def evaluated(self, step: int, result: EvalResult, best: bool) -> None: ...
    def log(self, message: str) -> None: ...
    def stop(self) -> None: ...


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
    # Decay matrices only: decaying norm gains pulls them toward 0 for no regularising benefit.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, opts.beta2), fused=device.type == "cuda")


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
            if (wanted.dim, wanted.n_heads, wanted.n_kv_heads, wanted.ffn_dim) != (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim):
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
        raise EdgeGPTError(f"--tokenizer has {tokenizer.get_vocab_size()} tokens, more than --vocab-size {cfg.vocab_size}")
    return cfg


def resumed_options(given: TrainOptions, saved: dict[str, Any]) -> TrainOptions:
    """The run's identity (model, data, teacher, schedule shape) comes from the saved state; only the
    stopping rule, the device and how often to save may change on resume."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    merged = {**{k: v for k, v in saved.items() if k in known}, "device": given.device, "save_every": given.save_every,
              "max_steps": given.max_steps or saved.get("max_steps"), "time_budget": given.time_budget or saved.get("time_budget")}
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
    progress_state: dict[str, Any] = {}
    if resume:
        progress_state = read_progress(out)
        opts = resumed_options(opts, progress_state["options"])
        data = data or [Path(p) for p in progress_state["data"]]
        val_data = val_data or [Path(p) for p in progress_state["val_data"]]
    if opts.max_steps is None and opts.time_budget is None:
        opts = dataclasses.replace(opts, time_budget=DEFAULT_TIME_BUDGET_MIN)
    opts.validate()
    device = distributed.start(world, opts.device) if world.distributed else pick_device(opts.device)

    teacher = None
    if opts.teacher:
        teacher = open_teacher(Path(opts.teacher), device, world.local_size)
    tokenizer = load_tokenizer(out / TOKENIZER) if resume else choose_tokenizer(opts, teacher)
    if "config" in progress_state:
        cfg = ModelConfig.from_dict(progress_state["config"], source=str(out / STATE_JSON))
    else:
        cfg = student_config(opts, teacher, tokenizer)
    block_size = opts.block_size or min(cfg.max_len, teacher.max_len if teacher else cfg.max_len)
    if block_size > cfg.max_len:
        raise EdgeGPTError(f"--block-size {block_size} exceeds the model's context of {cfg.max_len} tokens")
    if teacher is not None and block_size > teacher.max_len:
        raise EdgeGPTError(f"--block-size {block_size} exceeds the teacher's context of {teacher.max_len} tokens")
    if teacher is not None:
        teacher.load(device, log=reporter.log)  # every check that can refuse it has passed

    if not world.is_main:
        distributed.barrier(world)  # rank 0 trains the tokenizer and fills the token cache, once
    tokens = load_data(data, val_data, cfg.vocab_size, cache_dir, tokenizer, reporter)
    if world.is_main:
        distributed.barrier(world)
    if resume and progress_state.get("data_key") != tokens.key:
        raise EdgeGPTError("cannot resume: the training data differs from the run being resumed; pass the same --data")
    if len(tokens.train) < block_size + 2:
        raise EdgeGPTError(
            f"the training split has only {len(tokens.train)} tokens, fewer than one window of {block_size + 1}; "
            "add data or lower --block-size"
        )
    if len(tokens.val) < 2:
        raise EdgeGPTError("the validation split is empty after tokenization; add data or pass --val-data")
    char_table = char_starts_table(tokens.tokenizer, cfg.vocab_size)

    torch.manual_seed(opts.seed)
    model = GPT(cfg, dropout=opts.dropout).to(device)
    if teacher is not None and opts.init_from_teacher and not resume:
        reporter.log(f"initialising the student from the teacher's layers {init_from_teacher(model, teacher)}")
    optimizer = make_optimizer(model, opts, device)
    step, elapsed_before = 0, 0.0
    best_val = {"loss": math.inf, "nats_per_char": math.inf}
    if resume:
        load_train_state(out, model, optimizer)
        step, elapsed_before = progress_state["step"], progress_state["elapsed_s"]
        best_val = progress_state["best_val"]
    if world.is_main:  # config and tokenizer first: a resume needs them even before the first best weights
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # a write a crash interrupted (edgegpt.core.io.atomic_path)
            stale.unlink(missing_ok=True)
        cfg.save(out / CONFIG)
        write_bytes_atomic(out / TOKENIZER, tokens.tokenizer.to_str().encode())
    forward: torch.nn.Module = model
    no_sync = None  # DDP's "accumulate locally" context for all but the last micro-batch
    if world.distributed:
        forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        no_sync = forward.no_sync
    if opts.compile:
        forward = torch.compile(forward)

    def save_state(stopped: str) -> None:
        if world.is_main:
            save_train_state(out, model, optimizer, {
                "step": step, "elapsed_s": elapsed_before + (time.perf_counter() - t0), "best_val": best_val,
                "options": dataclasses.asdict(opts), "config": cfg.to_dict(),
                "data": [str(Path(p).resolve()) for p in data], "val_data": [str(Path(p).resolve()) for p in val_data],
                "data_key": tokens.key, "stopped": stopped,
            })

    def save_best() -> None:
        save_weights(out / WEIGHTS, model)  # a checkpoint is complete once its weights exist

    def evaluate() -> None:
        if world.is_main:
            _evaluate(model, tokens, char_table, block_size, opts, device, step, best_val, reporter, save_best)

    budget_s = opts.time_budget * 60 if opts.time_budget else None
    rows_per_rank = opts.batch_size * opts.grad_accum
    tokens_per_step = rows_per_rank * world.size * block_size
    reporter.start(opts.max_steps, budget_s, {
        "parameters": model.num_parameters(), "device": str(device), "train_tokens": len(tokens.train),
        "val_tokens": len(tokens.val), "tokens_per_step": tokens_per_step, "resumed_at": step,
        "processes": world.size, "teacher": f"{teacher.path} ({teacher.parameters / 1e6:.1f}M parameters, "
        f"alpha {opts.alpha}, temperature {opts.temperature})" if teacher else None,
    })
    t0 = time.perf_counter()
    last_loss, stopped = math.nan, "max_steps"
    model.train()
    try:
        while True:
            elapsed = elapsed_before + time.perf_counter() - t0
            if opts.max_steps is not None and step >= opts.max_steps:
                stopped = "max_steps"
                break
            if distributed.any_rank(world, budget_s is not None and elapsed >= budget_s, device):
                stopped = "time_budget"
                break
            progress = max(step / opts.max_steps if opts.max_steps else 0.0, elapsed / budget_s if budget_s else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(progress, opts)
            # Dropout masks depend on (seed, step, rank) only; rank 0's are a single process's.
            torch.manual_seed(opts.seed * 1_000_003 + step + world.rank * (1 << 40))
            batch = sample_batch(tokens.train, rows_per_rank * world.size, block_size, opts.seed, step)
            batch = distributed.rank_rows(torch.from_numpy(batch), world).to(device)
            losses = distributed.mean(world, _train_step(forward, teacher, batch, opts, device, no_sync), device)
            loss = losses.pop("loss")
            if not math.isfinite(loss):
                raise EdgeGPTError(
                    f"the loss became {loss} at step {step + 1}; the last good checkpoint in {out} is kept. "
                    "Lower --lr or check the data"
                )
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss
            run_s = time.perf_counter() - t0
            reporter.step(step, loss, tokens_per_step * (step - progress_state.get("step", 0)) / max(run_s, 1e-9),
                          max(step / opts.max_steps if opts.max_steps else 0.0,
                              (elapsed_before + run_s) / budget_s if budget_s else 0.0), losses)
            if step % opts.eval_every == 0:
                evaluate()
            if step % opts.save_every == 0:
                save_state("running")
            if on_step:
                on_step(step)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        reporter.stop()
    if world.is_main and (step % opts.eval_every or not (out / WEIGHTS).exists()):
        evaluate()
    save_state(stopped)
    distributed.barrier(world)  # no rank leaves (and tears down the group) while rank 0 still writes
    run_s = time.perf_counter() - t0
    trained_steps = step - progress_state.get("step", 0)
    return TrainSummary(
        steps=step, tokens=step * tokens_per_step, train_loss=last_loss, val_loss=best_val["loss"],
        val_nats_per_char=best_val["nats_per_char"], tokens_per_s=trained_steps * tokens_per_step / max(run_s, 1e-9),
        checkpoint=str(out), elapsed_s=elapsed_before + run_s, stopped=stopped,
        parameters=model.num_parameters(), device=str(device), processes=world.size,
        teacher=str(teacher.path) if teacher else None,
    )


def _train_step(forward: torch.nn.Module, teacher: Teacher | None, batch: torch.Tensor, opts: TrainOptions,
                device: torch.device, no_sync: Callable[[], contextlib.AbstractContextManager] | None) -> dict[str, float]:
    """Forward and backward over this rank's rows in --grad-accum micro-batches; returns the mean losses.
    Gradients are averaged across ranks once, on the last micro-batch."""
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    chunks = batch.chunk(opts.grad_accum)
    for i, micro in enumerate(chunks):
        inputs, labels = micro[:, :-1], micro[:, 1:]
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward(inputs)
            teacher_logits = teacher.logits(inputs) if teacher is not None else None
            loss = distillation_loss(logits, teacher_logits, labels, opts.alpha, opts.temperature)
            (loss.total / len(chunks)).backward()
        for key, value in zip(("loss", "ce", "kd"), loss):
            sums[key] += value.item() / len(chunks)
    if teacher is None:
        del sums["kd"], sums["ce"]
    return sums


def _evaluate(model, tokens, char_table, block_size, opts, device, step, best_val, reporter, save_best) -> None:
    result = evaluate_sample(model, tokens.val, char_table, block_size, opts.eval_windows, device)
    is_best = result.nats_per_token < best_val["loss"]
    if is_best:
        best_val.update(loss=result.nats_per_token, nats_per_char=result.nats_per_char, step=step)
        save_best()
    reporter.evaluated(step, result, is_best)
