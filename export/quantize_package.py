"""The export's quantization step: a float32 package directory in, a quantized one out.

    fixed bits     calibrate (importance and GPTQ's Σ xᵀx) ─► quantize every projection ─► optimize
    auto           calibrate (and the Fisher information) ─► every projection at 4 and 8 bits ─►
                   sensitivity per projection ─► bisect the number of upgrades (4 → 8 → float32), building
                   and scoring each candidate package on the search text, to the smallest plan whose
                   perplexity stays within the budget ─► that package

The candidates are real packages scored by the runtime (not a simulation in PyTorch): onnxruntime's
int8 activations inside MatMulNBits (accuracy_level 4) are part of what quantization costs, and only the
package shows them together with the weights' share. The export's gate then scores the chosen package
on the full held-out text.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MODEL, TRAIN_STATE
from edgegpt.core.io import read_json
from edgegpt.export.calibration import calibrate
from edgegpt.export.external_data import save_model
from edgegpt.export.plan import (
    FLOAT,
    byte_sizes,
    ordered_upgrades,
    plan_bytes,
    search_plan,
    sensitivities,
)
from edgegpt.export.quantize import (
    QuantOptions,
    prepare_graph,
    quantize_graph,
    quantize_weights,
    settings,
    write_quantized,
)
from edgegpt.model import GPT
from edgegpt.quality import PackageScorer
from edgegpt.scoring import score, strided_windows

CALIBRATION_TOKENS = 4096
SEARCH_TOKENS = 4096  # held-out tokens each candidate plan is scored on (the gate then scores them all)
DEFAULT_MAX_PPL_INCREASE = 0.01


@dataclass
class CalibrationText:
    tokens: np.ndarray
    source: str


def calibration_text(checkpoint: Path, data: Path | None, tokenizer,
                     tokens: int = CALIBRATION_TOKENS) -> CalibrationText:
    """--calibration-data, else the end of the checkpoint's training text, else the end of the embedded
    corpus's training part (the Python standard library's docstrings): never the held-out text."""
    from edgegpt.quality import read_documents
    from edgegpt.train.corpus import default_corpus, split_documents
    from edgegpt.train.data import tokenize

    if data is not None:
        documents, source = read_documents([Path(data)], checkpoint), str(data)
    else:
        state = read_json(checkpoint / TRAIN_STATE) if (checkpoint / TRAIN_STATE).is_file() else {}
        paths = state.get("data") or []
        try:
            if paths:
                documents, source = split_documents(read_documents(paths, checkpoint))[0], "training text"
            else:
                documents, source = split_documents(default_corpus())[0], "the embedded Python documentation"
        except EdgeGPTError as e:
            raise EdgeGPTError(f"cannot read calibration text ({e}); pass --calibration-data PATH") from None
    kept, budget = [], tokens * 8  # characters: enough for `tokens` tokens at any sane tokenizer
    for doc in reversed(documents):
        kept.insert(0, doc[-budget:])
        budget -= len(kept[0])
        if budget <= 0:
            break
    ids = tokenize(tokenizer, kept).astype(np.int64)[-(tokens + 1):]
    if len(ids) < 64:
        raise EdgeGPTError(f"the calibration text ({source}) has {len(ids)} tokens; it needs at least 64")
    return CalibrationText(ids, f"{source} (last {len(ids) - 1:,} tokens)")


def needs_calibration(options: QuantOptions, auto: bool) -> bool:
    return auto or (options.method == "nbits" and options.rounding in ("search", "gptq"))


def quantize_fixed(model: GPT, float_dir: Path, out_dir: Path, options: QuantOptions, text: CalibrationText | None,
                   say: Callable[[str], None], steps: Callable[[int, int], None] | None = None,
                   done_with_model: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every projection at options.bits. say(message) as calibration and quantization start; steps(done,
    total) after each calibration window and each quantized matrix. done_with_model() once `model` is no longer
    read: before the weights are quantized, unless GPTQ's Hessians are still to be gathered from it."""
    calibration = None
    if text is not None and needs_calibration(options, auto=False):
        names = list(prepare_graph(float_dir / MODEL).projections)
        say(f"calibrating on {text.source}")
        calibration = calibrate(model, text.tokens, text.source, names, fisher=False,
                                hessians=options.rounding == "gptq", progress=steps)
    if calibration is None or not calibration.pending:
        done_with_model()
    say(f"quantizing weights to {options.bits} bits ({options.method}"
        + (f", {options.rounding})" if options.method == "nbits" else ")"))
    return quantize_graph(float_dir / MODEL, out_dir / MODEL, options=options, calibration=calibration,
                          progress=steps)


def quantize_auto(model: GPT, float_dir: Path, out_dir: Path, options: QuantOptions, text: CalibrationText,
                  search_tokens: np.ndarray, char_table: np.ndarray, window: int, budget: float,
                  finish: Callable[[Path], None], say: Callable[[str], None],
                  steps: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """--quantize auto: the smallest plan within `budget` (perplexity ratio - 1) on `search_tokens`.
    say(message) as each stage starts and after each candidate plan; steps(done, total) after each
    calibration window, each quantized matrix and each window a candidate is scored on.

    finish(directory) turns a directory holding a quantized model.onnx into a loadable package (metadata,
    offline optimization), as the export does for its final package.
    """
    from edgegpt.runtime import Generator

    graph = prepare_graph(float_dir / MODEL)
    names = list(graph.projections)
    say(f"calibrating on {text.source} (inputs and Fisher information)")
    calibration = calibrate(model, text.tokens, text.source, names, fisher=True, hessians=options.rounding == "gptq",
                            progress=steps)
    say(f"quantizing {len(names)} projections at 4 bits ({options.rounding}) and 8 bits")
    four = replace(options, bits=4)
    # One count over both widths: the 4-bit matrices, then the 8-bit ones
    first_half = (lambda done, total: steps(done, 2 * total)) if steps else None
    second_half = (lambda done, total: steps(total + done, 2 * total)) if steps else None
    quantized = quantize_weights(graph, four, {4}, calibration, progress=first_half)
    # 8-bit candidates take the search: GPTQ's error compensation is for 4 bits, and the search is faster
    eight = replace(options, bits=8, rounding="search" if options.rounding == "gptq" else options.rounding)
    quantized.update(quantize_weights(graph, eight, {8}, calibration, progress=second_half))
    weights = {name: graph.weight(name) for name in names}
    sizes = byte_sizes(quantized, weights)
    upgrades = ordered_upgrades(names, sensitivities(quantized, weights, calibration.fisher), sizes)
    windows = strided_windows(len(search_tokens), window)

    def perplexity(directory: Path) -> float:
        scorer = PackageScorer(Generator.load(directory, max_length=window))
        return score(scorer.logit_chunks, search_tokens, windows, char_table, progress=steps).perplexity

    say(f"scoring the float32 package and each candidate plan on {len(search_tokens) - 1:,} tokens")
    reference = perplexity(float_dir)
    trial = out_dir.parent / f"{out_dir.name}.trial"

    def measure(plan: dict[str, int]) -> float:
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir()
        save_model(write_quantized(graph, four, plan, quantized, trial), trial / MODEL)
        finish(trial)
        return perplexity(trial) / reference - 1

    try:
        plan, trials = search_plan(names, upgrades, sizes, budget, measure, say)
    finally:
        shutil.rmtree(trial, ignore_errors=True)
    save_model(write_quantized(graph, four, plan, quantized, out_dir), out_dir / MODEL)
    recorded = settings(four, graph.tied, plan, calibration)
    counts = {bits: sum(1 for b in plan.values() if b == bits) for bits in (4, 8, FLOAT)}
    recorded.update({
        "bits": "auto",
        "projections": f"mixed: {counts[4]} at 4 bits, {counts[8]} at 8 bits, {counts[FLOAT]} in float32; "
                       + recorded["projections"].split(", ", 1)[1],
        "budget": {"max_ppl_increase": budget, "search_tokens": int(len(search_tokens) - 1)},
        "search": [{"upgrades": t.upgrades, "projection_bytes": t.bytes, "ppl_increase": t.increase} for t in trials],
        "projection_bytes": plan_bytes(plan, sizes),
    })
    return recorded
