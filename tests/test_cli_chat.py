"""`edgegpt chat` driven through its input, `edgegpt generate`'s sampling flags, and `edgegpt convert`."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from conftest import SCRIPT
from edgegpt.cli.app import app
from edgegpt.runtime import Generator

runner = CliRunner()
GREEDY = ["--max-new-tokens", "12", "--temperature", "0", "--provider", "cpu"]


@pytest.fixture(scope="module")
def gen(tiny_package) -> Generator:
    return Generator.load(tiny_package, provider="cpu")


def reply(gen: Generator, transcript: str) -> str:
    return gen.generate(transcript, max_new_tokens=12, temperature=0, stop="\n\n")


def test_chat_keeps_a_transcript_resets_and_quits(tiny_package, gen, corpus_text):
    # An opening line after which the reply to "return" differs from its reply in a fresh transcript: how far
    # a briefly trained model lets earlier lines change a reply depends on the CPU's rounding, so it is looked for.
    after_reset = reply(gen, "return\n")
    for opener in ["The import statement", *(line.strip() for line in corpus_text.splitlines()[:300])]:
        if not opener or opener.startswith("/"):
            continue
        first = reply(gen, opener + "\n")
        second = reply(gen, opener + "\n" + first + "\nreturn\n")
        if second != after_reset:
            break
    else:
        pytest.fail("no opening line changes the next reply: the test cannot tell a kept transcript from a reset one")
    result = runner.invoke(app, ["chat", "--model", str(tiny_package), *GREEDY],
                           input=f"{opener}\nreturn\n/reset\nreturn\n/quit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert "/reset" in result.stderr and "conversation forgotten" in result.stderr


def test_chat_exits_cleanly_at_end_of_input(tiny_package, gen):
    result = runner.invoke(app, ["chat", "--model", str(tiny_package), *GREEDY], input="def f\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == reply(gen, "def f\n") + "\n"
    assert runner.invoke(app, ["chat", "--model", str(tiny_package)], input="").exit_code == 0


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_package, gen, corpus_text):
    lines = [line for line in corpus_text.splitlines() if len(line) > 60][:12]
    result = runner.invoke(app, ["chat", "--model", str(tiny_package), *GREEDY], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) >= len(lines)


def test_chat_with_a_bad_option_is_one_line(tiny_package):
    result = runner.invoke(app, ["chat", "--model", str(tiny_package), "--top-p", "2"], input="hi\n")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("edgegpt: error: top_p must be in")


def test_generate_flags_reach_the_sampler(tiny_package, gen):
    full = gen.generate("The ", max_new_tokens=30, temperature=0)
    stop = full[10:13]
    result = runner.invoke(app, ["generate", "The ", "--model", str(tiny_package), "--max-new-tokens", "30",
                                 "--temperature", "0", "--stop", "never", "--stop", stop, "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "The " + full[: full.index(stop)] + "\n"
    penalised = runner.invoke(app, ["generate", "The ", "--model", str(tiny_package), "--max-new-tokens", "30",
                                    "--temperature", "0", "--repetition-penalty", "1e6", "--min-p", "0.5"])
    assert penalised.stdout == "The " + gen.generate("The ", max_new_tokens=30, temperature=0,
                                                    repetition_penalty=1e6) + "\n"
    bad = runner.invoke(app, ["generate", "The ", "--model", str(tiny_package), "--min-p", "3"])
    assert bad.exit_code == 2 and bad.stderr.startswith("edgegpt: error: min_p")


def test_repetition_penalty_reaches_the_sampler(tiny_package, gen, corpus_text):
    """--repetition-penalty's output is the API's with the penalty, on a prompt where the penalty changes the
    greedy text (looked for: what a briefly trained model repeats depends on the CPU's rounding)."""
    options = dict(max_new_tokens=30, temperature=0)
    candidates = ["The ", *(line.strip() for line in corpus_text.splitlines()[:100] if line.strip())]
    prompt = next((p for p in candidates
                   if gen.generate(p, **options, repetition_penalty=1e6) != gen.generate(p, **options)), None)
    assert prompt is not None, "the penalty changes no prompt's text: the test could not tell it was applied"
    penalised = runner.invoke(app, ["generate", prompt, "--model", str(tiny_package), "--max-new-tokens", "30",
                                    "--temperature", "0", "--repetition-penalty", "1e6", "--provider", "cpu"])
    assert penalised.exit_code == 0, penalised.output
    assert penalised.stdout == prompt + gen.generate(prompt, **options, repetition_penalty=1e6) + "\n"


def test_convert_prints_the_direction(tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny_checkpoint), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"checkpoint → huggingface: {tmp_path / 'hf'}"
    assert (tmp_path / "hf" / "config.json").is_file()


def test_convert_bad_input_is_one_line(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: ") and "neither" in lines[0]
    assert "Traceback" not in result.output


def test_chat_takes_every_option_generate_takes():
    """The prompt options and --chat aside (generate's way to ask one question), including --max-length."""
    commands = get_command(app).commands
    chat = {p.name: (p.opts, p.help) for p in commands["chat"].params}
    prompt_only = ("prompt", "prompt_file", "chat")  # where generate takes its prompt, and --chat
    generate = {p.name: (p.opts, p.help) for p in commands["generate"].params if p.name not in prompt_only}
    assert chat == generate and "max_length" in chat
    assert {p.name: p.opts for p in commands["bench"].params}["max_length"] == ["--max-length"]


def test_chat_sampling_flags_reach_the_sampler(tiny_package, gen):
    greedy = reply(gen, "def f\n")
    # A seed whose sample differs from the greedy reply here, so that a flag that did nothing would show.
    seed = next((s for s in range(50)
                 if gen.generate("def f\n", max_new_tokens=12, temperature=1.5, seed=s, stop="\n\n") != greedy), None)
    assert seed is not None, "the test cannot tell sampling from greedy decoding"
    sampled = ["chat", "--model", str(tiny_package), "--max-new-tokens", "12", "--temperature", "1.5", "--seed",
               str(seed)]
    for narrowed in (["--top-k", "1"], ["--min-p", "1"]):  # each leaves only the most likely token
        result = runner.invoke(app, [*sampled, *narrowed], input="def f\n")
        assert result.exit_code == 0, result.output
        assert result.stdout == greedy + "\n", narrowed
    bad = runner.invoke(app, ["chat", "--model", str(tiny_package), "--top-k", "-1"], input="def f\n")
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1].startswith("edgegpt: error: top_k")


def test_chat_stop_adds_to_the_blank_line(scripted_package):
    """--stop ends a reply at its string, and a blank line still ends it too. The scripted package writes a
    blank line a few words in on every CPU (conftest.SCRIPT), which a trained model need not."""
    scripted = Generator.load(scripted_package, provider="cpu")
    line = "The import statement"
    continuation = scripted.generate(line + "\n", max_new_tokens=30, temperature=0)
    before_blank = continuation[: continuation.index("\n\n")]
    assert before_blank == SCRIPT[0] and SCRIPT[1] in continuation  # text goes on after the blank line
    stop = before_blank[-3:]
    chat = ["chat", "--model", str(scripted_package), "--max-new-tokens", "30", "--temperature", "0"]
    added = runner.invoke(app, [*chat, "--stop", "never in this text"], input=line + "\n")
    assert added.exit_code == 0, added.output
    assert added.stdout == before_blank + "\n"
    cut = runner.invoke(app, [*chat, "--stop", "never in this text", "--stop", stop], input=line + "\n")
    assert cut.exit_code == 0, cut.output
    assert cut.stdout == continuation[: continuation.index(stop)] + "\n"
