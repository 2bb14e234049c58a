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
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS, TTFT_TOKENS = 32, 128, 512
CHECK_TOKENS = 16  # greedy tokens compared with edgegpt fp32, to show every runtime runs the same model
HERE = Path(__file__).resolve().parent

# name, family, precision, python ("main" = this interpreter, "peers" = WORK/venv-peers)
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
GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# worker: runs inside the runtime's own interpreter; imports only what that runtime needs
# ---------------------------------------------------------------------------------------------------


class _Runner:
    """first(ids) -> (token, state) and step(token, state) -> (token, state): greedy, EOS ignored."""

    def first(self, ids):
        raise NotImplementedError

    def step(self, token, state):
        raise NotImplementedError

    def decode(self, ids: list[int], n: int) -> float:
        token, state = self.first(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            token, state = self.step(token, state)
        return n / (time.perf_counter() - t0)

    def ttft(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.first(ids)
        return time.perf_counter() - t0

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """The first n greedy tokens: shows that every runtime runs the same model."""
        token, state = self.first(ids)
        tokens = [token]
        while len(tokens) < n:
            token, state = self.step(token, state)
            tokens.append(token)
        return tokens


class _Edgegpt(_Runner):
    def __init__(self, path: str, threads: int, max_length: int):
        import numpy as np

        from edgegpt.runtime import Generator

        self.np = np
        # The static cache is sized to the longest request, as onnxruntime-genai's is (its max_length).
        self.generator = Generator.load(path, provider="cpu", threads=threads, max_length=max_length)

    def first(self, ids):
        logits, cache = self.generator.prefill(list(ids))
        return int(self.np.argmax(logits)), cache

    def step(self, token, cache):
        logits, cache = self.generator.decode_step(token, cache)
        return int(self.np.argmax(logits)), cache


class _Torch(_Runner):
    """transformers' LlamaForCausalLM, eager (SDPA attention), its DynamicCache, a plain greedy loop."""

    def __init__(self, path: str, threads: int, max_length: int):
        import torch

        torch.set_num_threads(threads)
        from transformers import LlamaForCausalLM

        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def first(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def step(self, token, past):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([[token]]), past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values


class _Optimum(_Runner):
    """ORTModelForCausalLM through `generate` (how its users run it), timed by a streamer."""

    def __init__(self, path: str, threads: int, max_length: int):
        import onnxruntime as ort
        import torch

        torch.set_num_threads(threads)
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        file_name = "model_quantized.onnx" if Path(path, "model_quantized.onnx").exists() else "model.onnx"
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(path, file_name=file_name, session_options=options,
                                                         provider="CPUExecutionProvider")

    def _generate(self, ids, n):
        stamps = []

        class Streamer:
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        input_ids = self.torch.tensor([ids])
        t0 = time.perf_counter()
        self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, streamer=Streamer(), pad_token_id=0)
        return t0, stamps[1:]  # the first put() is the prompt

    def decode(self, ids, n):
        _, stamps = self._generate(ids, n + 1)
        return n / (stamps[-1] - stamps[0])

    def ttft(self, ids):
        t0, stamps = self._generate(ids, 1)
        return stamps[0] - t0

    def first(self, ids):
        self._generate(ids, 1)
        return None, None

    def greedy(self, ids, n):
        input_ids = self.torch.tensor([ids])
        out = self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        return [int(t) for t in out[0, len(ids):]]


class _Genai(_Runner):
    def __init__(self, path: str, threads: int, max_length: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(path)

    def _generator(self, ids, new):
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + new  # min_length too: EOS ignored, like everywhere else
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def decode(self, ids, n):
        generator = self._generator(ids, n + 1)
        generator.generate_next_token()  # the first token comes from the prompt's logits
        t0 = time.perf_counter()
        for _ in range(n):
            generator.generate_next_token()
        return n / (time.perf_counter() - t0)

    def ttft(self, ids):
        t0 = time.perf_counter()
        generator = self._generator(ids, 1)
        generator.generate_next_token()
        return time.perf_counter() - t0

    def first(self, ids):
        generator = self._generator(ids, 1)
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0]), generator

    def greedy(self, ids, n):
        generator, tokens = self._generator(ids, n), []
        while len(tokens) < n:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens


WORKERS = {"edgegpt": _Edgegpt, "torch": _Torch, "optimum": _Optimum, "genai": _Genai}


def worker(args: argparse.Namespace) -> None:
    prompts = json.loads(Path(args.prompts).read_text())
    short, long_ = prompts["short"], prompts["long"]
    longest = max(len(long_) + 1, len(short) + NEW_TOKENS + 1, len(short) + CHECK_TOKENS)
    runner = WORKERS[args.worker](args.model, args.threads, longest)
    runner.first(short)
    cold = time.time() - args.spawned
    runner.decode(short, NEW_TOKENS)  # warm-up: allocation, page faults, caches
    runner.ttft(long_)
    decode, ttft = [], []
    for _ in range(args.reps):
        decode.append(runner.decode(short, NEW_TOKENS))
        ttft.append(runner.ttft(long_))
    result = {"cold_s": cold, "decode": decode, "ttft_s": ttft, "rss_mb": peak_rss_mb("self"),
              "greedy": runner.greedy(short, CHECK_TOKENS)}
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss_mb(pid) -> float:
    """VmHWM: the peak resident set of the process's current image. (wait4's ru_maxrss would do for a
    child, but Linux carries the pre-exec high-water mark over exec, i.e. the parent's size at fork.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------------
# setup: venvs and the llama.cpp build under WORK
# ---------------------------------------------------------------------------------------------------


def _run(command: list[str], **kwargs) -> None:
    log("$ " + " ".join(map(str, command)))
    subprocess.run(list(map(str, command)), check=True, **kwargs)


def llama_source(work: Path) -> Path | None:
    found = sorted(glob.glob(str(work / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    return Path(found[-1]) if found else None


def setup(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    constraints = work / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    venvs = {
        # the peers through edgegpt's [bench] extra (edgegpt itself is measured with this interpreter)
        "venv-peers": ["torch==2.13.0", f"{HERE.parent}[bench]"],
        "venv-builder": ["torch==2.13.0", "transformers>=5", "onnx_ir", "onnx", "onnxruntime", "onnxruntime-genai"],
    }
    for name, packages in venvs.items():
        if not (work / name / "bin" / "python").exists():
            _run([sys.executable, "-m", "venv", work / name])
        _run([work / name / "bin" / "pip", "install", "-c", constraints, *packages])
    src = work / "src"
    src.mkdir(exist_ok=True)
    if llama_source(work) is None:
        if not glob.glob(str(src / "llama_cpp_python-*.tar.gz")):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
                  "-d", src])
        archive = sorted(glob.glob(str(src / "llama_cpp_python-*.tar.gz")))[-1]
        _run(["tar", "xzf", archive, "-C", src])
    build = work / "llama.cpp-build"
    _run(["cmake", "-S", llama_source(work), "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"])
    _run(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "-j", "2"])
    log(f"setup done under {work}")


# ---------------------------------------------------------------------------------------------------
# preparing every runtime's model from one checkpoint (cached under WORK/models/)
# ---------------------------------------------------------------------------------------------------


def files_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def model_label(checkpoint: Path) -> str:
    weights = checkpoint / "model.safetensors"
    digest = hashlib.sha256(f"{checkpoint.resolve()}:{weights.stat().st_mtime_ns}:{weights.stat().st_size}".encode())
    return f"{checkpoint.resolve().parent.name}-{digest.hexdigest()[:10]}"


class Models:
    """Where each runtime's model lives and how big its weights are; builds what is missing."""

    def __init__(self, checkpoint: Path, work: Path, threads: int):
        self.checkpoint, self.work, self.threads = checkpoint, work, threads
        self.root = work / "models" / model_label(checkpoint)
        self.root.mkdir(parents=True, exist_ok=True)
        self.peers_python = work / "venv-peers" / "bin" / "python"
        self.builder_python = work / "venv-builder" / "bin" / "python"
        self.llama_build = work / "llama.cpp-build" / "bin"
        self.skipped: dict[str, str] = {}
        self.cache: dict[str, tuple[Path, int]] = {}  # name -> (model path, bytes of its weights)

    def _once(self, directory: Path, build) -> Path:
        """Build `directory` unless a previous run finished it (marked by a .done file)."""
        done = directory / ".done"
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            build(directory)
            done.write_text("")
        return directory

    def hf(self) -> Path:
        def build(out: Path) -> None:
            from edgegpt.convert import convert

            convert(self.checkpoint, out)
        return self._once(self.root / "hf", build)

    def prepare(self, name: str, family: str, precision: str) -> tuple[Path, int]:
        key = f"{family}-{precision}"
        if key not in self.cache:
            self.cache[key] = getattr(self, f"_{family}")(precision)
        return self.cache[key]

    def _edgegpt(self, precision: str):
        def build(out: Path) -> None:
            from edgegpt.export.package import export_package

            quantize = precision != "fp32"
            export_package(self.checkpoint, out / "model", quantize=quantize,
                           bits=int(precision[3:]) if quantize else 8, gate=False)
        directory = self._once(self.root / f"edgegpt-{precision}", build) / "model"
        return directory, files_size(directory.glob("model.onnx*"))

    def _torch(self, precision: str):
        self._need_peers()
        hf = self.hf()
        return hf, files_size(hf.glob("*.safetensors"))

    def _need_peers(self) -> None:
        if not self.peers_python.exists():
            raise RuntimeError(f"{self.peers_python} is missing: run with --setup")

    def _optimum(self, precision: str):
        self._need_peers()
        hf = self.hf()

        def export(out: Path) -> None:
            code = ("import sys; from optimum.onnxruntime import ORTModelForCausalLM; "
                    "ORTModelForCausalLM.from_pretrained(sys.argv[1], export=True).save_pretrained(sys.argv[2])")
            _run([self.peers_python, "-c", code, hf, out])
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(hf / name, out / name)

        fp32 = self._once(self.root / "optimum-fp32", export)
        if precision == "fp32":
            return fp32, files_size(fp32.glob("model.onnx*"))

        def quantize(out: Path) -> None:
            code = ("import sys; from optimum.onnxruntime import ORTQuantizer; "
                    "from optimum.onnxruntime.configuration import AutoQuantizationConfig; "
                    "q = ORTQuantizer.from_pretrained(sys.argv[1], file_name='model.onnx'); "
                    "q.quantize(save_dir=sys.argv[2], "
                    "quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))")
            _run([self.peers_python, "-c", code, fp32, out])
            for path in fp32.iterdir():
                if not path.name.startswith("model.onnx") and not (out / path.name).exists():
                    shutil.copy(path, out / path.name)

        int8 = self._once(self.root / "optimum-int8", quantize)
        return int8, files_size(int8.glob("model_quantized.onnx*"))

    def _genai(self, precision: str):
        self._need_peers()
        if not self.builder_python.exists():
            raise RuntimeError(f"{self.builder_python} is missing: run with --setup")
        hf = self.hf()

        def build(out: Path) -> None:
            _run([self.builder_python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out,
                  "-p", precision, "-e", "cpu", "-c", self.root / "genai-cache"])
            config_path = out / "genai_config.json"
            config = json.loads(config_path.read_text())
            options = config["model"]["decoder"].setdefault("session_options", {})
            options["intra_op_num_threads"] = self.threads
            config_path.write_text(json.dumps(config, indent=2))
        directory = self._once(self.root / f"genai-{precision}", build)
        return directory, files_size(directory.glob("model.onnx*"))

    def _llamacpp(self, precision: str):
        source = llama_source(self.work)
        bench, quantize = self.llama_build / "llama-bench", self.llama_build / "llama-quantize"
        if source is None or not bench.exists() or not quantize.exists():
            raise RuntimeError(f"llama.cpp is not built under {self.work}: run with --setup")
        self._need_peers()
        hf = self.hf()
        gguf_dir = self.root / "gguf"
        f32 = gguf_dir / "model-F32.gguf"
        if not f32.exists():
            gguf_dir.mkdir(exist_ok=True)
            # Our tokenizer is a byte-level BPE with GPT-2's pre-tokenizer regex, but convert_hf_to_gguf.py
            # recognises pre-tokenizers by hashing a known vocabulary's output and refuses ours; tell it
            # "gpt-2", which is what ours is. Speed does not depend on it: llama-bench feeds token ids.
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import convert_hf_to_gguf as c, conversion.base as b; "
                    "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
                    "sys.argv = ['convert_hf_to_gguf.py', sys.argv[2], '--outtype', 'f32', '--outfile', sys.argv[3]]; "
                    "c.main()")
            _run([self.peers_python, "-c", code, source, hf, f"{f32}.tmp"])
            os.replace(f"{f32}.tmp", f32)
        path = gguf_dir / f"model-{GGUF_TYPES[precision]}.gguf"
        if not path.exists():
            _run([quantize, f32, f"{path}.tmp", GGUF_TYPES[precision]], stdout=subprocess.DEVNULL)
            os.replace(f"{path}.tmp", path)
        return path, path.stat().st_size


# ---------------------------------------------------------------------------------------------------
# measuring: one fresh process per runtime per round
# ---------------------------------------------------------------------------------------------------


def spawn(command: list[str], timeout: float = 900) -> tuple[str, float, float]:
    """Run a fresh process: (stdout, wall seconds, its peak RSS in MB, read from /proc while it runs)."""
    import selectors

    start_perf = time.perf_counter()
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = {"out": [], "err": []}
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "out")
    selector.register(process.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    deadline = time.monotonic() + timeout
    rss = 0.0
    while open_streams:
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"timed out after {timeout:.0f} s")
        try:
            rss = max(rss, peak_rss_mb(process.pid))
        except (OSError, ValueError):  # exited, or a zombie without a memory map
            pass
        for key, _ in selector.select(timeout=0.02):
            line = key.fileobj.readline()
            if line:
                chunks[key.data].append(line)
            else:
                selector.unregister(key.fileobj)
                open_streams -= 1
    process.wait()
    wall = time.perf_counter() - start_perf
    if process.returncode != 0:
        tail = "".join(chunks["err"]).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {process.returncode}: {tail[0][:300]}")
    return "".join(chunks["out"]), wall, rss


def measure_python(name: str, family: str, model: Path, python: Path, prompts: Path, threads: int, reps: int) -> dict:
    # Cold start counts from --spawned, stamped just before the process is created.
    command = [python, __file__, "--worker", family, "--model", model, "--prompts", prompts,
               "--threads", threads, "--reps", reps, "--spawned", repr(time.time())]
    stdout, _, _ = spawn(command)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {"cold_s": [result["cold_s"]], "decode": result["decode"], "ttft_s": result["ttft_s"],
            "rss_mb": [result["rss_mb"]], "greedy": result["greedy"]}


def measure_llamacpp(model: Path, build: Path, threads: int, reps: int, ttft_tokens: int) -> dict:
    bench = build / "llama-bench"
    _, cold, _ = spawn([bench, "-m", model, "-t", threads, "-p", PROMPT_TOKENS, "-n", 0, "-r", 1, "--no-warmup"])
    stdout, _, rss = spawn([bench, "-m", model, "-t", threads, "-p", ttft_tokens, "-n", NEW_TOKENS,
                                "-d", PROMPT_TOKENS, "-r", reps, "-o", "json"])
    rows = json.loads(stdout)
    prefill = next(r for r in rows if r["n_prompt"] == ttft_tokens)
    decode = next(r for r in rows if r["n_gen"] == NEW_TOKENS)
    return {"cold_s": [cold], "decode": decode.get("samples_ts") or [decode["avg_ts"]],
            "ttft_s": [ttft_tokens / ts for ts in (prefill.get("samples_ts") or [prefill["avg_ts"]])],
            "rss_mb": [rss]}


def make_prompts(checkpoint: Path, path: Path) -> None:
    """Token ids of real text (the tinyshakespeare validation split when present) for every runtime."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(HERE))
    from common import SHAKESPEARE

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    text = SHAKESPEARE.read_text()[-100_000:] if SHAKESPEARE.exists() else (Path(__file__).read_text() * 4)
    ids = tokenizer.encode(text).ids
    config = json.loads((checkpoint / "config.json").read_text())
    ids = [i % config["vocab_size"] for i in ids]
    long_ = min(TTFT_TOKENS, config["max_len"] - 1)  # tiny test presets have a 256-token context
    path.write_text(json.dumps({"short": ids[:PROMPT_TOKENS], "long": ids[PROMPT_TOKENS:PROMPT_TOKENS + long_]}))
    return long_


def random_checkpoint(preset: str, work: Path) -> Path:
    directory = work / "models" / f"random-{preset}-checkpoint"
    if not (directory / "model.safetensors").exists():
        sys.path.insert(0, str(HERE))
        from quantization import random_checkpoint as make

        make(preset, directory)
    return directory


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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = args.work.resolve()
    if args.setup:
        return setup(work)
    if not args.checkpoint and not args.preset:
        parser.error("pass --checkpoint DIR (an existing checkpoint; nothing is trained) or --preset NAME")
    if args.checkpoint and not (args.checkpoint / "model.safetensors").exists():
        parser.error(f"{args.checkpoint} is not an edgegpt checkpoint (no model.safetensors)")
    sys.path.insert(0, str(HERE))
    checkpoint = args.checkpoint or random_checkpoint(args.preset, work)
    models = Models(checkpoint, work, args.threads)
    prompts = models.root / "prompts.json"
    ttft_tokens = make_prompts(checkpoint, prompts)

    runtimes = [r for r in RUNTIMES if not args.only or any(w.lower() in r[0].lower() for w in args.only)]
    ready = []
    for name, family, precision, python in runtimes:
        try:
            t0 = time.perf_counter()
            path, size = models.prepare(name, family, precision)
            ready.append((name, family, precision, python, path, size))
            log(f"ready: {name} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # a peer that cannot be prepared is skipped, with the reason
            models.skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"
            log(f"SKIP {name}: {models.skipped[name]}")

    samples: dict[str, dict[str, list[float]]] = {}
    greedy: dict[str, list[int] | None] = {}
    for round_ in range(args.rounds):
        for name, family, precision, python, path, size in ready:
            if name in models.skipped:
                continue
            try:
                if family == "llamacpp":
                    result = measure_llamacpp(path, models.llama_build, args.threads, args.reps, ttft_tokens)
                else:
                    interpreter = Path(sys.executable) if python == "main" else models.peers_python
                    result = measure_python(name, family, path, interpreter, prompts, args.threads, args.reps)
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
    report(args, checkpoint, ready, samples, greedy, models.skipped, ttft_tokens)


def report(args, checkpoint, ready, samples, greedy, skipped, ttft_tokens) -> None:
    from rich.console import Console
    from rich.table import Table

    from common import machine

    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    sizes = {name: size for name, _, _, _, _, size in ready}
    ours = {precision: f"edgegpt {precision}" for precision in ("fp32", "int8", "int4")}
    title = f"runtimes on the same weights: {checkpoint}" + (f" (random {args.preset})" if args.preset else "")
    caption = (f"{machine()}; batch 1, {args.threads} threads; decode: {PROMPT_TOKENS}-token prompt then "
               f"{NEW_TOKENS} greedy tokens; TTFT after a {ttft_tokens}-token prompt; cold: fresh process to the "
               f"first token; medians of {args.rounds} interleaved rounds × {args.reps} runs. "
               "× edgegpt: edgegpt's advantage over the peer at the same precision (>1: edgegpt better); "
               f"greedy: how many of the first {CHECK_TOKENS} greedy tokens equal edgegpt fp32's; "
               "differences under ~15% are noise on this machine.")
    table = Table(title=title, caption=caption)
    columns = ("runtime", "size MB", "decode tok/s", "× edgegpt", f"TTFT@{ttft_tokens} ms", "× edgegpt", "cold start s",
               "× edgegpt", "peak RSS MB", "× edgegpt", "greedy")
    for column in columns:
        table.add_column(column, justify="left" if column == "runtime" else "right")
    figures = {"machine": machine(), "checkpoint": str(checkpoint), "threads": args.threads, "rounds": args.rounds,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "ttft_tokens": ttft_tokens,
               "reps": args.reps, "runtimes": {}, "skipped": skipped}

    def agreement(tokens, reference):
        """Leading greedy tokens equal to edgegpt fp32's (llama-bench does not give its tokens: —)."""
        if not tokens or not reference:
            return "—"
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        return f"{same}/{len(reference)}"

    def ratio(value, reference, higher_is_better):
        if value is None or reference is None:
            return "—"
        return f"{reference / value if higher_is_better else value / reference:.2f}"

    for name, family, precision, _, _, _ in ready:
        if name not in med:
            continue
        m, ref = med[name], med.get(ours[precision], {})
        table.add_row(
            name, f"{sizes[name] / 1e6:.1f}",
            f"{m['decode']:.0f}", ratio(m["decode"], ref.get("decode"), True),
            f"{1000 * m['ttft_s']:.0f}", ratio(m["ttft_s"], ref.get("ttft_s"), False),
            f"{m['cold_s']:.2f}", ratio(m["cold_s"], ref.get("cold_s"), False),
            f"{m['rss_mb']:.0f}", ratio(m["rss_mb"], ref.get("rss_mb"), False),
            agreement(greedy.get(name), greedy.get("edgegpt fp32")),
        )
        figures["runtimes"][name] = {"family": family, "precision": precision, "bytes": sizes[name], **m,
                                     "samples": samples[name], "greedy": greedy.get(name)}
    Console(width=max(Console().width, 190)).print(table)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
