"""Training: AdamW with warmup and cosine decay, periodic validation, best-weights checkpoint, resume.

The checkpoint directory always holds the weights with the best validation loss (what export reads)
and the latest state for resuming. Batches and dropout are drawn from (seed, step) alone, so a
resumed run is the run that was interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from edgegpt.checkpoint import CONFIG, TOKENIZER, save_weights, WEIGHTS
from edgegpt.config import ModelConfig, preset
from edgegpt.corpus import default_corpus, read_corpus, split_documents
from edgegpt.data import TokenData, char_starts_table, prepare_data, sample_batch
from edgegpt.errors import EdgeGPTError
from edgegpt.evaluate import EvalResult, evaluate_sample
from edgegpt.io import write_bytes_atomic
from edgegpt.model import GPT
from edgegpt.tokenizer import load_tokenizer
from edgegpt.train_state import load_train_state, read_progress, save_train_state


# With neither --max-steps nor --time-budget: long enough for `micro` to reach its best on a laptop.
DEFAULT_TIME_BUDGET_MIN = 10.0


@dataclass
class TrainOptions:
    """Defaults measured on 2 CPU cores with `micro` on tinyshakespeare (see the README)."""

    preset: str = "micro"
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

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "eval_every", "eval_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise EdgeGPTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reporter:
    """What training tells the user; the CLI draws a progress bar, tests stay silent."""

    def start(self, total_steps: int | None, budget_s: float | None, info: dict[str, Any]) -> None: ...
    def step(self, step: int, loss: float, tokens_per_s: float, progress: float) -> None: ...
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


def load_data(data: list[Path], val_data: list[Path], vocab_size: int, cache_dir: Path, tokenizer_path: Path | None,
              reporter: Reporter) -> TokenData:
    documents = read_corpus(data) if data else default_corpus()
    if val_data:
        train_docs, val_docs = documents, read_corpus(val_data)
    else:
        train_docs, val_docs = split_documents(documents)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    return prepare_data(train_docs, val_docs, vocab_size, cache_dir, tokenizer=tokenizer, log=reporter.log)


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
    """Train (or resume) into `out`. Ctrl-C and a spent time budget both end with a saved checkpoint."""
    reporter = reporter or Reporter()
    out = Path(out)
    progress_state: dict[str, Any] = {}
    if resume:
        progress_state = read_progress(out)
        saved = progress_state["options"]
        # The run's identity (model, data, schedule shape) comes from the state; only the stopping
        # rule may be extended on resume.
        opts = TrainOptions(**{**saved, "max_steps": opts.max_steps or saved["max_steps"],
                               "time_budget": opts.time_budget or saved["time_budget"], "device": opts.device})
        data = data or [Path(p) for p in progress_state["data"]]
        val_data = val_data or [Path(p) for p in progress_state["val_data"]]
    if opts.max_steps is None and opts.time_budget is None:
        opts = dataclasses.replace(opts, time_budget=DEFAULT_TIME_BUDGET_MIN)
    opts.validate()
    cfg: ModelConfig = preset(opts.preset, vocab_size=opts.vocab_size)
    block_size = opts.block_size or cfg.max_len
    if block_size > cfg.max_len:
        raise EdgeGPTError(f"--block-size {block_size} exceeds the model's context of {cfg.max_len} tokens")
    device = pick_device(opts.device)

    tokens = load_data(data, val_data, cfg.vocab_size, cache_dir, out / TOKENIZER if resume else None, reporter)
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
    optimizer = make_optimizer(model, opts, device)
    step, elapsed_before = 0, 0.0
    best_val = {"loss": math.inf, "nats_per_char": math.inf}
    if resume:
        load_train_state(out, model, optimizer)
        step, elapsed_before = progress_state["step"], progress_state["elapsed_s"]
        best_val = progress_state["best_val"]
    forward = torch.compile(model) if opts.compile else model

    def save_state(stopped: str) -> None:
        save_train_state(out, model, optimizer, {
            "step": step, "elapsed_s": elapsed_before + (time.perf_counter() - t0), "best_val": best_val,
            "options": dataclasses.asdict(opts), "data": [str(Path(p).resolve()) for p in data], "val_data": [str(Path(p).resolve()) for p in val_data],
            "data_key": tokens.key, "stopped": stopped,
        })

    def save_best() -> None:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG)
        write_bytes_atomic(out / TOKENIZER, tokens.tokenizer.to_str().encode())
        save_weights(out / WEIGHTS, model)  # last: a checkpoint is complete once its weights exist

    budget_s = opts.time_budget * 60 if opts.time_budget else None
    tokens_per_step = opts.batch_size * opts.grad_accum * block_size
    reporter.start(opts.max_steps, budget_s, {
        "parameters": model.num_parameters(), "device": str(device), "train_tokens": len(tokens.train),
        "val_tokens": len(tokens.val), "tokens_per_step": tokens_per_step, "resumed_at": step,
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
            if budget_s is not None and elapsed >= budget_s:
                stopped = "time_budget"
                break
            progress = max(step / opts.max_steps if opts.max_steps else 0.0, elapsed / budget_s if budget_s else 0.0)
            lr = learning_rate(progress, opts)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(opts.seed * 1_000_003 + step)  # dropout masks depend on (seed, step) only
            batch = torch.from_numpy(sample_batch(tokens.train, opts.batch_size * opts.grad_accum, block_size,
                                                  opts.seed, step)).to(device)
            loss_sum = 0.0
            for micro in batch.chunk(opts.grad_accum):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = forward(micro[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten()) / opts.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise EdgeGPTError(
                    f"the loss became {loss_sum} at step {step + 1}; the last good checkpoint in {out} is kept. "
                    "Lower --lr or check the data"
                )
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_sum
            run_s = time.perf_counter() - t0
            reporter.step(step, loss_sum, tokens_per_step * (step - progress_state.get("step", 0)) / max(run_s, 1e-9),
                          max(step / opts.max_steps if opts.max_steps else 0.0,
                              (elapsed_before + run_s) / budget_s if budget_s else 0.0))
            if step % opts.eval_every == 0:
                _evaluate(model, tokens, char_table, block_size, opts, device, step, best_val, reporter, save_best)
                save_state("running")
            if on_step:
                on_step(step)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        reporter.stop()
    if step % opts.eval_every or not (out / WEIGHTS).exists():
        _evaluate(model, tokens, char_table, block_size, opts, device, step, best_val, reporter, save_best)
    save_state(stopped)
    run_s = time.perf_counter() - t0
    trained_steps = step - progress_state.get("step", 0)
    return TrainSummary(
        steps=step, tokens=step * tokens_per_step, train_loss=last_loss, val_loss=best_val["loss"],
        val_nats_per_char=best_val["nats_per_char"], tokens_per_s=trained_steps * tokens_per_step / max(run_s, 1e-9),
        checkpoint=str(out), elapsed_s=elapsed_before + run_s, stopped=stopped,
        parameters=model.num_parameters(), device=str(device),
    )


def _evaluate(model, tokens, char_table, block_size, opts, device, step, best_val, reporter, save_best) -> None:
    result = evaluate_sample(model, tokens.val, char_table, block_size, opts.eval_windows, device)
    is_best = result.nats_per_token < best_val["loss"]
    if is_best:
        best_val.update(loss=result.nats_per_token, nats_per_char=result.nats_per_char, step=step)
        save_best()
    reporter.evaluated(step, result, is_best)
