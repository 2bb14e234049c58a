"""What the passes of speculative decoding cost: the numbers behind runtime/speculative.py's cost model.

    python benchmarks/speculative_costs.py --model PACKAGE_WITH_DRAFT [--draft DRAFT] [--runs 3]

Generates greedily with the package's draft (or --draft) from windows of the tinyshakespeare validation
split, timing every forward pass as it happens inside the speculative loop: the target's by the number of
tokens it runs, the draft's likewise (its steps of one token are its guesses, of two its catch-up after a
pass whose guesses all held). Prints the median milliseconds of each, and each target length's cost in
one-token passes beside the model's pass_cost(k) and the draft's one-token step against DRAFT_GUESS_COST.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

from common import SHAKESPEARE, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--draft", type=Path, help="a draft package (default: the model package's own)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from edgegpt.runtime import Generator, speculative

    generator = Generator.load(args.model, provider="cpu", threads=args.threads, draft=args.draft or "auto")
    if generator.draft is None:
        parser.error(f"{args.model} has no draft: pass --draft")
    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)

    def timed(model, name: str):
        forward = model.forward

        def run(ids, cache):
            start = time.perf_counter()
            result = forward(ids, cache)
            times[(name, len(ids))].append(time.perf_counter() - start)
            return result
        model.forward = run

    timed(generator, "target")
    timed(generator.draft, "draft")
    text = SHAKESPEARE.read_text()
    ids = generator.package.tokenizer.encode(text[int(len(text) * 0.9):]).ids
    step = (len(ids) - 64) // args.prompts
    for _ in range(args.runs):
        for i in range(args.prompts):
            stream = generator.stream_tokens(ids[i * step: i * step + 64], max_new_tokens=args.new_tokens,
                                             stop_at_eos=False, temperature=0)
            list(stream)
    one = statistics.median(times[("target", 1)]) if times[("target", 1)] else None
    print(f"{machine()}; {args.model}, {args.threads} threads; passes inside greedy speculative runs "
          f"(the prompt's prefill left out)")
    for (name, length), seconds in sorted(times.items()):
        if length > 16 or len(seconds) < 10:
            continue  # prompts' prefills, rare lengths
        median = statistics.median(seconds)
        line = f"{name:6} {length} tokens: {1000 * median:.3f} ms median of {len(seconds)}"
        if one is not None:
            model = speculative.pass_cost(length - 1) if name == "target" else speculative.DRAFT_GUESS_COST
            line += f"; {median / one:.2f} one-token target passes (model: {model:.2f})"
        print(line)


if __name__ == "__main__":
    main()
