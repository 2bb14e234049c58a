"""The draft model of a package, for speculative decoding: `edgegpt export TARGET --draft DRAFT`.

    TARGET ─► the target package, built and gated as without --draft ─┐
    DRAFT  ─► same tokenizer? fewer parameters? ─► its own package in draft/, same options, gated on
              its own against DRAFT on the same held-out text ─► acceptance: the draft's greedy choice
              vs the target's, both packages through the runtime ─► manifest.json's `draft` entry
                                                                       ─► swapped in together, or neither

    model/
      model.onnx, config.json, ...   the target package
      manifest.json                  ... "draft": {"directory": "draft", "checkpoint", "parameters",
                                     "max_len", "acceptance", "acceptance_tokens", "files": {sha256s}}
      draft/                         a complete package (manifest.json included): loads on its own

A draft proposes tokens and the target verifies them, so the two must mean the same thing by every
token id (the same vocabulary, and logits over the same ids), and the draft must cost less per token
than the target, or proposing saves nothing. Its context may be shorter than the target's: the runtime
speculates only as far as the draft's `max_len` reaches, which the entry records.

The draft's files are hashed in the target's manifest (the entry's `files`, beside the target's own
`files`, which stay plain file names), so loading the target verifies them, and the draft's own
manifest.json verifies them again when the draft is loaded on its own.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgegpt.checkpoint import load_checkpoint, require_checkpoint
from edgegpt.core.config import PRESETS, ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, TOKENIZER
from edgegpt.export.gates import GateFailed
from edgegpt.export.package import ExportPlan, ExportReport, Source, build_package, open_package
from edgegpt.export.writer import file_hashes, generation_config, write_manifest
from edgegpt.quality import EvalText
from edgegpt.scoring import strided_windows
from edgegpt.tokenizer import load_tokenizer

DRAFT_DIRECTORY = "draft"
# Held-out positions the acceptance is measured on: ~1% standard error at the rates drafts reach, in a
# few seconds for the small models a draft is.
ACCEPTANCE_TOKENS = 4096


@dataclass
class DraftReport:
    """The draft's package (its own export report) and its entry in the target's manifest."""

    report: ExportReport
    entry: dict[str, Any]
    shape: str  # the preset it has the shape of ("micro"), else "n layers × dim"

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry, "shape": self.shape, "report": self.report.to_dict()}

    def describe(self) -> str:
        """One line: `micro, 2.6M parameters, acceptance 71.3% on 4,096 held-out tokens`."""
        entry = self.entry
        acceptance = "acceptance not measured (the package cannot run here)" if entry["acceptance"] is None else \
            f"acceptance {entry['acceptance']:.1%} on {entry['acceptance_tokens']:,} held-out tokens"
        millions = entry["parameters"] / 1e6
        return f"{self.shape}, {millions:.{1 if millions >= 1 else 2}f}M parameters, {acceptance}"


def load_draft(draft: Path, target: Path, target_cfg: ModelConfig, target_tokenizer) -> Source:
    """The draft checkpoint, refused before anything slow unless it shares the target's vocabulary id for id,
    scores the same ids and has fewer parameters. Its texts are filled in by export_draft (the target's)."""
    if not draft.is_dir():
        raise EdgeGPTError(f"--draft {draft}: no checkpoint there; pass the draft model's checkpoint directory "
                           f"(distill one from the target with `edgegpt train --teacher {target}`)")
    require_checkpoint(draft)
    cfg = ModelConfig.load(draft / CONFIG)
    tokenizer = load_tokenizer(draft / TOKENIZER)
    check_vocabulary(draft, target, tokenizer.get_vocab(), target_tokenizer.get_vocab())
    if cfg.vocab_size != target_cfg.vocab_size:
        # The runtime compares the two models' distributions over the same ids: the logits must line up.
        raise EdgeGPTError(
            f"the draft {draft} has logits over {cfg.vocab_size} token ids and the target over "
            f"{target_cfg.vocab_size} (config.json vocab_size); distill it from the target with "
            f"`edgegpt train --teacher {target}` (it takes the target's tokenizer and vocabulary size)")
    ours, theirs = cfg.num_parameters(), target_cfg.num_parameters()
    if ours >= theirs:
        raise EdgeGPTError(
            f"the draft {draft} has {ours / 1e6:.2f}M parameters and the target {theirs / 1e6:.2f}M: a draft must "
            "be smaller than the target (it runs once for every token it proposes); choose a smaller draft")
    model, tokenizer = load_checkpoint(draft)
    generation_config(tokenizer, draft)  # the draft's package needs an end-of-text token too
    return Source(draft, model, tokenizer, None, None)


def check_vocabulary(draft: Path, target: Path, draft_vocab: dict[str, int], target_vocab: dict[str, int]) -> None:
    """Token for token: every token of either tokenizer has the same id in the other."""
    if draft_vocab == target_vocab:
        return
    if len(draft_vocab) != len(target_vocab):
        detail = f"{len(draft_vocab):,} vs {len(target_vocab):,} tokens"
    else:
        differ = sum(draft_vocab.get(token) != i for token, i in target_vocab.items())
        detail = f"{len(target_vocab):,} tokens each, {differ:,} of them with other ids"
    raise EdgeGPTError(
        f"the draft {draft} has a different tokenizer from the target ({detail}); distill it from the target "
        f"with `edgegpt train --teacher {target}` (it takes the target's tokenizer)")


def export_draft(draft: Source, target: Source, stage: Path, out: Path, plan: ExportPlan,
                 say: Callable[[str], None], steps: Callable[[int, int], None] | None = None) -> DraftReport:
    """Build and gate the draft's package in `stage`/draft (with its own manifest), with the target's options
    and on the target's held-out and calibration text, then measure how often it agrees with the target's
    package (already built in `stage`). Raises GateFailed, carrying the draft's report, if its gate fails."""
    start = time.perf_counter()
    directory = stage / DRAFT_DIRECTORY
    directory.mkdir()
    cfg = draft.model.cfg
    text = target.text
    if text is not None:  # the same tokens (the vocabularies are equal), in windows the draft's context holds
        text = dataclasses.replace(text, window=min(text.window, cfg.max_len))
    draft = dataclasses.replace(draft, text=text, calibration=target.calibration)

    def say_draft(message: str) -> None:
        say(f"draft: {message}")

    try:
        report, fields = build_package(draft, directory, out / DRAFT_DIRECTORY, plan, say_draft, start, steps)
    except GateFailed as failed:
        raise GateFailed(f"the draft {draft.checkpoint}: {failed}", failed.report) from None
    report.manifest = write_manifest(directory, fields)
    acceptance, compared = None, 0
    if text is not None:
        say(f"measuring the draft's acceptance on {min(ACCEPTANCE_TOKENS, len(text.tokens) - 1):,} held-out tokens")
        acceptance, compared = measure_acceptance(open_package(stage, plan.precision, max_length=text.window),
                                                  open_package(directory, plan.precision, max_length=text.window),
                                                  text, ACCEPTANCE_TOKENS)
    entry = {
        "directory": DRAFT_DIRECTORY,
        "checkpoint": str(draft.checkpoint),
        "parameters": cfg.num_parameters(),
        "max_len": cfg.max_len,
        "acceptance": acceptance,
        "acceptance_tokens": compared,
        "files": file_hashes(directory, sorted(p.name for p in directory.iterdir())),
    }
    report.seconds = time.perf_counter() - start
    return DraftReport(report=report, entry=entry, shape=shape_name(cfg))


def measure_acceptance(target, draft, text: EvalText, max_tokens: int = ACCEPTANCE_TOKENS) -> tuple[float | None, int]:
    """(the fraction of positions where the draft's argmax equals the target's, positions compared), both
    teacher-forced on the first `max_tokens` targets of `text` in windows of `text.window` tokens, stride half
    a window (as the gates score it). `target` and `draft` are runtime Generators (anything with score(ids)
    -> logits [len, vocab]). What greedy speculative decoding keeps of a proposal is this agreement on the
    text the target itself writes; on held-out text it is an estimate."""
    tokens = np.asarray(text.tokens[: max_tokens + 1])
    if len(tokens) < 2:
        return None, 0
    agreed = compared = 0
    for begin, length, first in strided_windows(len(tokens), text.window):
        ids = tokens[begin: begin + length].tolist()
        wanted = target.score(ids)[first:].argmax(axis=-1)
        proposed = draft.score(ids)[first:].argmax(axis=-1)
        agreed += int((wanted == proposed).sum())
        compared += len(wanted)
    return agreed / compared, compared


def shape_name(cfg: ModelConfig) -> str:
    """The preset whose shape `cfg` has (vocabulary and context aside), else `n layers × dim`."""
    sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    for name, preset in PRESETS.items():
        if all(getattr(cfg, size) == getattr(preset, size) for size in sizes):
            return name
    return f"{cfg.n_layers} layers × {cfg.dim}"
