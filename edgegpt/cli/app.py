"""The `edgegpt` command line: train, export, eval, generate, chat, serve, convert, bench, info.

Heavy modules (torch, onnx) are imported inside the commands that need them, so `edgegpt generate`
starts as fast as the runtime does, and a base install (no torch) runs generate, chat, bench, info and
`eval PACKAGE`; the other commands then say in one line which extra to install (cli/errors.py).
Options shared between commands are declared once in cli/options.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edgegpt.cli.errors import OneLineUsageErrors, user_errors
from edgegpt.cli.options import (
    DraftOption,
    LookupOption,
    MaxLengthOption,
    MaxNewTokensOption,
    MinPOption,
    ModelOption,
    NoSpeculationOption,
    Provider,
    ProviderOption,
    RepetitionPenaltyOption,
    SeedOption,
    StopOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
    Truncate,
    TruncateOption,
    speculation,
)
from edgegpt.core import workspace
from edgegpt.core.errors import EdgeGPTError
from edgegpt.scoring import DEFAULT_EVAL_TOKENS
from edgegpt.train.options import DEFAULT_TIME_BUDGET_MIN, TrainOptions

app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train a compact GPT, export it as one ONNX package, and generate with it.",
)

# The optional modules (cli/errors.py) that train, convert and export import, checked before they start.
TRAINING_NEEDS = ("torch", "safetensors")
EXPORT_NEEDS = ("torch", "onnx", "onnxscript", "safetensors")

# `train`'s defaults are TrainOptions' own: the Python API and the command line cannot drift apart.
TRAIN = TrainOptions()


@app.command()
def train(
    data: Optional[List[Path]] = typer.Option(
        None, "--data", help="Text files, directories (*.txt, *.md, recursively) or .jsonl files with a "
        "'text' field; repeatable. Default: the documentation that ships inside Python (pydoc topics and "
        "standard-library docstrings), so training needs no download."),
    val_data: Optional[List[Path]] = typer.Option(
        None, "--val-data", help="Validation text; default: the last 10% of --data."),
    preset: Optional[str] = typer.Option(TRAIN.preset, help="Model size: nano, micro (default), small or base."),
    layers: Optional[int] = typer.Option(TRAIN.layers, help="Override the preset's number of layers."),
    out: Optional[Path] = typer.Option(
        None, help="Checkpoint directory. Default: $EDGEGPT_HOME/checkpoint (./edgegpt-out)."),
    max_steps: Optional[int] = typer.Option(TRAIN.max_steps, help="Stop after this many optimizer steps."),
    time_budget: Optional[float] = typer.Option(
        TRAIN.time_budget,
        help=f"Stop after this many minutes (default {DEFAULT_TIME_BUDGET_MIN:g} when --max-steps is not given)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out exactly where it stopped."),
    save_every: int = typer.Option(
        TRAIN.save_every, help="Save the resume state every N steps (a crash loses at most N)."),
    device: str = typer.Option(
        TRAIN.device, help="auto (cuda > mps > cpu), cpu, cuda or mps. Under torchrun: one device per process."),
    seed: int = typer.Option(
        TRAIN.seed, help="Seed for initialisation, batches and dropout (reproducible on the CPU)."),
    batch_size: int = typer.Option(TRAIN.batch_size, help="Sequences per micro-batch, per process."),
    grad_accum: int = typer.Option(TRAIN.grad_accum, help="Micro-batches per optimizer step."),
    block_size: Optional[int] = typer.Option(
        TRAIN.block_size, help="Training sequence length (default: the model's context)."),
    lr: float = typer.Option(TRAIN.lr, help="Peak learning rate."),
    dropout: float = typer.Option(TRAIN.dropout, help="Residual and embedding dropout."),
    vocab_size: Optional[int] = typer.Option(TRAIN.vocab_size, help="BPE vocabulary size (default: the preset's)."),
    tokenizer: Optional[Path] = typer.Option(TRAIN.tokenizer, help="Use this tokenizer.json instead of training one."),
    teacher: Optional[Path] = typer.Option(
        TRAIN.teacher, help="Distil from this teacher: an edgegpt checkpoint or a local Hugging Face causal-LM "
        "directory (safetensors and tokenizer.json; nothing is downloaded). The student takes its tokenizer."),
    alpha: float = typer.Option(
        TRAIN.alpha, help="With --teacher: weight of the label loss; 1 - alpha weighs the teacher's."),
    temperature: float = typer.Option(
        TRAIN.temperature, help="With --teacher: softening temperature of both distributions."),
    init_from_teacher: bool = typer.Option(
        TRAIN.init_from_teacher, "--init-from-teacher", help="With --teacher: start from every k-th teacher "
        "layer (the student takes the teacher's width; --layers sets its depth, default half)."),
    as_draft: bool = typer.Option(
        TRAIN.as_draft, "--as-draft", help="With --teacher: train a draft for speculative decoding of the "
        "teacher (`edgegpt export TEACHER --draft OUT`): learn the teacher's own distribution (alpha 0, "
        "temperature 1), which keeps more guesses than the default recipe."),
    eval_every: int = typer.Option(TRAIN.eval_every, help="Validate (and keep the best weights) every N steps."),
    compile: bool = typer.Option(
        TRAIN.compile, "--compile", help="Use torch.compile (helps on GPUs, not on laptop CPUs)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Tokenized-data cache. Default: $EDGEGPT_HOME/cache."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line at the end."),
) -> None:
    """Train a compact GPT on your text (or on Python's own documentation by default), optionally
    distilled from a larger teacher. Under `torchrun --nproc_per_node N -m edgegpt train` it trains
    data-parallel on N devices."""
    import os

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    with user_errors("train", needs=TRAINING_NEEDS):
        from edgegpt.cli.console import TrainProgress
        from edgegpt.train.loop import train as run_training

        opts = TrainOptions(
            preset=preset, vocab_size=vocab_size, batch_size=batch_size, block_size=block_size, grad_accum=grad_accum,
            lr=lr, dropout=dropout, max_steps=max_steps, time_budget=time_budget, eval_every=eval_every, seed=seed,
            device=device, compile=compile, save_every=save_every, layers=layers,
            tokenizer=str(tokenizer) if tokenizer else None, teacher=str(teacher.resolve()) if teacher else None,
            alpha=alpha, temperature=temperature, init_from_teacher=init_from_teacher, as_draft=as_draft,
        )
        summary = run_training(
            list(data or []), list(val_data or []), out or workspace.checkpoint_dir(), opts,
            cache_dir=cache_dir or workspace.cache_dir(), resume=resume,
            reporter=TrainProgress() if main_process else None,
        )
    if not main_process:
        return
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        from edgegpt.cli.console import stderr

        stderr.print(
            f"{summary.stopped.replace('_', ' ')}: {summary.steps} steps, {summary.tokens:,} tokens, "
            f"{summary.tokens_per_s:,.0f} tokens/s; best validation {summary.val_loss:.4f} nats/token = "
            f"{summary.val_nats_per_char:.4f} nats/char; checkpoint in {summary.checkpoint}"
        )
    if summary.stopped == "interrupted":
        print("edgegpt: interrupted; the checkpoint is saved, continue with --resume", file=sys.stderr)
        raise typer.Exit(130)


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory. Default: $EDGEGPT_HOME/checkpoint."),
    out: Optional[Path] = typer.Option(None, help="Package directory. Default: $EDGEGPT_HOME/model."),
    quantize: bool = typer.Option(
        False, "--quantize", help="Quantize the weights (--bits): smaller, and faster on CPUs. `--quantize auto` "
        "chooses 4 bits, 8 bits or float32 for each projection: the smallest package within --max-ppl-increase."),
    bits: str = typer.Option("8", help="With --quantize: 8 (int8, the default), 4 (int4, smallest) or auto."),
    max_ppl_increase: Optional[float] = typer.Option(
        None, "--max-ppl-increase", help="With --quantize auto: the perplexity budget on held-out text, in percent "
        "of float32's (default 1)."),
    rounding: Optional[str] = typer.Option(
        None, help="With --quantize (nbits): rtn (round to nearest), search (importance-weighted scale search, "
        "the 8-bit default) or gptq (error compensation, the 4-bit default); search and gptq read calibration text."),
    block_size: Optional[int] = typer.Option(None, help="With --quantize (nbits): 32 (default), 64 or 128 "
                                             "weights per scale."),
    symmetric: bool = typer.Option(False, "--symmetric", help="With --quantize (nbits): no zero points (slightly "
                                   "smaller, less exact)."),
    accuracy_level: int = typer.Option(4, help="With --quantize (nbits): 4 (int8 activations inside MatMulNBits, "
                                       "fastest on CPUs) or 1 (float32; much slower at 8 bits)."),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data", help="Text for calibrating quantization. Default: the end of the checkpoint's "
        "training text, else of the embedded Python documentation."),
    method: Optional[str] = typer.Option(None, help="With --quantize: nbits (MatMulNBits block-quantized weights, "
                                         "the default) or dynamic (int8 MatMulInteger, activations quantized at "
                                         "run time; 8 bits only)."),
    precision: str = typer.Option("fp32", help="fp32, or fp16 for CUDA packages (the CPU runtime refuses fp16)."),
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache", help="KV-cache precision: fp32 (default), int8 (a quarter of the memory per token, "
        "CPU, fused graph; scales calibrated on the held-out text) or fp16 (only with --precision fp16, its "
        "default)."),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Keep the plain torch.onnx graph (portable reference) "
                                 "instead of the fused GroupQueryAttention graph."),
    no_gate: bool = typer.Option(False, "--no-gate", help="Write the package even if a quality gate fails "
                                 "(the manifest records it)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out text for the quality gates. "
                                             "Default: the checkpoint's validation split."),
    eval_tokens: int = typer.Option(
        DEFAULT_EVAL_TOKENS, help="Score at most this many held-out tokens (keeps export fast)."),
    window: Optional[int] = typer.Option(None, help="The gates score in windows of this many tokens, stride half "
                                         "a window. Default: the model's context, at most 1024."),
    draft: Optional[Path] = typer.Option(
        None, "--draft", help="A smaller checkpoint with the same tokenizer (`edgegpt train --teacher CHECKPOINT`): "
        "exported with the same options into the package's draft/ folder, gated on its own, for speculative "
        "decoding; the report and manifest give how often it agrees with the model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON line."),
) -> None:
    """Export a checkpoint to an ONNX model package, checked against PyTorch by quality gates (with --draft,
    a draft model for speculative decoding beside it)."""

    def show(report) -> None:
        if as_json:
            print(json.dumps(report.to_dict()))
        else:
            from rich.console import Console

            from edgegpt.export import render_report

            Console().print(render_report(report))

    with user_errors("export", needs=EXPORT_NEEDS):
        from edgegpt.cli.console import stderr
        from edgegpt.export import GateFailed, export_package

        try:
            report = export_package(
                checkpoint or workspace.checkpoint_dir(), out or workspace.model_dir(), fuse=not no_fuse,
                precision=precision, quantize="auto" if bits == "auto" else quantize,
                bits=parse_bits(bits), method=method, kv_cache=kv_cache, gate=not no_gate,
                max_ppl_increase=max_ppl_increase, rounding=rounding, block_size=block_size, symmetric=symmetric,
                accuracy_level=accuracy_level, calibration_data=calibration_data,
                eval_data=eval_data, eval_tokens=eval_tokens, window=window, draft=draft,
                progress=None if as_json else stderr.print,
            )
        except GateFailed as failed:  # the table first (it says why), then the one-line error
            show(failed.report)
            raise
    show(report)


@app.command("eval")
def evaluate(
    model: Path = typer.Argument(..., help="A model package or a checkpoint directory."),
    data: Optional[Path] = typer.Option(None, help="Held-out text (file, directory or .jsonl). Default for a "
                                        "checkpoint: its validation split; a package needs --data."),
    reference: Optional[Path] = typer.Option(None, help="Compare with this checkpoint or package: top-1 and "
                                             "greedy agreement, Δ perplexity."),
    eval_tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, help="Score at most this many tokens."),
    window: Optional[int] = typer.Option(None, help="Score in windows of this many tokens, stride half a window. "
                                         "Default: the model's context, at most 1024."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads for a package (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON line."),
) -> None:
    """Perplexity, nats per token and per character of a checkpoint (PyTorch) or a package (runtime)."""
    with user_errors("eval", "of a checkpoint"):  # a package is scored by the runtime, without torch
        from edgegpt.quality import run_eval

        rows, text = run_eval(model, data, reference, eval_tokens, threads, window)
    from edgegpt.quality import metrics_json, metrics_table

    if as_json:
        print(metrics_json(rows, text))
    else:
        from rich.console import Console

        Console().print(metrics_table(rows, text, title=f"quality of {model}"))


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text to continue (with --chat: the question); - reads it "
                                           "from standard input."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this UTF-8 "
                                               "file (any length: an argument is limited by the system)."),
    model: ModelOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    provider: ProviderOption = Provider.auto,
    truncate: TruncateOption = Truncate.none,
    max_length: MaxLengthOption = None,
    chat: bool = typer.Option(False, "--chat", help="Ask PROMPT as one question (a user message) through the "
                              "package's chat template and print the answer alone."),
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Continue PROMPT, streaming the text as it is generated (with --chat: answer it). A prompt given as an
    argument is printed before its continuation; one read from a file or standard input is not."""
    with user_errors("generate"):
        from edgegpt.runtime import Generator

        echo = prompt is not None and prompt != "-" and prompt_file is None
        prompt = read_prompt(prompt, prompt_file)

        draft, lookup = speculation(draft, lookup, no_speculation)
        generator = Generator.load(model or workspace.model_dir(), provider=provider.value, max_length=max_length,
                                   draft=draft)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty, stop=stop or None, seed=seed,
                       truncate=truncate.option, lookup=lookup)
        if chat:
            pieces = generator.stream_chat([{"role": "user", "content": prompt}], **options)
        else:
            pieces = generator.stream(prompt, **options)
            if echo:
                sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if pieces.finish_reason == "max_length":
            sys.stdout.flush()
            print(f"edgegpt: the model's context ({generator.max_length} tokens) is full; "
                  "generation stopped before --max-new-tokens", file=sys.stderr)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from the argument, standard input (`-`) or --prompt-file: exactly one of them, UTF-8."""
    if (prompt is None) == (prompt_file is None):
        raise EdgeGPTError("give the prompt as an argument, as - (read from standard input) or with "
                           "--prompt-file PATH: exactly one of them")
    if prompt_file is not None:
        try:
            data, source = prompt_file.read_bytes(), str(prompt_file)
        except OSError as e:
            raise EdgeGPTError(f"cannot read --prompt-file {prompt_file} ({e.strerror or e})") from None
    elif prompt == "-":
        data, source = sys.stdin.buffer.read(), "standard input"
    else:
        return prompt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeGPTError(f"the prompt from {source} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


@app.command()
def chat(
    model: ModelOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    provider: ProviderOption = Provider.auto,
    truncate: TruncateOption = Truncate.left,
    max_length: MaxLengthOption = None,
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Talk to a model: each line you type is a turn of the conversation and the reply streams back.
    With the package's chat template (an instruct model) the conversation is kept as messages and a
    reply ends at the model's end of turn; without one, as a plain transcript where a reply ends at a
    blank line (or at a --stop string). /reset forgets the conversation; /quit, Ctrl-D or Ctrl-C leaves."""
    with user_errors("chat"):
        from edgegpt.cli.chat import chat_loop, default_stop
        from edgegpt.runtime import Generator

        draft, lookup = speculation(draft, lookup, no_speculation)
        generator = Generator.load(model or workspace.model_dir(), provider=provider.value, max_length=max_length,
                                   draft=draft)
        # --stop adds to the transcript's blank line rather than replacing it: without that stop a reply
        # would run on into the next turns of the conversation.
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       stop=[*default_stop(generator), *stop] if stop else None, seed=seed, truncate=truncate.option,
                       lookup=lookup)
        chat_loop(generator, sys.stdin.readline, sys.stdout, lambda text: print(text, end="", file=sys.stderr,
                                                                                flush=True), options)
        print(file=sys.stderr)


@app.command()
def serve(
    model: Optional[Path] = typer.Argument(None, help="Model package. Default: $EDGEGPT_HOME/model."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default is reachable from this "
                             "machine only; anything else should have an --api-key."),
    port: int = typer.Option(8080, help="TCP port (0: any free one; the address is printed when ready)."),
    parallel: int = typer.Option(4, help="Requests generated at the same time, each with its own cache, "
                                 "decoded together in one batch (a fused CPU package) on the one loaded model."),
    max_queue: int = typer.Option(8, help="Requests that may wait for a free slot; beyond that: 503."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEGPT_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on the API."),
    model_name: Optional[str] = typer.Option(None, help="The model's id in the API (default: the package "
                                             "folder's name)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    shutdown_timeout: float = typer.Option(10.0, help="Seconds running requests get to finish on SIGTERM "
                                           "or Ctrl-C before they are cancelled."),
    provider: ProviderOption = Provider.auto,
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: physical cores)."),
    max_length: MaxLengthOption = None,
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Serve a model package over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health), for apps in any language. Needs the [serve] extra. With a draft (or --lookup) each
    slot guesses ahead on its own instead of the slots sharing a batch: speculation speeds up one request
    at a time, batching many at once."""
    with user_errors("serve", needs=("starlette", "uvicorn")):
        from edgegpt.server import serve as run_server

        draft, lookup = speculation(draft, lookup, no_speculation)
        run_server(model or workspace.model_dir(), host=host, port=port, parallel=parallel, max_queue=max_queue,
                   api_key=api_key, model_name=model_name, max_body_bytes=max_body_bytes,
                   shutdown_timeout=shutdown_timeout, provider=provider.value, threads=threads, max_length=max_length,
                   draft=draft, lookup=lookup)


@app.command()
def convert(
    source: Path = typer.Argument(
        ..., help="A .gguf file (Llama architecture; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), a Hugging "
        "Face model directory (Llama, SmolLM, Mistral without a sliding window, Qwen2) or an edgegpt checkpoint."),
    out: Path = typer.Argument(..., help="Where to write the other format (a new directory)."),
) -> None:
    """Import a GGUF file or a Hugging Face model as a checkpoint, or write a checkpoint as a Hugging Face
    directory. Generation settings (eos ids, bos) and the chat template come along; a .gguf file needs the
    gguf package (pip install "edgegpt\\[convert]")."""
    with user_errors("convert", needs=TRAINING_NEEDS):
        from edgegpt.convert import convert as run_convert

        direction, written = run_convert(source, out)
    print(f"{direction}: {written}")


@app.command()
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
        from edgegpt.cli.bench import bench_table, run_bench

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


@app.command()
def info(directory: Path = typer.Argument(..., help="A checkpoint or a model package directory.")) -> None:
    """Show what a checkpoint or a model package holds."""
    with user_errors("info"):
        from rich.console import Console

        from edgegpt.cli.inspect import describe

        Console().print(describe(directory))


def parse_bits(bits: str) -> int:
    """--bits: 8, 4 or auto (auto is read with --quantize; alone it is an error export_package reports)."""
    if bits == "auto":
        return 8
    try:
        return int(bits)
    except ValueError:
        raise EdgeGPTError(f"--bits {bits} is not supported; choose 8, 4 or auto") from None


def with_quantize_auto(argv: list[str]) -> list[str]:
    """`export --quantize auto` is `--quantize --bits auto`: a flag cannot take an optional value in typer."""
    if not argv or argv[0] != "export":
        return argv
    out = []
    for i, arg in enumerate(argv):
        if arg == "auto" and i > 0 and argv[i - 1] == "--quantize":
            out += ["--bits", "auto"]
        elif arg == "--quantize=auto":
            out += ["--quantize", "--bits", "auto"]
        else:
            out.append(arg)
    return out


def main() -> None:
    app(args=with_quantize_auto(sys.argv[1:]), prog_name="edgegpt")
