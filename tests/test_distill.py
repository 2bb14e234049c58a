"""Distillation: the loss, teachers of every kind (edgegpt, Hugging Face Llama and GPT-2), initialising
from a teacher's layers, and the one-line errors for bad teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.train.distill import distillation_loss, init_from_teacher, load_teacher, student_config_from_teacher

runner = CliRunner()
TEACHER_VOCAB = 300
CORPUS_CHARS = 40_000


# -- the loss --------------------------------------------------------------------------------------

def random_logits(seed: int, shape=(4, 8, 50), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_alpha_one_is_cross_entropy():
    student, teacher = random_logits(0), random_logits(1)
    labels = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    loss = distillation_loss(student, teacher, labels, alpha=1.0, temperature=3.0)
    expected = F.cross_entropy(student.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss.total, expected, rtol=0, atol=1e-12)
    assert loss.kd > 0  # the teacher term is still measured (and shown), just not weighed


def test_alpha_zero_is_pure_teacher_term_and_zero_when_student_is_teacher():
    teacher = random_logits(1)
    labels = torch.zeros(4, 8, dtype=torch.long)
    same = distillation_loss(teacher.clone(), teacher, labels, alpha=0.0, temperature=2.0)
    assert same.total.abs() < 1e-6
    other = distillation_loss(random_logits(0), teacher, labels, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(other.total, other.kd)
    assert other.total > 0.1


def kd_gradient_norm(temperature: float, t_squared: bool) -> float:
    student = random_logits(0).requires_grad_(True)
    loss = distillation_loss(student, random_logits(1), torch.zeros(4, 8, dtype=torch.long), 0.0, temperature).kd
    if not t_squared:
        loss = loss / temperature**2
    loss.backward()
    return student.grad.norm().item()


def test_t_squared_keeps_gradient_magnitude_comparable_across_temperatures():
    temperatures = [2.0, 4.0, 8.0, 16.0]
    scaled = [kd_gradient_norm(t, t_squared=True) for t in temperatures]
    unscaled = [kd_gradient_norm(t, t_squared=False) for t in temperatures]
    # With T²: the same order from T=2 to T=16, and converging as T grows (the high-T limit is T-free).
    # Without: they fall by about T², ~64× here.
    assert max(scaled) / min(scaled) < 1.5, scaled
    assert abs(scaled[-1] / scaled[-2] - 1) < 0.05, scaled
    assert unscaled[0] / unscaled[-1] > 30, unscaled


def test_gradcheck_of_the_loss():
    teacher = random_logits(1, shape=(2, 3, 7))
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    student = random_logits(0, shape=(2, 3, 7)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, labels, 0.3, 2.5).total, (student,))


def test_gradcheck_through_a_tiny_model():
    """The KD loss's gradient reaches the student's weights correctly (float64 finite differences)."""
    from edgegpt.core.config import ModelConfig
    from edgegpt.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=12, max_len=8)
    model = GPT(cfg).double()
    inputs = torch.tensor([[1, 5, 2, 7]])
    labels = torch.tensor([[5, 2, 7, 3]])
    teacher = random_logits(3, shape=(1, 4, 11))
    params = dict(model.named_parameters())

    def loss_of(embed: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**params, "embed.weight": embed}, (inputs,))
        return distillation_loss(logits, teacher, labels, 0.5, 2.0).total

    assert torch.autograd.gradcheck(loss_of, (params["embed.weight"].detach().clone().requires_grad_(True),))


def test_mismatched_vocabularies_are_an_error_not_a_broadcast():
    with pytest.raises(EdgeGPTError, match="vocabularies differ"):
        distillation_loss(random_logits(0), random_logits(1, shape=(4, 8, 51)), torch.zeros(4, 8, dtype=torch.long),
                          0.5, 2.0)


# -- teachers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("distill-corpus") / "text.txt"
    path.write_text(corpus_text[:CORPUS_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def teacher_tokenizer(corpus_text):
    from edgegpt.tokenizer import train_tokenizer

    return train_tokenizer([corpus_text[:CORPUS_CHARS]], TEACHER_VOCAB)


def save_hf_teacher(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory, teacher_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TEACHER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return save_hf_teacher(LlamaForCausalLM(config), teacher_tokenizer, tmp_path_factory.mktemp("llama-teacher"))


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory, teacher_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TEACHER_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return save_hf_teacher(GPT2LMHeadModel(config), teacher_tokenizer, tmp_path_factory.mktemp("gpt2-teacher"))


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.slow  # a training run, an export and a generation
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_huggingface_teacher_end_to_end(kind, request, tmp_path, small_corpus, teacher_tokenizer):
    """Any local causal LM teaches: train → export → generate, the student speaking its tokenizer."""
    teacher = request.getfixturevalue(f"{kind}_teacher")
    checkpoint, package = tmp_path / "student", tmp_path / "model"
    trained = runner.invoke(app, [
        "train", "--teacher", str(teacher), "--data", str(small_corpus), "--preset", "nano", "--max-steps", "3",
        "--batch-size", "2", "--eval-every", "3", "--out", str(checkpoint), "--cache-dir", str(tmp_path / "cache"),
        "--json",
    ])
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["teacher"] == str(teacher.resolve()) and summary["steps"] == 3
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["vocab_size"] == TEACHER_VOCAB
    assert (checkpoint / "tokenizer.json").read_text() == teacher_tokenizer.to_str()
    exported = runner.invoke(app, ["export", str(checkpoint), "--out", str(package), "--no-gate", "--json"])
    assert exported.exit_code == 0, exported.output
    generated = runner.invoke(app, ["generate", "The", "--model", str(package), "--max-new-tokens", "8", "--seed", "1"])
    assert generated.exit_code == 0, generated.output
    from edgegpt.runtime import Generator

    assert generated.stdout == "The" + Generator.load(package).generate("The", max_new_tokens=8, seed=1) + "\n"


def train_two_steps(out: Path, corpus: Path, teacher: Path, **options):
    """Two distillation steps of a `nano` student: the summary, and each step's loss and its parts."""
    from edgegpt.train.loop import Reporter, train
    from edgegpt.train.options import TrainOptions

    steps: list[tuple[float, dict]] = []

    class Recorder(Reporter):
        def step(self, step, loss, tokens_per_s, progress, parts=None):
            steps.append((loss, parts))

    opts = TrainOptions(preset="nano", teacher=str(teacher), max_steps=2, batch_size=2, eval_every=2, **options)
    summary = train([corpus], [], out, opts, out.parent / "cache", reporter=Recorder())
    return summary, steps


@pytest.mark.slow  # a training run
def test_progress_reports_both_losses(tmp_path, small_corpus, llama_teacher):
    summary, steps = train_two_steps(tmp_path / "out", small_corpus, llama_teacher, alpha=0.25, temperature=3.0)
    assert len(steps) == 2 and all(set(parts) == {"ce", "kd"} for _, parts in steps)
    assert summary.steps == 2 and summary.teacher == str(llama_teacher)
    for loss, parts in steps:  # the total is the weighted sum of the two shown
        assert parts["kd"] > 0 and parts["ce"] > 0
        assert loss == pytest.approx(0.25 * parts["ce"] + 0.75 * parts["kd"], rel=1e-5)


def test_init_from_edgegpt_teacher_takes_every_kth_layer(tiny_checkpoint):
    from edgegpt.model import GPT

    teacher = load_teacher(tiny_checkpoint, torch.device("cpu"))
    cfg = student_config_from_teacher(teacher, layers=2)  # nano has 4 layers: k = 2, layers 0 and 2
    student = GPT(cfg)
    assert init_from_teacher(student, teacher) == [0, 2]
    theirs = teacher.model.state_dict()
    ours = student.state_dict()
    torch.testing.assert_close(ours["embed.weight"], theirs["embed.weight"], rtol=0, atol=0)
    for mine, teachers in (("layers.1.attn.q_proj.weight", "layers.2.attn.q_proj.weight"),
                           ("layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.weight")):
        torch.testing.assert_close(ours[mine], theirs[teachers], rtol=0, atol=0)
    torch.testing.assert_close(ours["norm.weight"], theirs["norm.weight"], rtol=0, atol=0)


def test_init_from_llama_teacher_maps_its_weights(llama_teacher):
    from edgegpt.model import GPT

    teacher = load_teacher(llama_teacher, torch.device("cpu"))
    student = GPT(student_config_from_teacher(teacher, layers=None))  # half of 2 layers
    assert init_from_teacher(student, teacher) == [0]
    theirs = teacher.model.state_dict()
    torch.testing.assert_close(student.embed.weight, theirs["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(student.state_dict()["layers.0.attn.k_proj.weight"],
                               theirs["model.layers.0.self_attn.k_proj.weight"], rtol=0, atol=0)
    # And the student computes what the teacher's first layer computes: same logits with one layer each.
    teacher.model.model.layers = teacher.model.model.layers[:1]
    ids = torch.tensor([[3, 17, 42, 5]])
    torch.testing.assert_close(student.eval()(ids), teacher.logits(ids), rtol=1e-4, atol=1e-4)


# -- bad teachers: one line, exit 2 ---------------------------------------------------------------

def test_missing_teacher_path(tmp_path, small_corpus):
    line = one_line_error(runner.invoke(app, ["train", "--teacher", str(tmp_path / "nope"), "--data", str(small_corpus),
                                              "--out", str(tmp_path / "out")]))
    assert "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_directory_that_is_neither_format(tmp_path, small_corpus):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "weights.bin").write_bytes(b"\0" * 64)
    line = one_line_error(runner.invoke(app, ["train", "--teacher", str(tmp_path / "teacher"), "--data",
                                              str(small_corpus), "--out", str(tmp_path / "out")]))
    assert "is neither an edgegpt checkpoint" in line and "nor a Hugging Face model directory" in line


def test_teacher_vocabulary_differs_from_given_tokenizer(tmp_path, small_corpus, llama_teacher, tiny_checkpoint):
    line = one_line_error(runner.invoke(app, [
        "train", "--teacher", str(llama_teacher), "--tokenizer", str(tiny_checkpoint / "tokenizer.json"),
        "--data", str(small_corpus), "--out", str(tmp_path / "out"),
    ]))
    assert "different vocabulary from the teacher's" in line


def test_teacher_too_large_is_refused_before_loading(tmp_path, small_corpus, teacher_tokenizer):
    """A config for a ~0.7T-parameter Llama and no weights at all: the refusal comes from the config alone."""
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": TEACHER_VOCAB,
        "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 200, "num_attention_heads": 128,
        "num_key_value_heads": 8, "max_position_embeddings": 4096,
    }))
    teacher_tokenizer.save(str(huge / "tokenizer.json"))
    line = one_line_error(runner.invoke(app, ["train", "--teacher", str(huge), "--data", str(small_corpus),
                                              "--out", str(tmp_path / "out")]))
    assert "GiB" in line and "is free" in line


def test_init_from_teacher_refuses_a_gpt2_teacher(tmp_path, small_corpus, gpt2_teacher):
    line = one_line_error(runner.invoke(app, ["train", "--teacher", str(gpt2_teacher), "--init-from-teacher",
                                              "--data", str(small_corpus), "--out", str(tmp_path / "out")]))
    assert "'gpt2'" in line


@pytest.mark.parametrize("args, words", [
    (["--alpha", "1.5"], "--alpha"),
    (["--temperature", "0"], "--temperature"),
    (["--vocab-size", "600"], "--vocab-size"),
    (["--as-draft", "--alpha", "0.3"], "drop --alpha and --temperature"),
    (["--as-draft", "--temperature", "1.5"], "drop --alpha and --temperature"),
])
def test_bad_distillation_options(args, words, tmp_path, small_corpus, llama_teacher):
    line = one_line_error(runner.invoke(app, ["train", "--teacher", str(llama_teacher), *args, "--data",
                                              str(small_corpus), "--out", str(tmp_path / "out")]))
    assert words in line


def test_distillation_options_without_teacher(tmp_path, small_corpus):
    line = one_line_error(runner.invoke(app, ["train", "--alpha", "0.3", "--data", str(small_corpus),
                                              "--out", str(tmp_path / "out")]))
    assert "need --teacher" in line


def test_as_draft_needs_a_teacher(tmp_path, small_corpus):
    line = one_line_error(runner.invoke(app, ["train", "--as-draft", "--data", str(small_corpus),
                                              "--out", str(tmp_path / "out")]))
    assert "--as-draft" in line and "give --teacher" in line


def test_as_draft_is_the_acceptance_recipe():
    from edgegpt.train.options import DRAFT_RECIPE, TrainOptions

    assert TrainOptions(teacher="t", as_draft=True).distillation() == DRAFT_RECIPE == (0.0, 1.0)
    assert TrainOptions(teacher="t", alpha=0.25, temperature=3.0).distillation() == (0.25, 3.0)


@pytest.mark.slow  # a training run
def test_a_draft_learns_only_the_teachers_distribution(tmp_path, small_corpus, llama_teacher):
    _, steps = train_two_steps(tmp_path / "out", small_corpus, llama_teacher, as_draft=True)
    assert len(steps) == 2
    for loss, parts in steps:  # the loss is the KL term alone, labels unweighted
        assert parts["ce"] > 0 and loss == pytest.approx(parts["kd"], rel=1e-6)
    assert json.loads((tmp_path / "out" / "train_state.json").read_text())["options"]["as_draft"] is True  # resumes so


def test_sentencepiece_style_teacher_tokenizer_is_understood():
    """A Llama-2-style vocabulary (▁ for spaces, <0xNN> byte fallback, </s>) separates documents and counts
    characters exactly, so nats/char stays honest with a teacher's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edgegpt.scoring import char_starts_table
    from edgegpt.tokenizer import end_of_text_id

    # As Llama 2's tokenizer.json has it: byte tokens in the model's vocabulary, three special tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["t", "h", "e", "\u2581", "n", "a", "i", "v", "c", "s", ",", "th", "the", "\u2581c"]:
        vocab[piece] = len(vocab)
    merges = [("t", "h"), ("th", "e"), ("\u2581", "c")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never")])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    assert end_of_text_id(tokenizer) == tokenizer.token_to_id("</s>")
    text = "the naïve cat sat, 中文"  # ï, 中 and 文 are not in the vocabulary: byte fallback
    ids = tokenizer.encode(text).ids
    assert tokenizer.token_to_id("<0xE4>") in ids
    table = char_starts_table(tokenizer, tokenizer.get_vocab_size())
    assert int(table[ids].sum()) == len(text)
