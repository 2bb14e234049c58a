"""Training quality on tinyshakespeare: how low a model trained here gets on the held-out split, and how much of
a teacher's lead distillation hands a student.

    python benchmarks/training.py shakespeare [--minutes 10] [--threads 2] [--preset micro]
    python benchmarks/training.py distill [--teacher-steps 1200] [--steps 400] [--work DIR]
    python benchmarks/training.py COMMAND --smoke        # seconds, a tiny model, a slice of the text

Split: the first 90% of the characters train, the last 10% are held out (common.shakespeare_split, DESIGN.md).
The figure is nats per character over the whole held-out split, in windows with a stride of half a window
(every token scored once, each with at least half a window of history). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    SHAKESPEARE,
    SMOKE_PRESET,
    data_file,
    machine,
    print_figures,
    scratch_dir,
    shakespeare_split,
    subcommands,
)

# --smoke: one layer of the smoke preset, tiny batches, a short validation
SMOKE_TRAINING = dict(layers=1, batch_size=2, block_size=64, eval_every=2, eval_windows=4)
# distill: every model is scored with the students' context, so that context length is not what is compared.
STUDENT_CONTEXT = 256


def held_out_score(checkpoint: Path, data: Path, window: int | None, smoke: bool):
    """(model, Score) of the checkpoint over the whole held-out split of `data`, in windows of `window` tokens
    (default: the model's context)."""
    import torch

    from edgegpt.checkpoint import load_checkpoint
    from edgegpt.scoring import char_starts_table
    from edgegpt.train.data import tokenize
    from edgegpt.train.validation import evaluate_split

    model, tokenizer = load_checkpoint(checkpoint)
    _, held_out = shakespeare_split(data, smoke=smoke)
    tokens = tokenize(tokenizer, [held_out])
    result = evaluate_split(model, tokens, char_starts_table(tokenizer, model.cfg.vocab_size),
                            window or model.cfg.max_len, torch.device("cpu"))
    if result.chars != len(held_out):  # every character scored exactly once, or the figure means something else
        raise SystemExit(f"scored {result.chars} characters of {len(held_out)}")
    return model, result


# -- shakespeare ------------------------------------------------------------------------------------------------


def shakespeare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=None, help="default: the model's context")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def shakespeare(args: argparse.Namespace) -> None:
    """Train a preset on tinyshakespeare for a fixed time and score the whole held-out split.

    Trains `--preset` on the first 90% for `--minutes` on `--threads` CPU threads (the product's own training
    loop, best-validation weights kept), then scores the last 10% in windows of the model's context."""
    import torch

    from edgegpt.cli.console import TrainProgress
    from edgegpt.train.loop import train
    from edgegpt.train.options import TrainOptions

    torch.set_num_threads(args.threads)
    work = scratch_dir("shakespeare")
    data = data_file(args.data, args.smoke, work)
    out = args.out or work / "checkpoint"
    length = dict(SMOKE_TRAINING, max_steps=2) if args.smoke else dict(
        time_budget=args.minutes, batch_size=args.batch_size, block_size=args.block_size)
    preset = SMOKE_PRESET if args.smoke else args.preset
    opts = TrainOptions(preset=preset, seed=args.seed, device="cpu", lr=args.lr,
                        vocab_size=300 if args.smoke else None, **length)
    summary = train([data], [], out, opts, cache_dir=work / "cache", reporter=TrainProgress())
    t0 = time.perf_counter()
    model, result = held_out_score(out, data, None, args.smoke)
    figures = {
        "machine": machine(), "threads": args.threads, "preset": preset,
        "parameters": summary.parameters, "minutes": args.minutes, "steps": summary.steps,
        "block_size": opts.block_size or model.cfg.max_len, "batch_size": opts.batch_size, "lr": args.lr,
        "train_tokens_per_s": round(summary.tokens_per_s), "val_chars": result.chars,
        "val_nats_per_token": round(result.nats_per_token, 4), "val_nats_per_char": round(result.nats_per_char, 4),
        "eval_s": round(time.perf_counter() - t0, 1), "checkpoint": str(out),
    }
    print_figures("tinyshakespeare, whole validation split", figures, args.json)


# -- distill ----------------------------------------------------------------------------------------------------


def distill_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-preset", default="small")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--student-preset", default="micro")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each student")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHAKESPEARE)
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints here (default: a temporary dir)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def distill(args: argparse.Namespace) -> None:
    """Does distillation help? A teacher trained on tinyshakespeare, then two students with the same steps.

    A `small` teacher, then two `micro` students with the same steps, data, tokenizer (the teacher's
    1,024-token one) and seed: one from scratch_dir, one distilled from the teacher. Every model is scored on the
    whole held-out split with the students' context (256 tokens). The figure that matters is the share of the
    teacher–student gap that distillation closed: (scratch − distilled) / (scratch − teacher).
    --work keeps the teacher, so a rerun with other student settings skips its training."""
    import torch

    from edgegpt.checkpoint import WEIGHTS
    from edgegpt.cli.console import TrainProgress, stderr
    from edgegpt.train.loop import train
    from edgegpt.train.options import TrainOptions

    torch.set_num_threads(args.threads)
    work = args.work or scratch_dir("distill")
    work.mkdir(parents=True, exist_ok=True)
    data = data_file(args.data, args.smoke, work)
    cache = work / "cache"
    if args.smoke:
        args.teacher_preset = args.student_preset = SMOKE_PRESET
        args.teacher_steps, args.steps, args.vocab_size = 2, 2, 300
    context = 64 if args.smoke else STUDENT_CONTEXT
    short = {k: v for k, v in SMOKE_TRAINING.items() if k != "block_size"} if args.smoke else {}

    teacher = work / "teacher"
    if not (teacher / WEIGHTS).is_file():
        stderr.print(f"teacher: {args.teacher_preset}, {args.teacher_steps} steps")
        train([data], [], teacher, TrainOptions(
            preset=args.teacher_preset, vocab_size=args.vocab_size, block_size=context,
            max_steps=args.teacher_steps, seed=args.seed, device="cpu", **short), cache_dir=cache,
            reporter=TrainProgress())
    student = dict(preset=args.student_preset, max_steps=args.steps, seed=args.seed, device="cpu",
                   block_size=context, **short)
    stderr.print(f"scratch student: {args.student_preset}, {args.steps} steps")
    scratch_run = train([data], [], work / "scratch", TrainOptions(
        **student, tokenizer=str(teacher / "tokenizer.json")), cache_dir=cache, reporter=TrainProgress())
    stderr.print(f"distilled student: alpha {args.alpha}, temperature {args.temperature}")
    distilled_run = train([data], [], work / "distilled", TrainOptions(
        **student, teacher=str(teacher), alpha=args.alpha, temperature=args.temperature),
        cache_dir=cache, reporter=TrainProgress())

    nats = {name: held_out_score(work / name, data, context, args.smoke)[1].nats_per_char
            for name in ("teacher", "scratch", "distilled")}
    gap = nats["scratch"] - nats["teacher"]
    gap_closed = (nats["scratch"] - nats["distilled"]) / gap if gap > 0 else float("nan")  # nan: no gap to close
    figures = {
        "machine": machine(), "threads": args.threads, "teacher": f"{args.teacher_preset}, {args.teacher_steps} steps",
        "students": f"{args.student_preset}, {args.steps} steps, seed {args.seed}",
        "alpha": args.alpha, "temperature": args.temperature,
        "teacher_nats_per_char": round(nats["teacher"], 4), "scratch_nats_per_char": round(nats["scratch"], 4),
        "distilled_nats_per_char": round(nats["distilled"], 4), "gap_closed": round(gap_closed, 3),
        "scratch_tokens_per_s": round(scratch_run.tokens_per_s),
        "distilled_tokens_per_s": round(distilled_run.tokens_per_s), "work": str(work),
    }
    print_figures("distillation on tinyshakespeare, whole validation split", figures, args.json)


COMMANDS = {"shakespeare": (shakespeare_options, shakespeare), "distill": (distill_options, distill)}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
