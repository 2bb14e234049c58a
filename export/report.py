"""What `edgegpt export` prints: the package figures, the operator census and the quality-gate table.

The census is printed on every export so that a graph that lost its fusion (no GroupQueryAttention, a
float MatMul left after --quantize) is visible at a glance, not only to the tests.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from edgegpt.cli.inspect import plan_table
from edgegpt.export.package import ExportReport
from edgegpt.quality import metrics_table

# The operators whose presence says a fusion or a quantization happened; shown first, in bold.
KEY_OPERATORS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                 "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "GatherBlockQuantized", "MatMul",
                 "Softmax")


def census_table(census: dict[str, int]) -> Table:
    table = Table(title=f"operators ({sum(census.values())} nodes)")
    table.add_column("op type")
    table.add_column("count", justify="right")
    key = [op for op in KEY_OPERATORS if op in census]
    for op in key:
        table.add_row(f"[bold]{op}[/]", str(census[op]))
    for op, count in census.items():
        if op not in key:
            table.add_row(op, str(count))
    return table


def summary_table(report: ExportReport) -> Table:
    written = "written" if report.manifest else "NOT written"
    table = Table(title=f"model package {report.package} ({written})", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value")
    table.add_row("graph", f"{report.graph_kind}, {report.precision}")
    table.add_row("float graph size", f"{report.float_bytes / 1e6:.2f} MB")
    if report.quantization is not None:
        size = f"{report.package_bytes / 1e6:.2f} MB ({report.size_ratio:.3f}× float32)"
        table.add_row(f"{report.precision} size", size)
        table.add_row("projections", report.quantization["projections"])
        table.add_row("embedding / LM head", f"{report.quantization['embedding']}; {report.quantization['lm_head']}")
    if report.verification is not None:
        v = report.verification
        absolute = max(v.max_abs_logit_diff.values(), default=0.0)
        table.add_row("float32 vs PyTorch: max |Δlog p| / max |logit|",
                      f"{v.relative_error:.2e} (limit {v.tolerance:.2e}; max |Δlogits| {absolute:.2e} on logits "
                      f"up to {v.logit_scale:.1f})")
    table.add_row("opset / IR version", f"{report.graph.opset} / {report.graph.ir_version}")
    if report.draft is not None:
        table.add_row("draft", report.draft.describe())
    table.add_row("seconds", f"{report.seconds:.1f}")
    return table


def gates_table(report: ExportReport, whose: str = "") -> Table | str:
    """`whose`: "draft " for the draft's gates, printed after the target's."""
    gates = report.gates
    checks = "; ".join(f"{c.describe()} {'PASS' if c.passed else 'FAIL'}" for c in gates.checks) or "none"
    state = "on" if gates.enabled else "OFF (--no-gate: recorded in the manifest)"
    if not gates.rows:
        return f"{whose}quality gates ({state}): {checks}; no held-out text scored (pass --eval-data PATH to see " \
            "perplexity)"
    verdicts = ["reference", "PASS" if gates.passed else "FAIL"]
    table = metrics_table(gates.rows, gates.text, title=f"{whose}quality gates ({state})", verdicts=verdicts)
    table.caption = f"{table.caption}\n{checks}"
    return table


def render_report(report: ExportReport) -> Group:
    plan = (report.quantization or {}).get("plan")
    mixed = plan and len(set(plan.values())) > 1  # a uniform plan is said in one line of the summary
    parts = [summary_table(report), *([plan_table(plan)] if mixed else []), census_table(report.graph.census)]
    parts.append(gates_table(report))
    if report.draft is not None:  # the draft's own gates, against its own checkpoint
        parts.append(gates_table(report.draft.report, whose="draft "))
    return Group(*parts)
