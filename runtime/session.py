"""Execution providers and the onnxruntime InferenceSession: which provider a package runs on, threads,
and readable load errors. The provider policy lives here (Generator.load calls open_session); once the
session exists, kv_cache.check_cache_runs checks that its provider runs the package's cache dtype.

Providers, as the user names them:
    "auto"  CUDA when this onnxruntime has the CUDA provider and a GPU actually initialises, else CPU
    "cpu"   the CPU provider
    "cuda"  CUDA or an EdgeGPTError (never a silent fall back to the CPU)
and as the package narrows them (package_provider):
    float16 packages         CUDA only: onnxruntime's CPU provider pads float16 graphs with casts and runs
                             them slower than float32; "cpu", or "auto" without CUDA, is an error
    fused float32/int8       the CPU only: onnxruntime's CUDA GroupQueryAttention is float16/bfloat16, so on
                             CUDA attention would run on the CPU with the cache copied across every step;
                             "cuda" (when CUDA is there) is an error, "auto" is the CPU
    plain (concat) float32   wherever the user's choice lands

Threads default to the number of physical cores: on a CPU, matrix multiplications gain nothing from
hyperthreads. The intra-op pool spins only inside a run: a decode step is a chain of ~90 small ops, and
a pool that sleeps between them pays a wake-up per op; `session.force_spinning_stop` stops the spinning
as soon as run() returns, so an app that holds a model while idle costs no CPU. Spinning within runs
decodes clearly faster than no spinning, and close to spinning left on, which burns part of a core for
every idle second afterwards (the A/B: docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from edgegpt.core.errors import EdgeGPTError

if TYPE_CHECKING:
    from edgegpt.runtime.package import ModelPackage

PROVIDERS = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Only errors and worse: the CUDA provider's "falling back" warnings would otherwise reach the app's console.
LOG_ERROR = 3


def check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise EdgeGPTError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")


def package_provider(package: ModelPackage, provider: str) -> str:
    """The provider to ask create_session for: `provider` narrowed by what the package's graph runs on
    (module doc); raises EdgeGPTError rather than fall back to the CPU quietly."""
    check_provider(provider)
    if package.graph.dtype == "float16":
        if provider == "cpu" or (provider == "auto" and not cuda_available()):
            raise EdgeGPTError(
                f"{package.path} is a float16 package, which is for CUDA (provider 'cuda'); "
                "for the CPU export float32 or int8 (`edgegpt export` without --precision fp16)"
            )
        return "cuda"
    if package.graph.kv_layout == "static":
        # On CUDA the fused float32 graph's greedy text also drifted from the CPU's (seen on an H200).
        if provider == "cuda" and cuda_available():
            raise EdgeGPTError(
                f"{package.path} is a {package.graph.dtype} package, which runs on the CPU; "
                "for CUDA export with `edgegpt export --precision fp16`"
            )
        if provider == "auto":
            return "cpu"
    return provider


def open_session(package: ModelPackage, provider: str = "auto", threads: int | None = None,
                 prepack: bool = True) -> tuple[ort.InferenceSession, str]:
    """The package's model.onnx on the provider package_provider picks; returns the session and the
    provider actually used ("cpu" or "cuda"). prepack: session_options'."""
    return create_session(package.model_path, provider=package_provider(package, provider), threads=threads,
                          prepack=prepack)


def physical_cores() -> int:
    """Physical cores usable by this process (Linux: from sysfs topology; elsewhere os.cpu_count())."""
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:  # no sysfs (some containers): count logical CPUs instead
            return max(1, len(usable))
        cores.add((package, core))
    return max(1, len(cores))


def cuda_available() -> bool:
    """Whether this onnxruntime build has the CUDA provider (not whether a GPU initialises)."""
    return CUDA in ort.get_available_providers()


def session_options(threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    """prepack False: the kernels read the weights where they lie (a data file's pages, mapped) rather than
    a repacked copy made at load, a little slower per step and with one copy of the weights instead of two
    while loading: for a session opened once to check a graph beside the model it came from (the export)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise EdgeGPTError(f"threads must be a positive integer, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1  # a decoder is a chain of ops: nothing runs side by side
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # within a run (module doc)
    options.add_session_config_entry("session.force_spinning_stop", "1")  # ... and not after it returns
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = LOG_ERROR
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def create_session(
    model_path: Path, provider: str = "auto", threads: int | None = None, prepack: bool = True
) -> tuple[ort.InferenceSession, str]:
    """Load model.onnx; return the session and the provider actually used ("cpu" or "cuda")."""
    check_provider(provider)
    options = session_options(threads, prepack)
    has_cuda = cuda_available()
    if provider == "cuda" and not has_cuda:
        raise EdgeGPTError(
            "the CUDA provider is not available in this onnxruntime; install edgegpt[cuda] "
            "(pip uninstall onnxruntime && pip install 'edgegpt[cuda]') or use provider 'cpu'"
        )
    if provider == "cpu" or not has_cuda:
        return _open_or_raise(model_path, options, [CPU]), "cpu"
    try:
        # TF32 off: it moved float32 logits by 2e-3 against the CPU on an H200, and a float32 package
        # promises float32 answers; float16 packages do not use it anyway.
        session = _open(model_path, options, [(CUDA, {"use_tf32": "0"}), CPU])
    except _LoadFailed as e:
        # The model or CUDA failed: loading on the CPU tells which (and raises if it is the model).
        session = _open_or_raise(model_path, options, [CPU])
        if provider == "cuda":
            raise EdgeGPTError(
                f"CUDA could not be initialised ({e}); check the GPU driver or use provider 'cpu'"
            ) from None
        return session, "cpu"
    # When the CUDA libraries or the GPU are missing, onnxruntime logs an error and quietly builds a
    # CPU-only session, so the providers it reports are the only reliable answer.
    if CUDA in session.get_providers():
        return session, "cuda"
    if provider == "cuda":
        raise EdgeGPTError(
            "CUDA could not be initialised (no usable GPU, or CUDA/cuDNN libraries missing); "
            "check the GPU driver and the edgegpt[cuda] install, or use provider 'cpu'"
        )
    return session, "cpu"


class _LoadFailed(Exception):
    """onnxruntime refused the model with these providers; the message is its first line, `full` all of it."""

    def __init__(self, detail: str, full: str = "") -> None:
        super().__init__(detail)
        self.full = full


def _open(model_path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        # enable_fallback=0: onnxruntime's own fall back prints to stdout and, when it triggers inside
        # run(), swaps providers on a session other threads may be using. Choosing is done above.
        session = ort.InferenceSession(str(model_path), options, providers=providers, enable_fallback=0)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise  # a bug, not a bad model
        raise _LoadFailed(ort_error_detail(e), str(e)) from None
    session.disable_fallback()
    return session


def ort_error_detail(error: Exception) -> str:
    """onnxruntime's message, shortened for one line: "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load
    model from /p/model.onnx failed:Protobuf parsing failed." -> "INVALID_PROTOBUF: Protobuf parsing failed."
    """
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    parts = [part.strip() for part in text.split(" : ")]
    if len(parts) >= 4 and parts[0] == "[ONNXRuntimeError]":
        text = f"{parts[2]}: {' : '.join(parts[3:])}"
    text = re.sub(r"Load model from .* failed:\s*", "", text)
    return text[:200]


def _open_or_raise(model_path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return _open(model_path, options, providers)
    except _LoadFailed as e:
        detail = str(e)
        # What an older onnxruntime says of a graph a newer one wrote: an unknown opset or IR version, or an
        # operator attribute it does not know yet (seen: 1.23 loading a package exported with 1.32).
        if any(sign in e.full.lower() for sign in ("opset", "ir version", "unrecognized attribute")):
            raise EdgeGPTError(
                f"{model_path} needs a newer onnxruntime than {ort.__version__} ({detail}); "
                "upgrade onnxruntime or re-run `edgegpt export` with this version"
            ) from None
        raise EdgeGPTError(f"{model_path} is corrupt ({detail}); re-run `edgegpt export`") from None
