"""GPU decode speed: edgegpt's float16 package on onnxruntime's CUDA provider vs PyTorch eager.

    python benchmarks/cuda_decode.py                       # small and base on the GPU (onnxruntime-gpu, torch CUDA)
    python benchmarks/cuda_decode.py --device cpu --preset nano   # smoke test anywhere (float32 package)

Random weights (speed only), batch 1, a 32-token prompt, then 128 greedy new tokens; decode tokens/s
counts the 128 decode steps. PyTorch eager runs GPT.forward_cached (its KV cache grows by concatenation)
under torch.no_grad in float32 and bfloat16; edgegpt runs the package through its own Generator (the
static cache in place, IO binding). Each row is the median of --runs after one warm-up run.
Runs from a checkout without installing edgegpt (the GPU host has torch, onnx and onnxruntime-gpu only).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import random_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEW = 32, 128


def load_package(name: str, folder: Path):
    """Import the package in `folder` as `name` (its subpackages resolve through its own __path__)."""
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_edgegpt() -> None:
    """This checkout's edgegpt, installed or not: edgegpt.export / edgegpt.runtime live in export/ and
    runtime/ (pyproject's package-dir), so they are mapped too. Loaded by file location rather than by
    putting the checkout on sys.path, which would also expose its other top-level folders as modules."""
    edgegpt = sys.modules.get("edgegpt") or load_package("edgegpt", ROOT / "edgegpt")
    for name in ("runtime", "export"):  # the runtime first: the exporter imports it, never the other way round
        if f"edgegpt.{name}" in sys.modules:
            continue
        try:
            importlib.import_module(f"edgegpt.{name}")
        except ImportError:
            setattr(edgegpt, name, load_package(f"edgegpt.{name}", ROOT / name))


def torch_decode(model, device: str, dtype, runs: int) -> float:
    import torch

    model = model.to(device=device, dtype=dtype)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> float:
        with torch.no_grad():
            logits, cache = model.forward_cached(prompt)
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(NEW):
                logits, cache = model.forward_cached(token, cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
        return NEW / (time.perf_counter() - t0)

    once()
    return statistics.median(once() for _ in range(runs))


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def edgegpt_decode(package: Path, provider: str, runs: int) -> float:
    import numpy as np

    from edgegpt.runtime import Generator

    generator = Generator.load(package, provider=provider)
    assert generator.provider == provider, f"asked for {provider}, got {generator.provider}"
    prompt = np.random.default_rng(0).integers(0, generator.config.vocab_size, PROMPT).tolist()

    def once() -> float:
        logits, cache = generator.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(NEW):
            logits, cache = generator.decode_step(int(np.argmax(logits)), cache)
        return NEW / (time.perf_counter() - t0)

    once()
    return statistics.median(once() for _ in range(runs))


def export(model, tokenizer, directory: Path, precision: str) -> Path:
    """The fused graph in `precision` with the package files the Generator reads (no gates, no scoring)."""
    from edgegpt.core.formats import MODEL
    from edgegpt.export.package import build_graph
    from edgegpt.export.writer import write_package_metadata

    directory.mkdir(parents=True)
    contract = build_graph(model.float().cpu(), directory / MODEL, True, precision)
    write_package_metadata(directory, cfg=model.cfg, tokenizer=tokenizer, graph=contract)
    return directory


def bench_preset(preset: str, device: str, runs: int, work: Path) -> dict:
    import torch

    model, tokenizer = random_model(preset)
    precision = "float16" if device == "cuda" else "float32"  # the CPU provider refuses float16 packages
    package = export(model, tokenizer, work / preset, precision)
    row = {"preset": preset, "device": device, "parameters": model.num_parameters()}
    try:
        row[f"edgegpt {precision}"] = edgegpt_decode(package, device, runs)
    except Exception as e:  # e.g. onnxruntime without the CUDA provider: still measure PyTorch
        row[f"edgegpt {precision}"] = None
        print(f"edgegpt on {device} not measured: {e}", file=sys.stderr)
    row["torch eager fp32"] = torch_decode(model, device, torch.float32, runs)
    row["torch eager bf16"] = torch_decode(model, device, torch.bfloat16, runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", action="append", help="repeatable; default: small and base")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import_edgegpt()
    if args.device == "cuda":
        import onnxruntime as ort
        import torch

        if hasattr(ort, "preload_dlls"):  # use the CUDA/cuDNN libraries torch's wheels brought
            ort.preload_dlls()
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, onnxruntime {ort.__version__} "
              f"(providers: {', '.join(ort.get_available_providers())})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edgegpt-cuda-decode-") as tmp:
        rows = [bench_preset(p, args.device, args.runs, Path(tmp)) for p in args.preset or ["small", "base"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    columns = [k for k in rows[0] if k not in ("preset", "device", "parameters")]
    print(f"decode tokens/s, batch 1, {PROMPT}-token prompt, {NEW} greedy tokens, median of {args.runs}")
    print(f"{'preset':8} {'params':>8} " + " ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = " ".join(f"{row[c]:>18,.0f}" if row[c] is not None else f"{'n/a':>18}" for c in columns)
        print(f"{row['preset']:8} {row['parameters'] / 1e6:>7.1f}M {cells}")


if __name__ == "__main__":
    main()
