"""Peer setup: what lives where under WORK (the two venvs, the llama.cpp source and build) and `setup`,
which makes it. See `runtimes.py setup --help` for the commands it runs and why there are two venvs."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from .processes import log, run_logged

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # pinned in both venvs: an unpinned torch pulls a CUDA build of several GB
VENVS = {
    # the peers through edgegpt's [bench] extra (edgegpt itself is measured with the calling interpreter)
    "venv-peers": [TORCH, f"{REPO}[bench]"],
    # onnxruntime-genai's model builder needs transformers 5.x and onnx_ir, which it does not declare
    "venv-builder": [TORCH, "transformers>=5", "onnx_ir", "onnx", "onnxruntime", "onnxruntime-genai"],
}


def peers_python(work: Path) -> Path:
    return work / "venv-peers" / "bin" / "python"


def builder_python(work: Path) -> Path:
    return work / "venv-builder" / "bin" / "python"


def llama_bin(work: Path) -> Path:
    """Where the llama-bench, llama-quantize and llama-server binaries of the build land."""
    return work / "llama.cpp-build" / "bin"


def llama_source(work: Path) -> Path | None:
    found = sorted(glob.glob(str(work / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    return Path(found[-1]) if found else None


# The x86 instruction sets llama.cpp is built for when the CPU has AMX: a native build (-march=native) compiles
# ggml's AMX path, and that build crashed in its first evaluation on a Xeon with AMX (docs/benchmarks.md,
# "Running the peers"). Everything else this kind of CPU has stays on.
NO_AMX = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
          "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
          "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")


def cpu_options() -> tuple[str, ...]:
    """-DGGML_NATIVE=ON, or the explicit instruction sets without AMX on a CPU that has AMX."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return NO_AMX if "amx_int8" in flags.split() else ("-DGGML_NATIVE=ON",)


def setup(work: Path) -> None:
    """Create both venvs and build llama.cpp under `work`; what is already there is reused."""
    work.mkdir(parents=True, exist_ok=True)
    constraints = work / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    for name, packages in VENVS.items():
        if not (work / name / "bin" / "python").exists():
            run_logged([sys.executable, "-m", "venv", work / name])
        run_logged([work / name / "bin" / "pip", "install", "-c", constraints, *packages])
    src = work / "src"
    src.mkdir(exist_ok=True)
    if llama_source(work) is None:
        if not glob.glob(str(src / "llama_cpp_python-*.tar.gz")):
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", src])
        archive = sorted(glob.glob(str(src / "llama_cpp_python-*.tar.gz")))[-1]
        run_logged(["tar", "xzf", archive, "-C", src])
    build = work / "llama.cpp-build"
    # llama-server (`serving.py load`) needs no TLS and no web UI: without the last three options its
    # build links OpenSSL when present and downloads the UI's prebuilt assets
    run_logged(["cmake", "-S", llama_source(work), "-B", build, "-DCMAKE_BUILD_TYPE=Release", *cpu_options(),
                "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"])
    run_logged(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "llama-server",
                "llama-perplexity", "-j", "2"])
    log(f"setup done under {work}")
