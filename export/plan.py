"""Mixed precision: which projections get 4 bits, 8 bits or stay float32, chosen from measurements.

    sensitivity   ½ Σ F·(W - Ŵ)² per projection and format, F the diagonal Fisher information of its
                  weights on calibration text (export/calibration.py): the loss a quantization is
                  expected to add (a second-order estimate; its gradient term vanishes at a trained minimum).
    upgrades      every step a projection can take (4 → 8 bits, 8 bits → float32), ordered by the loss it
                  is expected to save per byte it costs.
    plan(k)       the first k upgrades applied to an all-4-bit model.

`search_plan` finds the smallest k whose measured perplexity (the real package on held-out text, through a
callback) stays within a budget, by bisection: perplexity falls as upgrades are added, nearly
monotonically, and each measurement costs a package build and a scoring pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.blockquant import QuantizedMatrix

FLOAT = 0  # a plan entry that keeps the projection in float32


@dataclass(frozen=True)
class Upgrade:
    weight: str
    to_bits: int  # 8 or FLOAT
    saves: float  # expected loss saved (nats per token)
    costs: int  # bytes added


def sensitivities(quantized: dict[tuple[str, int], QuantizedMatrix], weights: dict[str, np.ndarray],
                  fisher: dict[str, np.ndarray]) -> dict[tuple[str, int], float]:
    """½ Σ F·(W - Ŵ)² for each (projection, bits); float32 costs nothing."""
    out = {}
    for (name, bits), matrix in quantized.items():
        delta = matrix.dequantized() - weights[name]
        out[name, bits] = 0.5 * float(np.sum(fisher[name].astype(np.float64) * delta.astype(np.float64) ** 2))
    for name in weights:
        out[name, FLOAT] = 0.0
    return out


def byte_sizes(quantized: dict[tuple[str, int], QuantizedMatrix], weights: dict[str, np.ndarray]) -> dict:
    sizes = {key: matrix.nbytes for key, matrix in quantized.items()}
    for name, w in weights.items():
        sizes[name, FLOAT] = w.size * 4
    return sizes


def ordered_upgrades(names: list[str], sensitivity: dict, sizes: dict) -> list[Upgrade]:
    """Every 4 → 8 and 8 → float32 step, the best loss saved per byte first. A projection's second step
    never comes before its first (the two are merged when the second is worth more per byte)."""
    steps = []
    for name in names:
        first = Upgrade(name, 8, sensitivity[name, 4] - sensitivity[name, 8], sizes[name, 8] - sizes[name, 4])
        second = Upgrade(name, FLOAT, sensitivity[name, 8], sizes[name, FLOAT] - sizes[name, 8])
        if _rate(second) > _rate(first):
            steps.append(Upgrade(name, FLOAT, first.saves + second.saves, first.costs + second.costs))
        else:
            steps += [first, second]
    return sorted(steps, key=_rate, reverse=True)


def _rate(step: Upgrade) -> float:
    return step.saves / max(step.costs, 1)


def plan_after(names: list[str], upgrades: list[Upgrade], k: int) -> dict[str, int]:
    plan = {name: 4 for name in names}
    for step in upgrades[:k]:
        if plan[step.weight] != FLOAT:
            plan[step.weight] = step.to_bits
    return plan


def plan_bytes(plan: dict[str, int], sizes: dict) -> int:
    return sum(sizes[name, bits] for name, bits in plan.items())


@dataclass
class SearchStep:
    upgrades: int
    bytes: int
    increase: float  # measured perplexity ratio - 1


def search_plan(names: list[str], upgrades: list[Upgrade], sizes: dict, budget: float,
                measure: Callable[[dict[str, int]], float],
                say: Callable[[str], None] = lambda message: None) -> tuple[dict[str, int], list[SearchStep]]:
    """The plan with the fewest upgrades whose measure(plan) (perplexity ratio - 1) is ≤ budget.

    Raises EdgeGPTError when even every projection in float32 misses it (the budget is impossible).
    """
    trials: list[SearchStep] = []

    def within(k: int) -> bool:
        plan = plan_after(names, upgrades, k)
        increase = measure(plan)
        trials.append(SearchStep(k, plan_bytes(plan, sizes), increase))
        say(f"plan with {k} of {len(upgrades)} upgrades: {plan_bytes(plan, sizes) / 1e6:.1f} MB of projections, "
            f"perplexity {increase:+.2%} (budget {budget:+.2%})")
        return increase <= budget

    low, high = 0, len(upgrades)
    if not within(high):
        raise EdgeGPTError(f"no quantization plan stays within --max-ppl-increase {budget:.2%}: even with every "
                           f"projection in float32 perplexity rises {trials[-1].increase:+.2%} (the 8-bit embedding "
                           f"table and the text's noise); raise the budget")
    if within(low):
        return plan_after(names, upgrades, low), trials
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            high = middle
        else:
            low = middle
    return plan_after(names, upgrades, high), trials
