"""`edgegpt export`: checkpoint directory -> model package directory.

    checkpoint/ ─► float graph (fused by default; float32 or float16) ─► max |Δlog p| vs PyTorch (float32,
               relative to the logits' scale) ─► [quantize: int8 / int4] ─► score held-out text in windows
               of `window` tokens: PyTorch float32 vs the package ─► quality gates ─► write package ─► model/

Every step works inside a staging directory beside the destination, swapped in only when all steps
succeeded and every gate passed: a failed export leaves no half package and keeps the previous one.

Where the time goes: PyTorch scoring the held-out text is about half of an export, the quantized package
scoring the same text most of the rest; building the graph, the float32 check, quantizing, hashing and
writing are seconds. How long a real model's export takes: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST, MODEL
from edgegpt.core.io import staged_directory
from edgegpt.export import external_data
from edgegpt.export.cache_precision import (
    build_int8_cache_graph,
    cache_perplexity_check,
    cache_record,
    resolve_kv_cache,
)
from edgegpt.export.external_data import TENSOR_SIZE_THRESHOLD, data_path, graph_bytes, replace_data_file
from edgegpt.export.gates import (
    GateFailed,
    GateLimits,
    GateReport,
    counted,
    failure_message,
    logit_check,
)
from edgegpt.export.onnx_export import GraphInfo, describe_graph, export_plain_onnx, graph_contract
from edgegpt.export.quantize import ACCURACY_LEVEL, BITS, QuantOptions
from edgegpt.export.quantize_package import (
    DEFAULT_MAX_PPL_INCREASE,
    SEARCH_TOKENS,
    calibration_text,
    needs_calibration,
    quantize_auto,
    quantize_fixed,
)
from edgegpt.export.verify import Verification, torch_reference, verify_generator
from edgegpt.export.writer import generation_config, write_manifest, write_package_metadata
from edgegpt.model import GPT
from edgegpt.quality import (
    DEFAULT_EVAL_TOKENS,
    EvalText,
    PackageScorer,
    evaluate,
    prepare_eval_text,
    read_eval_documents,
    resolve_window,
    validation_documents,
)
from edgegpt.reference import TorchReference
from edgegpt.scoring import strided_windows

if TYPE_CHECKING:
    from edgegpt.export.draft import DraftReport

PRECISIONS = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


@dataclass
class ExportReport:
    checkpoint: Path
    package: Path
    graph_kind: str  # "fused" or "plain"
    precision: str  # of the package's weights: "float32", "float16", "int8" or "int4"
    float_bytes: int  # the float graph's model.onnx, before any quantization
    package_bytes: int  # the package's model.onnx
    quantization: dict[str, Any] | None
    verification: Verification | None  # the float32 graph vs PyTorch (None for float16)
    gates: GateReport
    graph: GraphInfo  # of the package's model.onnx
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    kv_cache: dict[str, Any] = field(default_factory=lambda: {"dtype": "float32"})  # the manifest's kv_cache
    draft: DraftReport | None = None  # the draft/ package, with --draft (export/draft.py)

    @property
    def size_ratio(self) -> float:
        return self.package_bytes / self.float_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "package": str(self.package),
            "graph": self.graph_kind,
            "precision": self.precision,
            "sizes": {"float_bytes": self.float_bytes, "package_bytes": self.package_bytes, "ratio": self.size_ratio},
            "quantization": self.quantization,
            "kv_cache": self.kv_cache,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "gates": self.gates.to_dict(),
            "opset": self.graph.opset,
            "ir_version": self.graph.ir_version,
            "operators": {"count": self.graph.op_count, "census": self.graph.census},
            "draft": None if self.draft is None else self.draft.to_dict(),
            "written": bool(self.manifest),
            "seconds": round(self.seconds, 2),
        }


def check_destination(checkpoint: Path, out: Path) -> None:
    """Refuse to replace anything that is not an edgegpt package: the swap deletes what was there."""
    out, checkpoint = Path(out).resolve(), Path(checkpoint).resolve()
    if out == checkpoint or out in checkpoint.parents:
        raise EdgeGPTError(f"export destination {out} would overwrite the checkpoint; choose another output directory")
    if out.exists() and not out.is_dir():
        raise EdgeGPTError(f"export destination {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise EdgeGPTError(
            f"export destination {out} exists and is not an edgegpt model package; choose an empty or new directory"
        )


def check_options(fuse: bool, precision: str, quantize: bool | str, bits: int, method: str | None,
                  quantization: dict[str, Any] | None = None) -> tuple[str, QuantOptions | None, float | None]:
    """Validate the option combination before anything slow; returns (precision, the quantization options,
    the --quantize auto budget as a ratio). `quantization` holds rounding, block_size, symmetric,
    accuracy_level and max_ppl_increase (percent), each None or False when not given."""
    extra = {k: v for k, v in (quantization or {}).items() if v not in (None, False)}
    if precision not in PRECISIONS:
        raise EdgeGPTError(f"--precision {precision} is not supported; choose fp32 or fp16")
    precision = PRECISIONS[precision]
    if quantize not in (True, False, "auto"):
        raise EdgeGPTError(f"--quantize takes no value but auto, got {quantize!r}")
    if bits not in BITS:
        raise EdgeGPTError(f"--bits {bits} is not supported; choose 8 or 4")
    if precision == "float16" and quantize:
        # Weight-only and dynamic quantization are CPU formats over float32 activations; a float16
        # package exists for CUDA, where its own half-precision kernels are the speed-up.
        raise EdgeGPTError(
            "--quantize applies to float32 graphs; drop --precision fp16 (float16 packages are for CUDA)"
        )
    if precision == "float16" and not fuse:
        raise EdgeGPTError("--precision fp16 needs the fused graph; drop --no-fuse")
    if method is not None and not quantize:
        raise EdgeGPTError(f"--method {method} chooses how --quantize quantizes; add --quantize or drop --method")
    given = [k for k in extra if k != "accuracy_level" or extra[k] != ACCURACY_LEVEL]
    if given and not quantize:
        option = "--" + given[0].replace("_", "-")
        raise EdgeGPTError(f"{option} applies to --quantize; add --quantize or drop {option}")
    if not quantize:
        return precision, None, None
    budget = extra.pop("max_ppl_increase", None)
    if quantize == "auto":
        if method not in (None, "nbits"):
            raise EdgeGPTError("--quantize auto mixes MatMulNBits formats; drop --method dynamic")
        if not fuse:
            raise EdgeGPTError("--quantize auto reads each projection's calibration through the fused graph; "
                               "drop --no-fuse")
        budget = DEFAULT_MAX_PPL_INCREASE * 100 if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 100:
            raise EdgeGPTError(f"--max-ppl-increase is a percentage from 0 to 100, got {budget!r}")
        budget = budget / 100
    elif budget is not None:
        raise EdgeGPTError("--max-ppl-increase is the budget of --quantize auto; use --quantize auto")
    options = QuantOptions(bits=4 if quantize == "auto" else bits, method=method, **extra).resolved()
    if options.rounding == "gptq" and not fuse:
        raise EdgeGPTError("--rounding gptq calibrates through the fused graph; drop --no-fuse or use "
                           "--rounding search")
    return precision, options, budget


def build_graph(model: GPT, path: Path, fuse: bool, precision: str) -> dict[str, Any]:
    """Write the float graph at `path`; returns its config.json graph contract."""
    if not fuse:
        export_plain_onnx(model, path)
        return graph_contract(model.cfg)
    from edgegpt.export.fused import build_fused_graph, fused_graph_contract

    short = "fp16" if precision == "float16" else "fp32"
    build_fused_graph(model, path, precision=short)
    return fused_graph_contract(model.cfg, short)


def load_eval_text(checkpoint: Path, eval_data: Path | None, needed: bool, tokenizer, cfg,
                   eval_tokens: int, window: int) -> EvalText | None:
    """--eval-data, else the checkpoint's validation split, scored in windows of `window` tokens; None if
    neither exists and no gate needs it."""
    if eval_data is not None:
        documents, source = read_eval_documents(eval_data, checkpoint)
    else:
        try:
            documents, source = validation_documents(checkpoint)
        except EdgeGPTError:
            if needed:
                raise
            return None
    return prepare_eval_text(documents, source, tokenizer, cfg.vocab_size, window, eval_tokens)


# CPU packages ship the graph onnxruntime itself optimized (ORT_ENABLE_EXTENDED: Sigmoid·Mul -> QuickGelu,
# constant folding, value types of every intermediate written out), so a session starts from the finished
# graph, and creating an InferenceSession is a quarter faster; the runtime's ORT_ENABLE_ALL on an already
# optimized graph costs next to nothing, so the runtime keeps one setting for every package. EXTENDED, not ALL: ALL
# adds layout transforms tied to the CPU that ran it. float16 packages are left as built: they run on CUDA,
# whose fusions differ, and a CPU-optimized graph would pin CPU kernels into them.
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"


def optimize_offline(path: Path) -> str:
    """Replace the graph at `path` by onnxruntime's CPU-optimized version; returns the manifest's note.
    A graph with external data (export/external_data.py) gets its optimized weights written to a data file
    of the same name, so the package's file names do not depend on the optimization."""
    import onnx
    import onnxruntime as ort

    from edgegpt.export.onnx_export import MAX_IR_VERSION

    path = Path(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OFFLINE_LEVEL)
    # A folder of its own, so the optimized graph's data file can carry the final name from the start.
    staging = path.parent / f"{path.stem}.optimizing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    staged = staging / path.name
    options.optimized_model_filepath = str(staged)
    if data_path(path).is_file():
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         data_path(path).name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(TENSOR_SIZE_THRESHOLD))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    proto = onnx.load_model(str(staged), load_external_data=False)  # the weights stay in the data file
    used = {node.domain or "" for node in proto.graph.node} | {"", "ai.onnx"}
    kept = [o for o in proto.opset_import if o.domain in used]  # onnxruntime lists every domain it knows
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save_model(proto, str(path))  # as it is: any external data keeps pointing at the data file's name
    replace_data_file(staged, path)
    shutil.rmtree(staging)
    return f"{OFFLINE_LEVEL} at export by onnxruntime {ort.__version__} (CPU); loaded with ORT_ENABLE_ALL"


def cuda_available() -> bool:
    from edgegpt.runtime.session import cuda_available as available

    return available()


def open_package(directory: Path, precision: str, max_length: int | None = None, tokenizer: Any = None,
                 prepack: bool = True):
    """The runtime's Generator over a staged package (CUDA for float16, which the CPU refuses). tokenizer: the
    one the package's tokenizer.json was written from, reused rather than parsed again (a 262k vocabulary's
    takes hundreds of MB, beside the checkpoint's own); prepack: runtime/session.py's session_options."""
    from edgegpt.runtime import Generator

    provider = "cuda" if precision == "float16" else "cpu"
    return Generator._load(directory, provider, None, max_length, tokenizer, prepack)


@dataclass(frozen=True)
class ExportPlan:
    """The export's options, checked once: a draft is exported with exactly the target's."""

    fuse: bool
    precision: str  # "float32" or "float16"
    quantize: bool | str  # False, True or "auto"
    bits: int
    options: QuantOptions | None
    budget: float | None  # --quantize auto's perplexity budget, a ratio
    kv_cache: str
    gate: bool
    limits: GateLimits
    runnable: bool  # the runtime can run the package here (float16 needs CUDA)

    @property
    def kind(self) -> str:
        return "fused" if self.fuse else "plain"

    @property
    def label(self) -> str:
        return "mixed" if self.quantize == "auto" else f"int{self.bits}" if self.quantize else self.precision


@dataclass
class Source:
    """One checkpoint, loaded and checked, with the texts its package is calibrated and judged on."""

    checkpoint: Path
    model: GPT
    tokenizer: Any
    text: EvalText | None  # held-out text for the gates (None: no gate needs it and none was found)
    calibration: Any  # quantize_package.CalibrationText, or None


def export_package(
    checkpoint: Path,
    out: Path,
    *,
    fuse: bool = True,
    precision: str = "fp32",
    quantize: bool | str = False,
    bits: int = 8,
    method: str | None = None,
    rounding: str | None = None,
    block_size: int | None = None,
    symmetric: bool = False,
    accuracy_level: int = ACCURACY_LEVEL,
    max_ppl_increase: float | None = None,
    calibration_data: Path | None = None,
    kv_cache: str | None = None,
    gate: bool = True,
    gate_limits: GateLimits | None = None,
    eval_data: Path | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    window: int | None = None,
    draft: Path | None = None,
    external_data_threshold: int | None = None,
    progress: Callable[[str], None] | None = None,
    steps: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Export the checkpoint at `checkpoint` as a model package at `out` (replaced atomically). The gates
    score held-out text in windows of `window` tokens (default min(context, 1,024), stride half a window).

    kv_cache: "fp32", "int8" or "fp16" (export/cache_precision.py); None: the precision's own float cache.
    quantize: True (`bits`, `method` and the nbits options: export/quantize.py) or "auto" (a per-projection
    plan within `max_ppl_increase` percent: export/quantize_package.py).
    draft: a smaller checkpoint with the same tokenizer, exported with the same options into the package's
    `draft/` folder and gated on its own, for speculative decoding (export/draft.py).
    external_data_threshold: bytes of weights above which model.onnx keeps them in model.onnx.data
    (default export/external_data.py's EXTERNAL_DATA_THRESHOLD, below protobuf's 2 GiB limit).
    progress(message) is called as each stage starts, steps(done, total) as a stage that counts its units
    advances (calibration windows, quantized matrices, the gates' scored windows); neither prints.
    Raises GateFailed (an EdgeGPTError carrying the report) when a gate fails and `gate` is on.
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    limits = gate_limits or GateLimits()
    checkpoint, out = Path(checkpoint), Path(out)
    precision, options, budget = check_options(
        fuse, precision, quantize, bits, method,
        dict(rounding=rounding, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
             max_ppl_increase=max_ppl_increase))
    if budget is not None:
        limits = GateLimits(perplexity_increase={**limits.perplexity_increase, "mixed": budget},
                            logit_tolerance=limits.logit_tolerance)
    kv_cache = resolve_kv_cache(kv_cache, fuse, precision)
    # Checked even when no gate reads it (a float32 export without held-out text): a count below one is
    # a mistake in the command, not a setting.
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise EdgeGPTError(f"--eval-tokens must be a positive number of tokens, got {eval_tokens!r}")
    if external_data_threshold is not None and (isinstance(external_data_threshold, bool)
                                                or not isinstance(external_data_threshold, int)
                                                or external_data_threshold < 0):
        raise EdgeGPTError(f"external_data_threshold must be a number of bytes >= 0, got {external_data_threshold!r}")
    runnable = precision == "float32" or cuda_available()  # the runtime runs float16 on CUDA only
    plan = ExportPlan(fuse=fuse, precision=precision, quantize=quantize, bits=bits, options=options, budget=budget,
                      kv_cache=kv_cache, gate=gate, limits=limits, runnable=runnable)
    model, tokenizer = load_checkpoint(checkpoint)
    window = resolve_window(window, model.cfg.max_len)
    check_destination(checkpoint, out)
    generation_config(tokenizer, checkpoint)  # fail before the slow steps if the tokenizer has no end-of-text token
    drafted = None
    if draft is not None:  # refused before anything slow: a wrong tokenizer or a draft no smaller
        from edgegpt.export.draft import load_draft

        drafted = load_draft(Path(draft), checkpoint, model.cfg, tokenizer)
        check_destination(Path(draft), out)
    if gate and not runnable:
        raise EdgeGPTError("the float16 gate scores the package on CUDA, which this onnxruntime cannot use; "
                           "export on a machine with onnxruntime-gpu and a GPU, or pass --no-gate")
    # A quantized or float16 package is judged on text: without any, its gate cannot run. An int8 cache
    # is calibrated on it, gate or not; a draft's acceptance is measured on it.
    text = None
    if runnable:
        needed = (gate and plan.label != "float32") or kv_cache == "int8" or quantize == "auto" or draft is not None
        text = load_eval_text(checkpoint, eval_data, needed, tokenizer, model.cfg, eval_tokens, window)
    calibration = None
    if options is not None and needs_calibration(options, quantize == "auto"):
        calibration = calibration_text(checkpoint, calibration_data, tokenizer)
    elif calibration_data is not None:
        raise EdgeGPTError("--calibration-data is read by --quantize with the search or gptq rounding; drop it")
    say(f"exporting {checkpoint} to {out}")  # only once the inputs are known good: errors stay one line

    with staged_directory(out) as stage, external_data.external_data_threshold(external_data_threshold):
        target = Source(checkpoint, model, tokenizer, text, calibration)
        report, fields = build_package(target, stage, out, plan, say, start, steps)
        if drafted is not None:
            from edgegpt.export.draft import export_draft

            report.draft = export_draft(drafted, target, stage, out, plan, say, steps)
            fields["draft"] = report.draft.entry
        report.manifest = write_manifest(stage, fields)
    report.seconds = time.perf_counter() - start
    return report


def release_weights(model: GPT) -> None:
    """Free the PyTorch model's weights once the export has no further use for them (the model object stays,
    for its config): the package's scoring session otherwise adds its weights to theirs at the export's peak."""
    model.to("meta")


def build_package(source: Source, stage: Path, out: Path, plan: ExportPlan, say: Callable[[str], None],
                  start: float, steps: Callable[[int, int], None] | None = None) -> tuple[ExportReport, dict[str, Any]]:
    """Build, check and gate `source`'s package in the directory `stage` (everything but manifest.json);
    returns the report (for the package that will be at `out`) and the manifest's fields. Raises GateFailed
    when a gate fails and the plan's gate is on. say(message) as each stage starts, steps(done, total) as a
    counted one advances (export_package)."""
    model, tokenizer, checkpoint, text = source.model, source.tokenizer, source.checkpoint, source.text
    precision, quantize, kind, label, limits = plan.precision, plan.quantize, plan.kind, plan.label, plan.limits
    float_dir = stage / "work" / "float"
    float_dir.mkdir(parents=True)
    say(f"building the {kind} {precision} graph")
    # A graph that is not the package's (quantization or an int8 cache follows) keeps its weights outside
    # whatever its size, so the next step reads them one at a time (export/external_data.py).
    with external_data.external_data_threshold(0 if quantize or plan.kv_cache == "int8" else None):
        contract = build_graph(model, float_dir / MODEL, plan.fuse, precision)
    optimization = "none at export; ORT_ENABLE_ALL at load"
    if precision == "float32" and not quantize:  # the shipped file is what the checks below judge
        optimization = optimize_offline(float_dir / MODEL)
    write_package_metadata(float_dir, cfg=model.cfg, tokenizer=tokenizer, graph=contract, checkpoint=checkpoint)
    checks, verification = [], None
    # PyTorch's answers for the float32 check now (a few short calls, kilobytes to megabytes of logits); the graph
    # is run once the PyTorch weights are gone, so its onnxruntime session never sits beside them.
    float_reference = torch_reference(model) if precision == "float32" else None
    reference = None
    if text is not None:  # PyTorch's turn comes first, so the model can go before the package is scored
        units = len(strided_windows(len(text.tokens), text.window)) + 1  # each window, then the greedy prompts
        say(f"scoring held-out text with PyTorch ({units - 1} windows of "
            f"{min(text.window, len(text.tokens) - 1)} tokens each)")
        reference = evaluate("PyTorch float32", counted(TorchReference(model), steps, 0, units), text)
    final_dir, quantization, cache = float_dir, None, cache_record(plan.kv_cache)
    if plan.kv_cache == "int8":  # the float32 graph above is the one checked against PyTorch; this one is gated
        say("calibrating the int8 KV cache on the held-out text")
        final_dir = stage / "work" / "int8-cache"
        final_dir.mkdir()
        with external_data.external_data_threshold(0 if quantize else None):
            contract, cache = build_int8_cache_graph(model, text, final_dir / MODEL)
        if not quantize:
            optimization = optimize_offline(final_dir / MODEL)
        write_package_metadata(final_dir, cfg=model.cfg, tokenizer=tokenizer, graph=contract, checkpoint=checkpoint)
    if quantize:
        quantized_from, final_dir = final_dir, stage / "work" / "quantized"
        final_dir.mkdir()

        def finish(directory: Path) -> str:
            optimized = optimize_offline(directory / MODEL)
            write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract,
                                   checkpoint=checkpoint)
            return optimized

        if quantize == "auto":
            quantization = quantize_auto(model, quantized_from, final_dir, plan.options, source.calibration,
                                         text.tokens[: SEARCH_TOKENS + 1], text.char_table, text.window, plan.budget,
                                         finish, say, steps)
        else:
            quantization = quantize_fixed(model, quantized_from, final_dir, plan.options, source.calibration, say,
                                          steps, done_with_model=lambda: release_weights(model))
        say("optimizing the quantized graph (onnxruntime's offline pass)")
        optimization = finish(final_dir)
    release_weights(model)  # its last use: the packages' sessions need not sit beside the float32 weights
    if float_reference is not None:
        say("checking the float32 graph against PyTorch")
        # Unpacked: the check runs a few short calls, for which onnxruntime's repacked copy of the weights is waste.
        checked = open_package(float_dir, precision, tokenizer=tokenizer, prepack=False)
        verification = verify_generator(float_reference, checked, limits.logit_tolerance)
        del checked
        checks.insert(0, logit_check(verification))
    rows = []
    if text is not None:
        say(f"scoring held-out text with the {label} package ({units - 1} windows of "
            f"{min(text.window, len(text.tokens) - 1)} tokens each)")
        scorer = PackageScorer(open_package(final_dir, precision, max_length=text.window, tokenizer=tokenizer))
        cached = "" if plan.kv_cache != "int8" else ", int8 cache"
        package = evaluate(f"package ({kind}, {label}{cached})", counted(scorer, steps, 0, units), text,
                           reference.predictions)
        rows = [reference, package]
        if (check := cache_perplexity_check(label, plan.kv_cache, reference, package, limits)) is not None:
            checks.append(check)
    gates = GateReport(enabled=plan.gate, checks=checks, text=text, rows=rows)
    report = ExportReport(
        checkpoint=checkpoint, package=out, graph_kind=kind, precision=label,
        float_bytes=graph_bytes(float_dir / MODEL), package_bytes=graph_bytes(final_dir / MODEL),
        quantization=quantization, verification=verification, gates=gates,
        graph=describe_graph(final_dir / MODEL), seconds=0.0, kv_cache=cache,
    )
    if plan.gate and not gates.passed:
        report.seconds = time.perf_counter() - start
        raise GateFailed(failure_message(gates), report)

    say("writing the package")
    for path in final_dir.iterdir():
        os.replace(path, stage / path.name)
    shutil.rmtree(stage / "work")
    fields = {
        "opset": report.graph.opset,
        "ir_version": report.graph.ir_version,
        "graph": kind,
        "precision": label,
        "quantization": quantization,
        "kv_cache": cache,
        "graph_optimization": optimization,
        "operator_census": report.graph.census,
        "verification": None if verification is None else verification.to_dict(),
        "gates": gates.to_dict(),
    }
    return report, fields
