"""Does distillation help? A `small` teacher trained on tinyshakespeare, then two `micro` students with
the same steps, data, tokenizer and seed: one from scratch, one distilled from the teacher.

    python benchmarks/distill_shakespeare.py [--teacher-steps 1200] [--steps 400] [--work DIR]

Split and metric as benchmarks/train_shakespeare.py: first 90% of the characters train, last 10%
validate; nats per character over the whole validation split, every model scored with the students'
context (256 tokens) so that context length is not what is compared. All three share the teacher's
1024-token tokenizer. The figure that matters is the share of the teacher–student gap that
distillation closed: (scratch − distilled) / (scratch − teacher).

--work keeps the teacher, so a rerun with other student settings skips its training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import SHAKESPEARE, machine, print_figures
from edgegpt.checkpoint import WEIGHTS, load_checkpoint
from edgegpt.cli.console import TrainProgress, stderr
from edgegpt.scoring import char_starts_table
from edgegpt.train.corpus import read_corpus, split_documents
from edgegpt.train.data import tokenize
from edgegpt.train.loop import train
from edgegpt.train.options import TrainOptions
from edgegpt.train.validation import evaluate_split

STUDENT_CONTEXT = 256


def score(checkpoint: Path, data: Path) -> float:
    """Validation nats/char over the whole split, in windows of the students' context."""
    model, tokenizer = load_checkpoint(checkpoint)
    _, val_docs = split_documents(read_corpus([data]))
    tokens = tokenize(tokenizer, val_docs)
    result = evaluate_split(model, tokens, char_starts_table(tokenizer, model.cfg.vocab_size), STUDENT_CONTEXT,
                            torch.device("cpu"))
    assert result.chars == sum(map(len, val_docs))  # every character scored exactly once
    return result.nats_per_char


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"benchmark skipped: {args.data} is not here (it lives in the shared data folder)")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgegpt-distill-"))
    cache = work / "cache"

    teacher = work / "teacher"
    if not (teacher / WEIGHTS).is_file():
        stderr.print(f"teacher: {args.teacher_preset}, {args.teacher_steps} steps")
        train([args.data], [], teacher, TrainOptions(
            preset=args.teacher_preset, vocab_size=args.vocab_size, block_size=STUDENT_CONTEXT,
            max_steps=args.teacher_steps, seed=args.seed, device="cpu"), cache_dir=cache, reporter=TrainProgress())
    student = dict(preset=args.student_preset, max_steps=args.steps, seed=args.seed, device="cpu",
                   block_size=STUDENT_CONTEXT)
    stderr.print(f"scratch student: {args.student_preset}, {args.steps} steps")
    scratch = train([args.data], [], work / "scratch", TrainOptions(
        **student, tokenizer=str(teacher / "tokenizer.json")), cache_dir=cache, reporter=TrainProgress())
    stderr.print(f"distilled student: alpha {args.alpha}, temperature {args.temperature}")
    distilled = train([args.data], [], work / "distilled", TrainOptions(
        **student, teacher=str(teacher), alpha=args.alpha, temperature=args.temperature),
        cache_dir=cache, reporter=TrainProgress())

    nats = {name: score(work / name, args.data) for name in ("teacher", "scratch", "distilled")}
    gap = nats["scratch"] - nats["teacher"]
    gap_closed = (nats["scratch"] - nats["distilled"]) / gap if gap > 0 else float("nan")  # nan: no gap to close
    figures = {
        "machine": machine(), "threads": args.threads, "teacher": f"{args.teacher_preset}, {args.teacher_steps} steps",
        "students": f"{args.student_preset}, {args.steps} steps, seed {args.seed}",
        "alpha": args.alpha, "temperature": args.temperature,
        "teacher_nats_per_char": round(nats["teacher"], 4), "scratch_nats_per_char": round(nats["scratch"], 4),
        "distilled_nats_per_char": round(nats["distilled"], 4), "gap_closed": round(gap_closed, 3),
        "scratch_tokens_per_s": round(scratch.tokens_per_s), "distilled_tokens_per_s": round(distilled.tokens_per_s),
        "work": str(work),
    }
    print_figures("distillation on tinyshakespeare, whole validation split", figures, args.json)


if __name__ == "__main__":
    main()
