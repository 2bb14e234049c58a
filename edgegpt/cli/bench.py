"""`edgegpt bench`: how fast a model package runs here (load, first token, decode, memory).

run_bench starts one fresh process, cli/bench_child.py, which loads the package and times it (its
docstring says what each figure measures) and reports back as JSON; bench_table draws that report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import typer

from edgegpt.cli.bench_child import FLAT_STEPS
from edgegpt.cli.errors import user_errors
from edgegpt.cli.options import (
    DraftOption,
    LookupOption,
    MaxLengthOption,
    NoSpeculationOption,
    Provider,
    ProviderOption,
    speculation,
)
from edgegpt.core import workspace
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MODEL


def bench(
    model: Optional[Path] = typer.Argument(None, help="Model package. Default: $EDGEGPT_HOME/model."),
    prompt_len: int = typer.Option(32, help="Prompt tokens before the first token (random ids)."),
    new_tokens: int = typer.Option(128, help="Greedy decode steps timed."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads. Default: the physical cores."),
    provider: ProviderOption = Provider.auto,
    runs: int = typer.Option(5, help="Timed runs; medians are reported."),
    positions: Optional[str] = typer.Option(
        None, help="Also decode tokens/s after this many cached tokens, e.g. 64,900."),
    max_length: MaxLengthOption = None,
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Load time, time to first token, decode tokens/s and peak memory of a package, in a fresh process;
    with a draft or --lookup also the share of guesses kept and the tokens each pass of the model made."""
    with user_errors("bench"):
        try:
            at = tuple(int(p) for p in positions.split(",") if p.strip()) if positions else ()
        except ValueError:
            raise EdgeGPTError(f"--positions takes comma-separated integers, got {positions!r}") from None
        draft, lookup = speculation(draft, lookup, no_speculation)
        report = run_bench(model or workspace.model_dir(), prompt_len=prompt_len, new_tokens=new_tokens,
                           threads=threads, provider=provider.value, runs=runs, positions=at,
                           max_length=max_length, draft=draft, lookup=lookup)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            from rich.console import Console

            Console().print(bench_table(report))


def run_bench(model: Path, prompt_len: int = 32, new_tokens: int = 128, threads: int | None = None,
              provider: str = "auto", runs: int = 5, positions: tuple[int, ...] = (),
              max_length: int | None = None, draft: str | Path | None = "auto", lookup: bool = False) -> dict[str, Any]:
    """Run the benchmark in a fresh child process and return its report (cli/bench_child.py says what
    each figure is).
    max_length, draft: Generator.load's (default: the model's context; the package's own draft, if any);
    lookup: prompt lookup. With a draft or lookup the report has `speculation`: guesses kept and tokens
    per pass of the model."""
    if prompt_len < 1 or new_tokens < 1 or runs < 1:
        raise EdgeGPTError("--prompt-len, --new-tokens and --runs must be at least 1")
    if max_length is not None and max_length < 1:  # the child reads 0 as "the default"
        raise EdgeGPTError(f"--max-length must be at least 1, got {max_length}")
    # The child reads threads 0 as "the default": refuse it here rather than quietly benchmark another setting.
    if threads is not None and threads < 1:
        raise EdgeGPTError(f"--threads must be at least 1, got {threads}")
    if any(p < 0 for p in positions):
        raise EdgeGPTError(f"--positions are numbers of cached tokens, 0 or more; got {min(positions)}")
    args = [sys.executable, "-m", "edgegpt.cli.bench_child", str(model), str(prompt_len), str(new_tokens),
            str(threads or 0), provider, str(runs), ",".join(map(str, positions)), str(max_length or 0),
            "off" if draft is None else str(draft), "lookup" if lookup else "-"]
    with tempfile.TemporaryFile(mode="w+") as err_file:
        start = time.perf_counter()
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err_file, text=True)
        first = child.stdout.readline()  # the child writes this line right after its first token
        cold = time.perf_counter() - start
        # Through the same reader: readline may already have buffered what follows the line, which
        # communicate() (reading the raw pipe) would lose; a fast child's whole report, at times.
        rest = child.stdout.read()
        child.wait()
        err_file.seek(0)
        err = err_file.read()
    if child.returncode != 0 or first.strip() != "first-token":
        lines = (err or first).strip().splitlines()
        raise EdgeGPTError(lines[-1] if lines else f"the benchmark process failed ({child.returncode})")
    report = json.loads(rest)
    report["cold_start_s"] = cold
    return report


def bench_table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"edgegpt bench: {report['model']} ({report['provider']}, "
                        f"{report['threads'] or 'default'} threads, max_length {report.get('max_length')})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")
    rows = [
        ("cold start", f"{report['cold_start_s']:.3f} s",
         f"fresh process to the first token, {report['prompt_len']}-token prompt"),
        ("load", f"{1000 * report['load_s']:.1f} ms", "Generator.load, median"),
        ("time to first token", f"{1000 * report['ttft_s']:.1f} ms",
         f"prefill of {report['prompt_len']} tokens, median"),
        ("decode", f"{report['decode_tokens_per_s']:,.0f} tokens/s",
         f"{report['new_tokens']} greedy steps, median of {report['runs']}"),
    ]
    rows += [(f"decode at position {p}", f"{r:,.0f} tokens/s", f"{FLAT_STEPS} steps")
             for p, r in report["decode_tokens_per_s_at"].items()]
    if report.get("speculation"):
        spec = report["speculation"]
        how = " + ".join(filter(None, ["draft " + "/".join(Path(spec["draft"]).parts[-2:]) if spec["draft"] else "",
                                        "lookup" if spec["lookup"] else ""]))
        rows += [("guesses kept", f"{100 * spec['acceptance']:.1f} %", f"speculation: {how}"),
                 ("tokens per pass", f"{spec['tokens_per_step']:.2f}", "tokens each forward of the model made")]
    rows += [("peak RSS", f"{report['peak_rss_mb']:.0f} MB", "the benchmark process's high-water mark"),
             (MODEL, f"{report['model_bytes'] / 1e6:.1f} MB", "")]
    for row in rows:
        table.add_row(*row)
    return table
