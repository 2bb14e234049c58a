"""Quality gates: an export ships only if the package provably lost (almost) nothing.

    float32 graph    max |Δ log-probability| vs PyTorch ≤ 1e-4 × max |logit|  (export/verify.py)
    int8 package     perplexity on held-out text ≤ PyTorch float32's × 1.015
    int4 package     ≤ × 1.05
    float16 package  ≤ × 1.005

The held-out text is scored in windows of `window` tokens (edgegpt/quality.py) by the PyTorch float32 model
(the reference) and by the package through the runtime; both rows, with top-1 and greedy agreement, make
the table the export prints. A failed gate
raises GateFailed (the CLI prints the table, exits 2) before the package is swapped in, so nothing is
written; --no-gate writes it anyway and the manifest records that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.verify import FLOAT32_TOLERANCE, Verification
from edgegpt.quality import EvalText, Metrics
from edgegpt.scoring import window_stride

PERPLEXITY_LIMITS: Mapping[str, float] = {"int8": 0.015, "int4": 0.05, "float16": 0.005}


@dataclass(frozen=True)
class GateLimits:
    """The thresholds; the API takes other values (the CLI always uses these defaults)."""

    perplexity_increase: Mapping[str, float] = field(default_factory=lambda: dict(PERPLEXITY_LIMITS))
    logit_tolerance: float = FLOAT32_TOLERANCE  # relative: max |Δ log p| / max |logit| (export/verify.py)


@dataclass
class Check:
    name: str  # e.g. "int8 perplexity vs PyTorch"
    value: float
    limit: float
    unit: str  # "relative" (perplexity ratio - 1) or "of max |logit|" (the float32 graph's relative error)

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.limit)

    def describe(self) -> str:
        if self.unit == "relative":
            return f"{self.name} {self.value:+.2%} (limit {self.limit:+.2%})"
        return f"{self.name} {self.value:.2e} (limit {self.limit:.2e})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit, "passed": self.passed}


@dataclass
class GateReport:
    """Everything the gates measured, for the table and the manifest."""

    enabled: bool  # False with --no-gate
    checks: list[Check]
    text: EvalText | None = None  # None when no held-out text was evaluated
    rows: list[Metrics] = field(default_factory=list)  # reference first, then the package

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
            "eval": None if self.text is None else {
                "source": self.text.source, "tokens": self.rows[0].tokens if self.rows else 0,
                "chars": self.rows[0].chars if self.rows else 0, "capped": self.text.capped,
                "window": self.text.window, "stride": window_stride(self.text.window),
            },
            "models": [m.to_dict() for m in self.rows],
        }


class GateFailed(EdgeGPTError):
    """A quality gate failed: no package was written. Carries the export report for the table."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


def logit_check(verification: Verification) -> Check:
    return Check("float32 graph max |Δlog p| / max |logit| vs PyTorch", verification.relative_error,
                 verification.tolerance, "of max |logit|")


def perplexity_check(label: str, reference: Metrics, package: Metrics, limits: GateLimits) -> Check | None:
    """None for float32 packages: their gate is the logit check, which is far stricter."""
    limit = limits.perplexity_increase.get(label)
    if limit is None:
        return None
    return Check(f"{label} perplexity vs PyTorch", package.perplexity / reference.perplexity - 1, limit, "relative")


def failure_message(report: GateReport) -> str:
    failed = "; ".join(c.describe() for c in report.failures())
    return f"quality gate failed: {failed}; no package was written (pass --no-gate to write it anyway)"


class CountedScorer:
    """A scorer (edgegpt.quality's Scorable) that reports each window it scores, and its greedy continuations
    as one more, through steps(done, total): the gates' progress, without the scoring code knowing. The two
    scorers of a gate share one count: the package's starts at `offset`, where PyTorch's ends."""

    def __init__(self, scorer: Any, steps: Callable[[int, int], None], offset: int, total: int) -> None:
        self.scorer, self.steps, self.done, self.total = scorer, steps, offset, total

    def logit_chunks(self, windows: Any, skip: int = 0) -> Any:
        yield from self.scorer.logit_chunks(windows, skip)
        self._advance(len(windows))

    def greedy_all(self, prompts: Any, n_tokens: int) -> Any:
        continuations = self.scorer.greedy_all(prompts, n_tokens)
        self._advance(1)
        return continuations

    def __getattr__(self, name: str) -> Any:  # max_len and anything else a scorer offers
        return getattr(self.scorer, name)

    def _advance(self, units: int) -> None:
        self.done = min(self.done + units, self.total)
        self.steps(self.done, self.total)



def counted(scorer: Any, steps: Callable[[int, int], None] | None, offset: int, total: int) -> Any:
    """`scorer` counted through steps (CountedScorer), or itself when there is no steps callback."""
    return scorer if steps is None else CountedScorer(scorer, steps, offset, total)
