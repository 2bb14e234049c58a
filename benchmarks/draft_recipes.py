"""How well drafts agree with their target: which distillation recipe makes the better draft.

    edgegpt train --preset small --vocab-size 1024 --block-size 256 --data tinyshakespeare.txt --out TARGET
    edgegpt train --teacher TARGET --preset nano --data tinyshakespeare.txt --time-budget 8 --out DEFAULT
    edgegpt train --teacher TARGET --preset nano --as-draft --data tinyshakespeare.txt --time-budget 8 --out DRAFT
    python benchmarks/draft_recipes.py --target TARGET --drafts DEFAULT DRAFT [--tokens 8192]

Speculative decoding keeps a drafted token with probability sum(min(p, q)) over the vocabulary, p the
target's distribution and q the draft's (greedy: when their argmaxes agree), so a draft is as good as those
two numbers are high, whatever its perplexity. Both are measured teacher-forced, in PyTorch, on the first
--tokens tokens of the tinyshakespeare validation split (its last 10% of characters), in windows of the
draft's context: argmax agreement, and sum(min(p, q)) at temperatures 0.8 and 1. Beside them: each draft's
validation loss (nats per character), steps and minutes from its `train_state.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import SHAKESPEARE, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True, help="the target's checkpoint")
    parser.add_argument("--drafts", type=Path, nargs="+", required=True, help="draft checkpoints")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from edgegpt.checkpoint import load_checkpoint

    target, tokenizer = load_checkpoint(args.target)
    text = SHAKESPEARE.read_text()
    ids = tokenizer.encode(text[int(len(text) * 0.9):]).ids
    rows = []
    for path in args.drafts:
        draft, draft_tokenizer = load_checkpoint(path)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            parser.error(f"{path} has another tokenizer than the target")
        window = min(draft.cfg.max_len, target.cfg.max_len)
        usable = min(args.tokens, len(ids)) // window * window
        batch = torch.tensor(ids[:usable]).view(-1, window)
        with torch.no_grad():
            p_logits, q_logits = target.eval()(batch).float(), draft.eval()(batch).float()
        row = {"draft": str(path), "parameters": sum(t.numel() for t in draft.parameters()),
               "argmax_agreement": (p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()}
        for temperature in (0.8, 1.0):
            p, q = (torch.softmax(logits / temperature, -1) for logits in (p_logits, q_logits))
            row[f"kept_at_T{temperature:g}"] = torch.minimum(p, q).sum(-1).mean().item()
        state = path / "train_state.json"
        if state.exists():
            saved = json.loads(state.read_text())
            options = saved["options"]
            row.update(steps=saved["step"], minutes=round(saved["elapsed_s"] / 60, 1),
                       val_per_char=saved["best_val"]["nats_per_char"],
                       recipe="as draft (alpha 0, T 1)" if options.get("as_draft") else
                       f"alpha {options['alpha']}, T {options['temperature']:g}")
        rows.append(row)

    print(f"{machine()}; target {args.target}; {usable:,} held-out tokens, teacher-forced")
    print(f"{'draft':40} {'recipe':26} {'steps':>6} {'min':>5} {'val/char':>8} {'argmax':>7} {'T0.8':>6} {'T1':>6}")
    for row in rows:
        print(f"{row['draft'][-40:]:40} {row.get('recipe', '?'):26} {row.get('steps', '?'):>6} "
              f"{row.get('minutes', '?'):>5} {row.get('val_per_char', float('nan')):8.3f} "
              f"{row['argmax_agreement']:7.3f} "
              f"{row['kept_at_T0.8']:6.3f} {row['kept_at_T1']:6.3f}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
