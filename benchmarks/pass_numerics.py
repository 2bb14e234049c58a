"""Does a pass of K tokens give the logits a one-token pass gives? Speculative decoding verifies K guesses in
one pass, so its greedy text equals plain decoding's only where they agree (runtime/speculative.py).

    python benchmarks/pass_numerics.py --model PACKAGE --text pydoc-topics.txt [--k 4]

At every 10th position of the text's first 300 tokens: the cache holds the text before it, then the
position's token is run alone, and again as the first of K tokens; prints the median and largest
|Δ logit| between the two, and how often their argmax differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import machine
from edgegpt.runtime import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    generator = Generator.load(args.model, provider="cpu", draft=None)
    ids = generator.package.tokenizer.encode(args.text.read_text(encoding="utf-8")[:20_000]).ids[:300]
    differences, flips = [], 0
    for position in range(40, len(ids) - args.k, 10):
        _, cache = generator.forward(ids[:position], generator.empty_cache())
        alone, _ = generator.forward([ids[position]], cache)
        _, cache = generator.forward(ids[:position], generator.empty_cache())
        first_of_k, _ = generator.forward(ids[position : position + args.k], cache)
        differences.append(float(np.abs(alone[0] - first_of_k[0]).max()))
        flips += int(np.argmax(alone[0]) != np.argmax(first_of_k[0]))
    print(f"{machine()}; {args.model}; 1-token vs {args.k}-token pass at {len(differences)} positions: "
          f"|Δ logit| median {np.median(differences):.3g}, largest {max(differences):.3g}; argmax differs at {flips}")


if __name__ == "__main__":
    main()
