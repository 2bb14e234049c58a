"""Training quality on tinyshakespeare: how low a model trained here gets on the held-out split, and how much of
a teacher's lead distillation hands a student.

    python benchmarks/training.py shakespeare [--minutes 10] [--threads 2] [--preset micro]
    python benchmarks/training.py distill [--teacher-steps 1200] [--steps 400] [--work DIR]
    python benchmarks/training.py teacher-speed --teacher CHECKPOINT [--block-size 512] [--threads 2]
    python benchmarks/training.py COMMAND --smoke        # seconds, a tiny model, a slice of the text

Split: the first 90% of the characters train, the last 10% are held out (common.shakespeare_split, DESIGN.md).
The figure is nats per character over the whole held-out split, in windows with a stride of half a window
(every token scored once, each with at least half a window of history). teacher-speed measures how fast each kind
of teacher hands a distillation step its targets, as ratios measured side by side. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
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
    smoke_kit,
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


# -- teacher-speed ----------------------------------------------------------------------------------------------


def teacher_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the teacher: an edgegpt checkpoint (`edgegpt convert` makes one of a Hugging Face model)")
    parser.add_argument("--fp32-package", type=Path, default=None, help="its float32 package (default: exported)")
    parser.add_argument("--int8-package", type=Path, default=None, help="its int8 package (default: exported)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="text whose training split fills the windows")
    parser.add_argument("--windows", type=int, default=16, help="windows per timed pass")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per window (default: min(context, 512))")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per call, as a training step's rows")
    parser.add_argument("--top-k", type=int, default=None, help="the packages' k (default: training's)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="exported packages and the cache (default: temporary)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def teacher_speed(args: argparse.Namespace) -> None:
    """How much faster a package teacher gives distillation its targets than a PyTorch teacher, on the CPU.

    One teacher checkpoint and its float32 and int8 packages, over the same --windows windows of the text, --batch-
    size windows per call as a training step asks: the checkpoint in PyTorch (full logits: what a checkpoint teacher
    costs a step), each package through the runtime reduced to its top k as training stores them, and a cached
    epoch (the same top k read back from the on-disk cache the float32 package filled). Each of --runs rounds times
    every teacher once, in turn, so a noisy moment hits all of them; the median is reported, as teacher tokens per
    second and as a ratio to PyTorch's. top-1: how often each one's most likely next token is PyTorch's. Loading is
    not timed, and each teacher runs one untimed call first."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from edgegpt.export.package import export_package
    from edgegpt.train.data import tokenize
    from edgegpt.train.distill import Teaching, open_teacher, open_top_k_cache
    from edgegpt.train.options import DEFAULT_TEACHER_TOP_K

    torch.set_num_threads(args.threads)  # the packages' sessions take the same count (Teacher.load)
    work = args.work or scratch_dir("teacher-speed")
    work.mkdir(parents=True, exist_ok=True)
    int8 = args.int8_package
    if args.smoke:
        kit = smoke_kit(args.kit, work)
        checkpoint, int8, data = kit.checkpoint, int8 or kit.package, kit.text
        args.windows, args.batch_size, args.runs, args.block_size = 4, 2, 1, args.block_size or 32
    elif args.teacher is None:
        raise SystemExit("teacher-speed needs --teacher CHECKPOINT (an edgegpt checkpoint)")
    else:
        checkpoint, data = args.teacher, args.data
    fp32 = args.fp32_package or work / "teacher-fp32"
    int8 = int8 or work / "teacher-int8"
    for package, quantize in ((fp32, False), (int8, True)):
        if not (package / "model.onnx").is_file():
            print(f"exporting {package}", flush=True)
            export_package(checkpoint, package, quantize=quantize, gate=False)

    cpu = torch.device("cpu")
    torch_teacher = open_teacher(checkpoint, cpu).load(cpu)
    block = args.block_size or min(torch_teacher.max_len, 512)
    k = args.top_k or min(DEFAULT_TEACHER_TOP_K, torch_teacher.vocab_size)
    train_text, _ = shakespeare_split(data, smoke=args.smoke)
    tokens = tokenize(torch_teacher.tokenizer, [train_text])[: args.windows * block]
    if len(tokens) < args.windows * block:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than {args.windows} windows of {block}")
    inputs = torch.from_numpy(tokens.astype("int64")).view(args.windows, block)
    windows = torch.arange(args.windows)
    calls = [slice(i, i + args.batch_size) for i in range(0, args.windows, args.batch_size)]

    def torch_targets(rows: slice) -> torch.Tensor:
        return torch_teacher.logits(inputs[rows]).argmax(-1)

    def package_targets(teaching: Teaching):
        return lambda rows: teaching.targets(inputs[rows], windows[rows]).ids[..., 0]

    packages = {name: Teaching(open_teacher(path, cpu).load(cpu), k) for name, path in
                (("package fp32", fp32), ("package int8", int8))}
    cached = Teaching(packages["package fp32"].teacher, k)
    text_key = hashlib.sha256(inputs.numpy().tobytes()).hexdigest()[:16]  # --work may be reused with other text
    cached.cache = open_top_k_cache(cached.teacher, work / "teacher-cache", text_key, args.windows, block, k)
    for rows in calls:  # fills the cache (untimed)
        cached.targets(inputs[rows], windows[rows])
    cached.computed = cached.cached = 0
    teachers = {"PyTorch (full logits)": torch_targets,
                **{f"{name} (top {k})": package_targets(teaching) for name, teaching in packages.items()},
                f"cached epoch (top {k} read)": package_targets(cached)}

    seconds: dict[str, list[float]] = {name: [] for name in teachers}
    top1: dict[str, torch.Tensor] = {}
    for name, targets in teachers.items():
        targets(calls[0])  # warm: the first call of a session or a thread pool is slower
    for _ in range(args.runs):
        for name, targets in teachers.items():
            start = time.perf_counter()
            top1[name] = torch.cat([targets(rows) for rows in calls])
            seconds[name].append(time.perf_counter() - start)
    if cached.computed:
        raise SystemExit(f"the cached epoch ran the teacher on {cached.computed} windows")

    reference = next(iter(teachers))
    rates = {name: args.windows * block / statistics.median(s) for name, s in seconds.items()}
    caption = (f"{machine()}, {args.threads} threads; {args.windows} windows of {block} tokens, {args.batch_size} per "
               f"call; median of {args.runs} interleaved rounds")
    table = Table(title=f"teacher speed: {checkpoint}", caption=caption)
    for column in ("teacher", "tokens/s", "× PyTorch", "top-1 = PyTorch"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    figures = {"machine": machine(), "threads": args.threads, "teacher": str(checkpoint), "windows": args.windows,
               "block_size": block, "batch_size": args.batch_size, "k": k, "runs": args.runs, "teachers": {}}
    for name, rate in rates.items():
        agreement = float((top1[name] == top1[reference]).float().mean())
        table.add_row(name, f"{rate:,.0f}", f"{rate / rates[reference]:.2f}", f"{agreement:.1%}")
        figures["teachers"][name] = {"tokens_per_s": round(rate), "ratio": round(rate / rates[reference], 3),
                                     "top1_agreement": round(agreement, 4)}
    Console(width=max(Console().width, 120)).print(table)  # a log file would wrap it at 80 columns
    if args.json:
        print(json.dumps(figures))


COMMANDS = {"shakespeare": (shakespeare_options, shakespeare), "distill": (distill_options, distill),
            "teacher-speed": (teacher_speed_options, teacher_speed)}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
