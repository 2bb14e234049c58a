"""The target's own continuations of its training text, as extra data for a draft (on-policy distillation).

    python benchmarks/target_continuations.py --model TARGET_PACKAGE --data tinyshakespeare.txt \\
        --out continuations.txt [--tokens 200000] [--greedy-share 0.5]
    edgegpt train --teacher TARGET --as-draft --preset nano --data tinyshakespeare.txt continuations.txt ...

A draft distilled on the corpus learns the target where the corpus goes; at generation time the text is
the target's own, and there the two may part more often (on the tinyshakespeare `small` target, greedy
continuations keep ~59% of a `nano` draft's guesses, against 80% argmax agreement on held-out text). This
writes continuations of windows of the training split (its first 90% of characters): --prompt-tokens of
text, then --new-tokens from the target, greedy for --greedy-share of them and sampled at temperature 1
for the rest (seeded), one continuation per paragraph, until --tokens new tokens are written.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the target's model package")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--greedy-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edgegpt.runtime import Generator

    generator = Generator.load(args.model, provider="cpu", draft=None)
    text = args.data.read_text(encoding="utf-8")
    ids = generator.package.tokenizer.encode(text[: int(len(text) * 0.9)]).ids
    rng = random.Random(args.seed)
    written, pieces, t0 = 0, [], time.perf_counter()
    while written < args.tokens:
        start = rng.randrange(len(ids) - args.prompt_tokens)
        greedy = rng.random() < args.greedy_share
        stream = generator.stream_tokens(ids[start : start + args.prompt_tokens], max_new_tokens=args.new_tokens,
                                         stop_at_eos=False, temperature=0.0 if greedy else 1.0,
                                         seed=rng.randrange(1 << 30), top_k=0, top_p=1.0, min_p=0.0,
                                         repetition_penalty=1.0)
        new = list(stream)
        pieces.append(generator.package.tokenizer.decode(ids[start : start + args.prompt_tokens] + new))
        written += len(new)
        if len(pieces) % 200 == 0:
            print(f"{written:,} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.write_text("\n\n".join(pieces) + "\n", encoding="utf-8")
    print(f"{machine()}; {len(pieces)} continuations, {written:,} new tokens in {time.perf_counter() - t0:.0f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
