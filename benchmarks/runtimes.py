"""edgegpt against other runtimes: the same weights through every peer (speed, time to first token, cold start,
memory, size), a real pretrained model through edgegpt's own commands, and decode speed on a GPU.

    python benchmarks/runtimes.py setup --work /tmp/peers           # once: the peers' venvs and the llama.cpp build
    python benchmarks/runtimes.py compare --checkpoint CHECKPOINT_DIR --work /tmp/peers [--rounds 3] [--json]
    python benchmarks/runtimes.py compare --preset base --work /tmp/peers     # random weights of a preset's shape
    python benchmarks/runtimes.py real-model [--model smollm2] [--work DIR] [--json]    # = real_model.py run
    python benchmarks/runtimes.py cuda [--preset small --preset base] [--runs 5]
    python benchmarks/runtimes.py COMMAND --smoke      # seconds, on a tiny random model; missing peers are skipped

The peers' parts live in benchmarks/peers/: setup.py (the venvs and the llama.cpp build), one driver per runtime
(edgegpt_runtime, transformers_eager, optimum_ort, genai, llamacpp: how its model is made, how it is run),
worker.py (the measurement inside each fresh process, `runtimes.py worker`), table.py (medians and ratios).
Figures, with the commands that gave them: docs/benchmarks.md.
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

from common import (
    REPO,
    SHAKESPEARE,
    SMOKE_PRESET,
    machine,
    random_checkpoint,
    random_model,
    scratch_dir,
    shakespeare_split,
    skip,
    smoke_kit,
    subcommands,
)
from peers import edgegpt_runtime, genai, llamacpp, optimum_ort, transformers_eager, worker
from peers.models import Models
from peers.processes import log
from peers.setup import setup as setup_peers
from peers.table import report
from peers.worker import PROMPT_TOKENS, TTFT_TOKENS

# -- setup --------------------------------------------------------------------------------------------------------


def setup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers"), help="venvs, builds, converted models")


def setup(args: argparse.Namespace) -> None:
    """Create the peers' virtual environments and build llama.cpp under --work (once; what is there is reused).

    What it runs (WORK = --work, REPO = this repository; nothing is downloaded at measurement time):

        echo "torch==2.13.0" > WORK/constraints.txt     # an unpinned torch pulls a CUDA build of several GB
        python -m venv WORK/venv-peers                    # the peers' runtimes, through edgegpt's [bench] extra
        WORK/venv-peers/bin/pip install -c WORK/constraints.txt torch==2.13.0 "REPO[bench]"
        python -m venv WORK/venv-builder                  # onnxruntime-genai's model builder needs transformers 5.x
        WORK/venv-builder/bin/pip install -c WORK/constraints.txt torch==2.13.0 "transformers>=5" onnx_ir onnx \\
            onnxruntime onnxruntime-genai
        cd WORK/src && pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
        cmake -S WORK/src/llama_cpp_python-*/vendor/llama.cpp -B WORK/llama.cpp-build -DCMAKE_BUILD_TYPE=Release \\
            -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF    # a CPU with AMX: the sets without AMX
        cmake --build WORK/llama.cpp-build --target llama-bench llama-quantize llama-server llama-perplexity -j 2

    (Why two venvs: optimum-onnx requires transformers<4.58; the genai 0.18 builder imports model classes only
    transformers 5.x has, and onnx_ir, which it does not declare; docs/benchmarks.md, "Running the peers".)"""
    if args.smoke:
        skip("setup", "it installs and builds the peers (minutes, and the network): nothing to smoke-test")
        return
    setup_peers(args.work.resolve())


# -- compare ------------------------------------------------------------------------------------------------------

# name, family, precision, python ("main" = this interpreter, "peers" = WORK/venv-peers, None = not Python)
RUNTIMES = (
    ("edgegpt fp32", "edgegpt", "fp32", "main"),
    ("edgegpt int8", "edgegpt", "int8", "main"),
    ("edgegpt int4", "edgegpt", "int4", "main"),
    ("PyTorch eager fp32", "torch", "fp32", "peers"),
    ("optimum fp32", "optimum", "fp32", "peers"),
    ("optimum int8 dynamic", "optimum", "int8", "peers"),
    ("onnxruntime-genai fp32", "genai", "fp32", "peers"),
    ("onnxruntime-genai int8", "genai", "int8", "peers"),
    ("onnxruntime-genai int4", "genai", "int4", "peers"),
    ("llama.cpp F32", "llamacpp", "fp32", None),
    ("llama.cpp Q8_0", "llamacpp", "int8", None),
    ("llama.cpp Q4_0", "llamacpp", "int4", None),
)
# family -> how its model is made from the checkpoint, and how a worker process runs it
PREPARE = {"edgegpt": edgegpt_runtime.prepare, "torch": transformers_eager.prepare, "optimum": optimum_ort.prepare,
           "genai": genai.prepare, "llamacpp": llamacpp.prepare}
RUNNERS = {"edgegpt": edgegpt_runtime.EdgegptRunner, "torch": transformers_eager.TorchRunner,
           "optimum": optimum_ort.OptimumRunner, "genai": genai.GenaiRunner}  # llama.cpp: its own llama-bench


def make_prompts(checkpoint: Path, path: Path) -> int:
    """Token ids of real text (the tinyshakespeare validation split when present) for every runtime; returns
    the long prompt's length."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    # the end of the held-out split (its last 100,000 characters), or any text when tinyshakespeare is not here
    text = shakespeare_split()[1][-100_000:] if SHAKESPEARE.exists() else (Path(__file__).read_text() * 4)
    ids = tokenizer.encode(text).ids
    config = json.loads((checkpoint / "config.json").read_text())
    ids = [i % config["vocab_size"] for i in ids]
    long_ = min(TTFT_TOKENS, config["max_len"] - 1)  # tiny test presets have a 256-token context
    path.write_text(json.dumps({"short": ids[:PROMPT_TOKENS], "long": ids[PROMPT_TOKENS:PROMPT_TOKENS + long_]}))
    return long_


def cached_random_checkpoint(preset: str, work: Path) -> Path:
    """A random-weight checkpoint of `preset`, kept under WORK so its converted models are reused."""
    directory = work / "models" / f"random-{preset}-checkpoint"
    if not (directory / "model.safetensors").exists():
        random_checkpoint(preset, directory)
    return directory


def measure_rounds(ready: list[tuple], models: Models, prompts: Path, ttft_tokens: int, args: argparse.Namespace):
    """Rounds interleave the runtimes (A B C … A B C …), one fresh process each: a noisy moment of this
    shared machine then hits every runtime alike. Returns every sample and each runtime's greedy tokens."""
    samples: dict[str, dict[str, list[float]]] = {}
    greedy: dict[str, list[int] | None] = {}
    for round_ in range(args.rounds):
        for name, family, _, python, path, _ in ready:
            if name in models.skipped:
                continue
            try:
                if family == "llamacpp":
                    result = llamacpp.measure(path, models.llama_build, args.threads, args.reps, ttft_tokens)
                else:
                    interpreter = Path(sys.executable) if python == "main" else models.peers_python
                    result = worker.measure(Path(__file__), family, path, interpreter, prompts, args.threads,
                                            args.reps)
            except Exception as e:
                models.skipped[name] = f"failed in round {round_ + 1}: {e}"
                log(f"SKIP {name}: {models.skipped[name]}")
                continue
            greedy[name] = result.pop("greedy", None)
            for key, values in result.items():
                samples.setdefault(name, {}).setdefault(key, []).extend(values)
            log(f"round {round_ + 1} {name}: decode {statistics.median(result['decode']):.0f} tok/s, "
                f"ttft {1000 * statistics.median(result['ttft_s']):.0f} ms, cold {result['cold_s'][0]:.2f} s, "
                f"rss {result['rss_mb'][0]:.0f} MB")
    return samples, greedy


def compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="an existing edgegpt checkpoint (nothing is trained here)")
    parser.add_argument("--preset", help="instead of --checkpoint: random weights of this preset's shape")
    parser.add_argument("--work", type=Path, default=None,
                        help="venvs, builds, converted models (default /tmp/peers; with --smoke a fresh folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one fresh process per runtime each")
    parser.add_argument("--reps", type=int, default=2, help="timed decode and TTFT runs per process")
    parser.add_argument("--only", nargs="*", help="measure only runtimes whose name contains one of these words")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def compare(args: argparse.Namespace) -> None:
    """edgegpt against its peers on the very same weights: decode speed, time to first token, cold start, memory, size.

    On a shared machine wrap both in `flock /tmp/edgegpt-cpu.lock …` so heavy jobs run one at a time.

    A run converts the checkpoint once (cached under WORK/models/): `edgegpt convert` to a Hugging
    Face LlamaForCausalLM directory, which every peer reads; edgegpt packages fp32/int8/int4 (`export_package`,
    gates off: `formats.py quantization` measures quality); optimum's ONNX export and its dynamic int8
    (ORTQuantizer, avx512_vnni); onnxruntime-genai's builder at fp32/int8/int4 (`-e cpu`); llama.cpp's
    convert_hf_to_gguf.py to F32, then llama-quantize to Q8_0 and Q4_0.

    Each runtime is measured in a fresh process per round, and rounds interleave the runtimes (A B C … A B C …),
    because on this kind of shared 2-core machine the same run moves a lot between passes (docs/benchmarks.md,
    "Noise"); the table shows medians, and small differences are noise. Per process: cold start (spawn →
    imports → load → first greedy token of the 32-token prompt); then one warm-up and `--reps` timed runs of
    decode tokens/s (a 32-token prompt, then 128 greedy tokens; the 128 steps after the first token are timed)
    and of time to first token after a 512-token prompt; peak RSS of the process (VmHWM). Batch 1, `--threads`
    intra-op threads everywhere, other thread-pool settings each runtime's own default (edgegpt turns spinning
    off; optimum's and onnxruntime-genai's sessions spin); KV caches sized to the longest request (edgegpt's and
    genai's max_length); EOS is ignored everywhere (128 tokens are always produced). Every runtime is
    fed the same token ids; llama.cpp is measured with its own llama-bench (`-p 512 -n 128 -d 32`: its
    TTFT@512 is 512 ÷ its prefill tokens/s, and its cold start is the wall time of a fresh
    `llama-bench -p 32 -n 0 -r 1 --no-warmup`).

    Peers that are missing (no venv, no build, an import or conversion that fails) are skipped with the
    reason printed; the table shows what ran.

    --smoke: the smoke kit's checkpoint, one round of one run, edgegpt's int4 by round-to-nearest, in a fresh
    --work unless one is given (so peers that were never set up there are skipped, each with its reason)."""
    if args.smoke:
        kit = smoke_kit(args.kit, scratch_dir("runtimes"))
        args.checkpoint = args.checkpoint or (None if args.preset else kit.checkpoint)
        args.work = args.work or scratch_dir("runtimes")
        args.rounds, args.reps = 1, 1
    work = (args.work or Path("/tmp/peers")).resolve()
    if not args.checkpoint and not args.preset:
        raise SystemExit("pass --checkpoint DIR (an existing checkpoint; nothing is trained) or --preset NAME")
    if args.checkpoint and not (args.checkpoint / "model.safetensors").exists():
        raise SystemExit(f"{args.checkpoint} is not an edgegpt checkpoint (no model.safetensors)")
    checkpoint = args.checkpoint or cached_random_checkpoint(args.preset, work)
    models = Models(checkpoint, work, args.threads)
    if args.smoke:  # seconds: a little calibration text, and int4 by round-to-nearest rather than GPTQ
        models.calibration, models.int4_rounding = kit.calibration, "rtn"
    prompts = models.root / "prompts.json"
    ttft_tokens = make_prompts(checkpoint, prompts)

    runtimes = [r for r in RUNTIMES if not args.only or any(w.lower() in r[0].lower() for w in args.only)]
    ready = []
    for name, family, precision, python in runtimes:
        try:
            t0 = time.perf_counter()
            path, size = models.prepare(family, precision, PREPARE[family])
            ready.append((name, family, precision, python, path, size))
            log(f"ready: {name} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # a peer that cannot be prepared is skipped, with the reason
            models.skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"
            log(f"SKIP {name}: {models.skipped[name]}")

    samples, greedy = measure_rounds(ready, models, prompts, ttft_tokens, args)
    report(args, checkpoint, ready, samples, greedy, models.skipped, ttft_tokens)


def worker_parser() -> argparse.ArgumentParser:
    """The measuring process `compare` spawns (this file again, in the runtime's interpreter): peers/worker.py."""
    parser = argparse.ArgumentParser(prog="runtimes.py worker")
    parser.add_argument("family", choices=tuple(RUNNERS))
    parser.add_argument("--model")
    parser.add_argument("--prompts")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--spawned", type=float)
    return parser


# -- real-model: an alias of real_model.py run --------------------------------------------------------------


def real_model_options(parser: argparse.ArgumentParser) -> None:
    import real_model

    real_model.run_options(parser)


def real_model(args: argparse.Namespace) -> None:
    """Real pretrained models through edgegpt's own commands: `real_model.py run` (see its --help), kept here
    under its old name. Without --model, SmolLM2-135M-Instruct alone, as this command always ran."""
    import real_model as module

    args.model = args.model or ["smollm2"]
    module.run(args)


# -- cuda ---------------------------------------------------------------------------------------------------------

PROMPT = 32


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
    edgegpt = sys.modules.get("edgegpt") or load_package("edgegpt", REPO / "edgegpt")
    for name in ("runtime", "export"):  # the runtime first: the exporter imports it, never the other way round
        if f"edgegpt.{name}" in sys.modules:
            continue
        try:
            importlib.import_module(f"edgegpt.{name}")
        except ImportError:
            setattr(edgegpt, name, load_package(f"edgegpt.{name}", REPO / name))


def torch_decode(model, device: str, dtype, runs: int, new: int) -> float:
    import torch

    model = model.to(device=device, dtype=dtype)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> float:
        with torch.no_grad():
            logits, cache = model.forward_cached(prompt)
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(new):
                logits, cache = model.forward_cached(token, cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
        return new / (time.perf_counter() - t0)

    once()
    return statistics.median(once() for _ in range(runs))


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def edgegpt_decode(package: Path, provider: str, runs: int, new: int) -> float:
    import numpy as np

    from edgegpt.runtime import Generator

    generator = Generator.load(package, provider=provider)
    assert generator.provider == provider, f"asked for {provider}, got {generator.provider}"
    prompt = np.random.default_rng(0).integers(0, generator.config.vocab_size, PROMPT).tolist()

    def once() -> float:
        logits, cache = generator.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(new):
            logits, cache = generator.decode_step(int(np.argmax(logits)), cache)
        return new / (time.perf_counter() - t0)

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


def bench_preset(preset: str, device: str, runs: int, work: Path, new: int) -> dict:
    import torch

    model, tokenizer = random_model(preset)
    precision = "float16" if device == "cuda" else "float32"  # the CPU provider refuses float16 packages
    package = export(model, tokenizer, work / preset, precision)
    row = {"preset": preset, "device": device, "parameters": model.num_parameters()}
    try:
        row[f"edgegpt {precision}"] = edgegpt_decode(package, device, runs, new)
    except Exception as e:  # e.g. onnxruntime without the CUDA provider: still measure PyTorch
        row[f"edgegpt {precision}"] = None
        print(f"edgegpt on {device} not measured: {e}", file=sys.stderr)
    row["torch eager fp32"] = torch_decode(model, device, torch.float32, runs, new)
    row["torch eager bf16"] = torch_decode(model, device, torch.bfloat16, runs, new)
    return row


def cuda_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", action="append", help="repeatable; default: small and base")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens after the prompt")
    parser.add_argument("--json", action="store_true")


def cuda(args: argparse.Namespace) -> None:
    """GPU decode speed: edgegpt's float16 package on onnxruntime's CUDA provider vs PyTorch eager.

    Random weights (speed only), batch 1, a 32-token prompt, then 128 greedy new tokens; decode tokens/s
    counts the 128 decode steps. PyTorch eager runs GPT.forward_cached (its KV cache grows by concatenation)
    under torch.no_grad in float32 and bfloat16; edgegpt runs the package through its own Generator (the
    static cache in place, IO binding). Each row is the median of --runs after one warm-up run.
    Runs from a checkout without installing edgegpt (the GPU host has torch, onnx and onnxruntime-gpu only).
    `--device cpu` measures the same on the CPU (a float32 package: the CPU provider refuses float16).

    --smoke: `--device cpu` unless given, the smallest preset, one run of 16 tokens."""
    if args.smoke:
        if "--device" not in sys.argv:
            args.device = "cpu"
        args.preset, args.runs, args.new_tokens = args.preset or [SMOKE_PRESET], 1, 16
    import_edgegpt()
    if args.device == "cuda":
        import onnxruntime as ort
        import torch

        if hasattr(ort, "preload_dlls"):  # use the CUDA/cuDNN libraries torch's wheels brought
            ort.preload_dlls()
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, onnxruntime {ort.__version__} "
              f"(providers: {', '.join(ort.get_available_providers())})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edgegpt-cuda-decode-") as tmp:
        rows = [bench_preset(p, args.device, args.runs, Path(tmp), args.new_tokens)
                for p in args.preset or ["small", "base"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    columns = [k for k in rows[0] if k not in ("preset", "device", "parameters")]
    print(f"decode tokens/s, batch 1, {PROMPT}-token prompt, {args.new_tokens} greedy tokens, median of {args.runs}; "
          f"{machine()}")
    print(f"{'preset':8} {'params':>8} " + " ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = " ".join(f"{row[c]:>18,.0f}" if row[c] is not None else f"{'n/a':>18}" for c in columns)
        print(f"{row['preset']:8} {row['parameters'] / 1e6:>7.1f}M {cells}")


COMMANDS = {
    "setup": (setup_options, setup),
    "compare": (compare_options, compare),
    "real-model": (real_model_options, real_model),
    "cuda": (cuda_options, cuda),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # a measuring process of `compare`: kept out of the help, and light
        args = worker_parser().parse_args(argv[1:])
        return worker.run(args, RUNNERS[args.family])
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
