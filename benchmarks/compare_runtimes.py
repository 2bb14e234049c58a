"""edgegpt against its peers on the very same weights: decode speed, time to first token, cold start, memory, size.

    python benchmarks/compare_runtimes.py --setup --work /tmp/peers           # once: venvs and the llama.cpp build
    python benchmarks/compare_runtimes.py --checkpoint CHECKPOINT_DIR --work /tmp/peers [--rounds 3] [--json]
    python benchmarks/compare_runtimes.py --preset base --work /tmp/peers     # random weights of a preset's shape

On a shared machine wrap both in `flock /tmp/edgegpt-cpu.lock …` so heavy jobs run one at a time.
What --setup runs (WORK = --work, REPO = this repository; nothing is downloaded at measurement time):

    echo "torch==2.13.0" > WORK/constraints.txt     # an unpinned torch pulls a CUDA build of several GB
    python -m venv WORK/venv-peers                    # the peers' runtimes, through edgegpt's [bench] extra
    WORK/venv-peers/bin/pip install -c WORK/constraints.txt torch==2.13.0 "REPO[bench]"
    python -m venv WORK/venv-builder                  # onnxruntime-genai's model builder needs transformers 5.x
    WORK/venv-builder/bin/pip install -c WORK/constraints.txt torch==2.13.0 "transformers>=5" onnx_ir onnx \\
        onnxruntime onnxruntime-genai
    cd WORK/src && pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S WORK/src/llama_cpp_python-*/vendor/llama.cpp -B WORK/llama.cpp-build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build WORK/llama.cpp-build --target llama-bench llama-quantize -j 2      # ≈ 5–7 min on 2 cores

(Why two venvs: optimum-onnx requires transformers<4.58; the genai 0.18 builder imports model classes only
transformers 5.x has, and onnx_ir, which it does not declare. See ../shared/BENCHMARK-NOTES.md.)

A measurement run converts the checkpoint once (cached under WORK/models/): `edgegpt convert` to a Hugging
Face LlamaForCausalLM directory, which every peer reads; edgegpt packages fp32/int8/int4 (`export_package`,
gates off: benchmarks/quantization.py measures quality); optimum's ONNX export and its dynamic int8
(ORTQuantizer, avx512_vnni); onnxruntime-genai's builder at fp32/int8/int4 (`-e cpu`); llama.cpp's
convert_hf_to_gguf.py to F32, then llama-quantize to Q8_0 and Q4_0.

Each runtime is measured in a fresh process per round, and rounds interleave the runtimes (A B C … A B C …),
because on this kind of shared 2-core machine the same run moves by up to ±20% between passes; the table
shows medians, and differences under ~15% are noise. Per process: cold start (spawn → imports → load →
first greedy token of the 32-token prompt); then one warm-up and `--reps` timed runs of decode tokens/s
(a 32-token prompt, then 128 greedy tokens; the 128 steps after the first token are timed) and of time to
first token after a 512-token prompt; peak RSS of the process (VmHWM). Batch 1, `--threads`
intra-op threads everywhere, other thread-pool settings each runtime's own default (edgegpt turns spinning
off; optimum's and onnxruntime-genai's sessions spin); KV caches sized to the longest request (edgegpt's and
genai's max_length); EOS is ignored everywhere (128 tokens are always produced). Every runtime is
fed the same token ids; llama.cpp is measured with its own llama-bench (`-p 512 -n 128 -d 32`: its
TTFT@512 is 512 ÷ its prefill tokens/s, and its cold start is the wall time of a fresh
`llama-bench -p 32 -n 0 -r 1 --no-warmup`).

Peers that are missing (no venv, no build, an import or conversion that fails) are skipped with the
reason printed; the table shows what ran.

The parts live in benchmarks/peers/: setup.py (the venvs and the llama.cpp build), one driver per runtime
(edgegpt_runtime, transformers_eager, optimum_ort, genai, llamacpp: how its model is made, how it is run),
worker.py (the measurement inside each fresh process), table.py (medians and ratios). This file holds the
list of runtimes and the interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import SHAKESPEARE, random_checkpoint
from peers import edgegpt_runtime, genai, llamacpp, optimum_ort, transformers_eager, worker
from peers.models import Models
from peers.processes import log
from peers.setup import setup
from peers.table import report
from peers.worker import PROMPT_TOKENS, TTFT_TOKENS

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
    text = SHAKESPEARE.read_text()[-100_000:] if SHAKESPEARE.exists() else (Path(__file__).read_text() * 4)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an existing edgegpt checkpoint (nothing is trained here)")
    parser.add_argument("--preset", help="instead of --checkpoint: random weights of this preset's shape")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers"), help="venvs, builds, converted models")
    parser.add_argument("--setup", action="store_true", help="create the peer venvs and build llama.cpp, then exit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one fresh process per runtime each")
    parser.add_argument("--reps", type=int, default=2, help="timed decode and TTFT runs per process")
    parser.add_argument("--only", nargs="*", help="measure only runtimes whose name contains one of these words")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    # the worker process (this script again, in the runtime's interpreter): see peers/worker.py
    parser.add_argument("--worker", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker.run(args, RUNNERS[args.worker])
    work = args.work.resolve()
    if args.setup:
        return setup(work)
    if not args.checkpoint and not args.preset:
        parser.error("pass --checkpoint DIR (an existing checkpoint; nothing is trained) or --preset NAME")
    if args.checkpoint and not (args.checkpoint / "model.safetensors").exists():
        parser.error(f"{args.checkpoint} is not an edgegpt checkpoint (no model.safetensors)")
    checkpoint = args.checkpoint or cached_random_checkpoint(args.preset, work)
    models = Models(checkpoint, work, args.threads)
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


if __name__ == "__main__":
    main()
