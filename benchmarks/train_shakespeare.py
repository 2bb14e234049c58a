"""Train `micro` on tinyshakespeare for a fixed time and score the whole validation split.

    python benchmarks/train_shakespeare.py [--minutes 10] [--threads 2] [--preset micro]

Split: first 90% of the characters train, last 10% validate. The figure is nats per character over the
whole validation split, in windows of the model's context with a stride of half a context (every
token scored once, each with at least half a context of history).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import SHAKESPEARE, machine, print_figures
from edgegpt.checkpoint import load_checkpoint
from edgegpt.cli.console import TrainProgress
from edgegpt.scoring import char_starts_table
from edgegpt.train.corpus import read_corpus, split_documents
from edgegpt.train.data import tokenize
from edgegpt.train.loop import train
from edgegpt.train.options import TrainOptions
from edgegpt.train.validation import evaluate_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"benchmark skipped: {args.data} is not here (it lives in the shared data folder)")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="edgegpt-shakespeare-")) / "checkpoint"

    opts = TrainOptions(preset=args.preset, time_budget=args.minutes, seed=args.seed, device="cpu",
                        block_size=args.block_size, batch_size=args.batch_size, lr=args.lr)
    summary = train([args.data], [], out, opts, cache_dir=out.parent / "cache", reporter=TrainProgress())

    model, tokenizer = load_checkpoint(out)
    _, val_docs = split_documents(read_corpus([args.data]))
    val_tokens = tokenize(tokenizer, val_docs)
    table = char_starts_table(tokenizer, model.cfg.vocab_size)
    t0 = time.perf_counter()
    result = evaluate_split(model, val_tokens, table, model.cfg.max_len, torch.device("cpu"))
    val_chars = sum(map(len, val_docs))
    assert result.chars == val_chars, (result.chars, val_chars)  # every character scored exactly once

    figures = {
        "machine": machine(), "threads": args.threads, "preset": args.preset,
        "parameters": summary.parameters, "minutes": args.minutes, "steps": summary.steps,
        "block_size": args.block_size or model.cfg.max_len, "batch_size": args.batch_size, "lr": args.lr,
        "train_tokens_per_s": round(summary.tokens_per_s), "val_chars": val_chars,
        "val_nats_per_token": round(result.nats_per_token, 4), "val_nats_per_char": round(result.nats_per_char, 4),
        "eval_s": round(time.perf_counter() - t0, 1), "checkpoint": str(out),
    }
    print_figures("tinyshakespeare, whole validation split", figures, args.json)


if __name__ == "__main__":
    main()
