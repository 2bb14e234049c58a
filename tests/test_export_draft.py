"""`edgegpt export --draft`: a smaller model with the target's tokenizer goes into the package's draft/
folder, gated on its own, with its greedy acceptance against the target in the manifest; a draft that
cannot serve (another tokenizer, not smaller) is refused in one line with nothing written; the target's
manifest verifies the draft's files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import EVAL_TOKENS, assert_one_line_error
from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator, ModelPackage

runner = CliRunner()
PACKAGE_FILES = {"model.onnx", "config.json", "tokenizer.json", "generation_config.json"}
DRAFT_CONTEXT = 64  # shorter than tiny_checkpoint's 128: allowed, and recorded


def save_model(directory: Path, cfg, tokenizer, corpus_text: str | None = None, steps: int = 0) -> Path:
    """A checkpoint of a model with `cfg`, trained `steps` steps on the corpus (as conftest trains the target)."""
    import torch

    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    if steps:
        ids = torch.tensor(tokenizer.encode(corpus_text).ids)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
            batch = torch.stack([ids[s : s + 65] for s in starts])
            loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(directory, model.eval(), tokenizer)
    return directory


def small_config(**overrides):
    from edgegpt.core.config import ModelConfig

    shape = dict(vocab_size=512, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=192, max_len=DRAFT_CONTEXT)
    return ModelConfig(**{**shape, **overrides})


def target_tokenizer(tiny_checkpoint: Path):
    from edgegpt.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint / "tokenizer.json")


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, tiny_checkpoint, corpus_text) -> Path:
    """A 2-layer, 64-wide model (0.13M parameters vs the target's 0.9M) sharing tiny_checkpoint's tokenizer,
    trained 40 steps so its greedy choices agree with the target's more often than chance."""
    directory = tmp_path_factory.mktemp("draft") / "checkpoint"
    return save_model(directory, small_config(), target_tokenizer(tiny_checkpoint), corpus_text, steps=40)


@pytest.fixture(scope="module")
def tinier_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """Untrained, 1 layer, 32 wide: a draft for draft_checkpoint, so that the tests that only need some export
    with a draft (the command line, a failed gate) run two small models rather than the nano target."""
    directory = tmp_path_factory.mktemp("tinier") / "checkpoint"
    return save_model(directory, small_config(dim=32, n_layers=1, ffn_dim=64), target_tokenizer(tiny_checkpoint))


@pytest.fixture(scope="module")
def drafted(tmp_path_factory, tiny_checkpoint, draft_checkpoint, corpus_file):
    """(the package tiny_checkpoint exported with --draft draft_checkpoint, the export report)."""
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("drafted") / "model"
    report = export_package(tiny_checkpoint, directory, draft=draft_checkpoint, eval_data=corpus_file,
                            eval_tokens=EVAL_TOKENS)
    return directory, report


def manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- what export --draft writes ------------------------------------------------------------------------


def test_the_draft_is_a_complete_package_in_the_draft_folder(drafted, draft_checkpoint):
    from edgegpt.core.config import ModelConfig

    package, report = drafted
    target = ModelPackage.load(package)
    assert target.draft_path == package / "draft"
    draft = ModelPackage.load(target.draft_path)  # valid on its own, by its own manifest
    assert draft.draft_info is None and draft.draft_path is None
    assert draft.model.max_len == DRAFT_CONTEXT and target.model.max_len == 128
    assert draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()

    entry = manifest(package)["draft"]
    assert target.draft_info == entry
    assert set(entry) == {"directory", "checkpoint", "parameters", "max_len", "acceptance", "acceptance_tokens",
                          "files"}
    assert entry["directory"] == "draft" and entry["checkpoint"] == str(draft_checkpoint)
    assert entry["parameters"] == ModelConfig.load(draft_checkpoint / "config.json").num_parameters()
    assert entry["max_len"] == DRAFT_CONTEXT
    assert 0 <= entry["acceptance"] <= 1 and entry["acceptance_tokens"] == EVAL_TOKENS
    assert set(entry["files"]) == PACKAGE_FILES | {"manifest.json"}
    # The target's own `files` are what they are without a draft: plain names, the draft's kept apart.
    assert set(manifest(package)["files"]) == PACKAGE_FILES

    # The draft was exported with the target's options and gated on its own, on the same held-out text.
    own = manifest(package / "draft")
    assert (own["graph"], own["precision"]) == (manifest(package)["graph"], manifest(package)["precision"])
    assert own["gates"]["enabled"] and own["gates"]["passed"]
    assert own["gates"]["eval"]["tokens"] == manifest(package)["gates"]["eval"]["tokens"] == EVAL_TOKENS
    assert own["gates"]["eval"]["window"] == DRAFT_CONTEXT

    assert report.draft.entry == entry and report.draft.report.gates.passed
    assert "draft" in json.dumps(report.to_dict())
    line = report.draft.describe()
    assert f"{entry['acceptance']:.1%}" in line and f"{EVAL_TOKENS:,} held-out tokens" in line


def test_the_draft_generates_on_its_own(drafted):
    package, _ = drafted
    draft = Generator.load(package / "draft")
    assert len(draft.generate_ids("The import statement", max_new_tokens=8, temperature=0)) == 8


def test_the_target_lends_the_draft_its_tokenizer(drafted):
    """Exported together, the two have one tokenizer.json: parsed once at load, not twice."""
    package, _ = drafted
    generator = Generator.load(package)
    assert generator.draft.package.tokenizer is generator.package.tokenizer


def test_acceptance_is_the_greedy_agreement_of_the_two_packages(drafted, tiny_checkpoint, corpus_file):
    """Recomputed here from the two packages on disk: the gates' held-out tokens, scored in the draft's
    windows (stride half a window), each target position once."""
    from edgegpt.quality import prepare_eval_text, read_eval_documents
    from edgegpt.scoring import strided_windows

    package, _ = drafted
    target, draft = Generator.load(package), Generator.load(package / "draft")
    documents, source = read_eval_documents(corpus_file, package)
    text = prepare_eval_text(documents, source, target.package.tokenizer, 512, DRAFT_CONTEXT, EVAL_TOKENS)
    same = []
    for start, length, first in strided_windows(len(text.tokens), DRAFT_CONTEXT):
        ids = text.tokens[start : start + length].tolist()
        same.append(target.score(ids)[first:].argmax(-1) == draft.score(ids)[first:].argmax(-1))
    same = np.concatenate(same)
    entry = manifest(package)["draft"]
    assert len(same) == entry["acceptance_tokens"] == EVAL_TOKENS
    assert entry["acceptance"] == pytest.approx(same.mean(), abs=1e-12)
    # Trained on the same text, the draft agrees with the target far more often than a random pick would.
    assert entry["acceptance"] > 10 / 512


def test_acceptance_counts_agreeing_argmaxes():
    from edgegpt.export.draft import measure_acceptance
    from edgegpt.quality import EvalText

    class Fixed:
        """Logits whose argmax at each position is `pick(token)`."""

        def __init__(self, pick):
            self.pick = pick

        def score(self, ids):
            logits = np.zeros((len(ids), 8), np.float32)
            logits[np.arange(len(ids)), [self.pick(t) for t in ids]] = 1.0
            return logits

    tokens = np.arange(101) % 8
    text = EvalText(tokens=tokens, char_table=np.ones(8, np.int64), source="test", capped=False, window=16)
    assert measure_acceptance(Fixed(lambda t: t), Fixed(lambda t: t), text) == (1.0, 100)
    assert measure_acceptance(Fixed(lambda t: t), Fixed(lambda t: (t + 1) % 8), text) == (0.0, 100)
    rate, n = measure_acceptance(Fixed(lambda t: t), Fixed(lambda t: t if t < 2 else 7 - t), text, max_tokens=40)
    assert n == 40 and rate == pytest.approx(np.mean([t < 2 or t == 7 - t for t in tokens[:40]]))


# -- drafts that cannot serve the target -----------------------------------------------------------------


@pytest.fixture
def existing(tmp_path, tiny_package) -> Path:
    """An earlier package at the destination: a refused export must leave it as it was."""
    return Path(shutil.copytree(tiny_package, tmp_path / "model"))


def refused(tiny_checkpoint: Path, draft: Path, out: Path, *fragments: str) -> None:
    before = digests(out)
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(out), "--draft", str(draft)])
    assert_one_line_error(result, *fragments)
    assert digests(out) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_draft_with_another_tokenizer_is_refused(tmp_path, tiny_checkpoint, corpus_text, existing):
    from edgegpt.tokenizer import train_tokenizer

    other = save_model(tmp_path / "elsewhere" / "other", small_config(vocab_size=384),
                       train_tokenizer([corpus_text], 384))
    refused(tiny_checkpoint, other, existing, f"the draft {other} has a different tokenizer from the target "
            "(384 vs 512 tokens)", f"edgegpt train --teacher {tiny_checkpoint}")


def test_a_draft_whose_tokens_have_other_ids_is_refused(tmp_path, tiny_checkpoint, corpus_text, existing):
    from edgegpt.tokenizer import train_tokenizer

    shuffled = "\n\n".join(reversed(corpus_text.split("\n\n")))[: len(corpus_text) // 2]
    other = save_model(tmp_path / "elsewhere" / "other", small_config(), train_tokenizer([shuffled], 512))
    refused(tiny_checkpoint, other, existing, "different tokenizer", "512 tokens each", "with other ids")


def test_a_draft_with_logits_over_other_ids_is_refused(tmp_path, tiny_checkpoint, existing):
    other = save_model(tmp_path / "elsewhere" / "other", small_config(vocab_size=576),
                       target_tokenizer(tiny_checkpoint))
    refused(tiny_checkpoint, other, existing, "logits over 576 token ids", "the target over 512")


def test_a_draft_that_is_not_smaller_is_refused(tmp_path, tiny_checkpoint, draft_checkpoint, existing):
    refused(tiny_checkpoint, tiny_checkpoint, existing, "a draft must be smaller than the target")
    # The other way round: the small model as the target, the nano model as its draft.
    refused(draft_checkpoint, tiny_checkpoint, existing, "a draft must be smaller", "0.13M")


def test_a_missing_draft_is_one_line(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "model"),
                                 "--draft", str(tmp_path / "nope")])
    assert_one_line_error(result, "--draft", str(tmp_path / "nope"), "no checkpoint")
    assert not (tmp_path / "model").exists()


def test_a_failed_draft_gate_writes_nothing(draft_checkpoint, tinier_checkpoint, corpus_file, existing, monkeypatch):
    """Both packages are gated: the draft's gate failing (forced here: its float32 check is held to a bound
    no graph meets) leaves the destination as it was, after the target's gate passed."""
    from edgegpt.export import GateFailed, export_package, package
    from edgegpt.export.gates import Check

    seen = []

    def failing_second(verification):
        seen.append(verification)
        limit = -1.0 if len(seen) == 2 else verification.tolerance
        return Check("float32 graph max |Δlog p| / max |logit| vs PyTorch", verification.relative_error, limit,
                     "of max |logit|")

    monkeypatch.setattr(package, "logit_check", failing_second)
    before = digests(existing)
    with pytest.raises(GateFailed, match=re.escape(f"the draft {tinier_checkpoint}: quality gate failed")) as failed:
        export_package(draft_checkpoint, existing, draft=tinier_checkpoint, eval_data=corpus_file, eval_tokens=256)
    assert len(seen) == 2 and failed.value.report.checkpoint == tinier_checkpoint
    assert digests(existing) == before
    assert not [p.name for p in existing.parent.iterdir() if p.name.startswith(".")]


# -- the runtime's checks ---------------------------------------------------------------------------------


@pytest.fixture
def drafted_copy(drafted, tmp_path) -> Path:
    return Path(shutil.copytree(drafted[0], tmp_path / "copy"))


def test_a_tampered_draft_model_is_refused_by_name(drafted_copy):
    path = drafted_copy / "draft" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights: onnxruntime would load it
    path.write_bytes(data)
    for load in (ModelPackage.load, Generator.load):
        with pytest.raises(EdgeGPTError, match=r"draft/model\.onnx is corrupt"):
            load(drafted_copy)


def test_a_draft_manifest_edited_to_match_is_still_refused(drafted_copy):
    """Rewriting the draft's own manifest to the edited file's hash does not fool the target's."""
    path = drafted_copy / "draft" / "config.json"
    path.write_text(path.read_text().replace('"format"', ' "format"', 1))
    own = manifest(drafted_copy / "draft")
    own["files"]["config.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (drafted_copy / "draft" / "manifest.json").write_text(json.dumps(own))
    ModelPackage.load(drafted_copy / "draft")  # consistent on its own
    with pytest.raises(EdgeGPTError, match=r"draft/config\.json is corrupt"):
        ModelPackage.load(drafted_copy)


def test_a_missing_draft_folder_is_refused_by_name(drafted_copy):
    shutil.rmtree(drafted_copy / "draft")
    with pytest.raises(EdgeGPTError, match=r"lists a draft model in draft/, which is missing") as failed:
        ModelPackage.load(drafted_copy)
    assert "\n" not in str(failed.value)


@pytest.mark.parametrize("entry", [[], {"directory": "../x"}, {"directory": "draft", "parameters": "many"}])
def test_a_malformed_draft_entry_is_refused(drafted_copy, entry):
    data = manifest(drafted_copy)
    data["draft"] = entry if not isinstance(entry, dict) else {**data["draft"], **entry}
    (drafted_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EdgeGPTError, match="manifest.json"):
        ModelPackage.load(drafted_copy)


def test_a_package_without_a_draft_loads_as_before(tiny_package):
    package = ModelPackage.load(tiny_package)
    assert package.draft_info is None and package.draft_path is None
    assert "draft" not in manifest(tiny_package)


# -- the command line --------------------------------------------------------------------------------------


def test_info_shows_the_draft(drafted):
    package, _ = drafted
    entry = manifest(package)["draft"]
    result = runner.invoke(app, ["info", str(package)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "draft model" in result.output
    assert f"{entry['acceptance']:.1%} of {EVAL_TOKENS:,} held-out tokens" in result.output
    assert f"{entry['parameters'] / 1e6:.2f}M" in result.output
    assert f"{DRAFT_CONTEXT} tokens" in result.output


def test_the_export_command_takes_a_draft(tmp_path, draft_checkpoint, tinier_checkpoint, corpus_file):
    out = tmp_path / "model"
    result = runner.invoke(app, ["export", str(draft_checkpoint), "--out", str(out), "--draft",
                                 str(tinier_checkpoint), "--eval-data", str(corpus_file), "--eval-tokens", "256",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["draft"]["directory"] == "draft" and report["draft"]["acceptance_tokens"] == 256
    assert report["draft"]["report"]["gates"]["passed"]
    assert ModelPackage.load(out).draft_info == manifest(out)["draft"] == {
        k: v for k, v in report["draft"].items() if k not in ("report", "shape")}
    ModelPackage.load(out / "draft")
