"""Fine-tuning: `edgegpt train --from CHECKPOINT`, every weight or (--lora) low-rank adapters.

The run is the training loop's (edgegpt.train.loop), with what the checkpoint fixes taken from it:

    --from DIR ─► open_base        config + tokenizer, checked before any weight is read
               ─► load_base_model  its weights (float32), then adapters when --lora (edgegpt.train.lora)
               ─► copy_base_files  generation_config.json and chat_template.jinja into --out, so export,
                                   eval and `generate --chat` treat the result as they treat the base
               ─► save_best        at every new best: model.safetensors (merged) and adapter/ (PEFT's layout)

The fine-tuning defaults (learning rate, dropout) are TrainOptions.resolved()'s; --epochs is
steps_for_epochs; JSONL examples are read as the checkpoint's model reads them (example_format).
"""

from __future__ import annotations

import math
from pathlib import Path

from tokenizers import Tokenizer

from edgegpt.checkpoint import load_checkpoint, save_weights
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import ADAPTER, CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json, write_bytes_atomic
from edgegpt.model import GPT
from edgegpt.tokenizer import load_tokenizer
from edgegpt.train.distill import Teacher
from edgegpt.train.examples import ExampleFormat
from edgegpt.train.lora import add_adapters, save_adapter, save_merged_weights
from edgegpt.train.options import TrainOptions

# What a checkpoint carries besides its weights, config and tokenizer (an imported model's), copied as they are.
BASE_FILES = (GENERATION_CONFIG, CHAT_TEMPLATE)


def open_base(directory: Path, out: Path) -> tuple[ModelConfig, Tokenizer]:
    """The checkpoint's shape and tokenizer, or a one-line refusal: not a checkpoint (a Hugging Face folder or a
    GGUF file is converted first), or --out the checkpoint itself."""
    directory = Path(directory)
    convert = f"convert it first: `edgegpt convert {directory} CHECKPOINT`, then --from CHECKPOINT"
    if directory.is_file():
        raise EdgeGPTError(f"--from {directory} is a file, not a checkpoint directory; {convert}")
    if not directory.is_dir():
        raise EdgeGPTError(f"--from {directory}: no such directory; give an edgegpt checkpoint directory")
    config = read_json(directory / CONFIG) if (directory / CONFIG).is_file() else None
    if isinstance(config, dict) and "model_type" in config:
        raise EdgeGPTError(f"--from {directory} is a Hugging Face model folder, not an edgegpt checkpoint; {convert}")
    missing = [name for name in (WEIGHTS, CONFIG, TOKENIZER) if not (directory / name).is_file()]
    if missing:
        raise EdgeGPTError(f"--from {directory} is not an edgegpt checkpoint ({', '.join(missing)} missing); "
                           "give a directory `edgegpt train` or `edgegpt convert` wrote")
    if Path(out).resolve() == directory.resolve():
        raise EdgeGPTError(f"--out {out} is the checkpoint --from starts from, and training would replace its "
                           "weights; give another --out")
    cfg = ModelConfig.load(directory / CONFIG)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise EdgeGPTError(f"--from {directory}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                           f"only {cfg.vocab_size}; the checkpoint is corrupt")
    return cfg, tokenizer


def load_base_model(directory: Path, opts: TrainOptions) -> tuple[GPT, int]:
    """The checkpoint's model in float32 (an optimizer's updates vanish in bfloat16 weights), with --lora's
    adapters (drawn from the torch seed) on the frozen base; and how many parameters train."""
    model, _ = load_checkpoint(Path(directory), dropout=opts.dropout)
    return with_adapters(model.float(), opts)


def with_adapters(model: GPT, opts: TrainOptions) -> tuple[GPT, int]:
    """`model` with --lora's adapters when asked (in place), and its trainable parameters."""
    if opts.lora:
        trainable = add_adapters(model, opts.lora, opts.lora_alpha, opts.lora_dropout, opts.lora_target_names())
    else:
        trainable = model.num_parameters()
    return model, trainable


def copy_base_files(directory: Path, out: Path) -> None:
    for name in BASE_FILES:
        if (Path(directory) / name).is_file():
            write_bytes_atomic(Path(out) / name, (Path(directory) / name).read_bytes())


def save_best(out: Path, model: GPT, opts: TrainOptions) -> None:
    """The checkpoint's weights: with --lora, merged, and the adapters alone in adapter/."""
    if not opts.lora:
        save_weights(out / WEIGHTS, model)
        return
    save_merged_weights(out / WEIGHTS, model)
    save_adapter(out / ADAPTER, model, opts.lora, opts.lora_alpha, opts.lora_dropout, opts.lora_target_names(),
                 base=str(opts.from_checkpoint))


def check_teacher_vocabulary(teacher: Teacher, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """Distilling into --from's checkpoint: the teacher must predict over the checkpoint's own vocabulary."""
    if teacher.vocab_size != cfg.vocab_size or teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise EdgeGPTError(
            f"the teacher {teacher.path} has another vocabulary than --from's checkpoint ({teacher.vocab_size} vs "
            f"{cfg.vocab_size} logits); distil from a teacher with the checkpoint's tokenizer"
        )


def example_format(opts: TrainOptions, out: Path, resume: bool, tokenizer: Tokenizer) -> ExampleFormat:
    """How JSONL examples are rendered and tokenized: as --from's checkpoint reads them (its template, bos and
    eos; a resumed run's copies in --out), else as a tokenizer given with --tokenizer (no chat template)."""
    if opts.from_checkpoint:
        return ExampleFormat.from_checkpoint(out if resume else Path(opts.from_checkpoint))
    return ExampleFormat.from_tokenizer(tokenizer)


def steps_for_epochs(epochs: int, examples: int, examples_per_step: int) -> int:
    """Optimizer steps that draw `epochs` times as many examples (windows or rows) as the data holds."""
    return max(1, math.ceil(epochs * examples / examples_per_step))
