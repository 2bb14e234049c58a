"""The context limit: a too-long prompt is an error unless truncate="left" keeps its last tokens, and a
stream says why it ended (finish_reason), "max_length" when the context filled up; the CLI's
--truncate and its notice on stderr."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.cli.chat import chat_loop
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator

runner = CliRunner()


@pytest.fixture(scope="module")
def gen(runtime_package, runtime_provider) -> Generator:
    return Generator.load(runtime_package, provider=runtime_provider)


@pytest.fixture(scope="module")
def corpus_ids(gen, corpus_text) -> list[int]:
    return gen.package.tokenizer.encode(corpus_text[:20_000]).ids


def prompt_of(gen: Generator, ids: list[int]) -> tuple[str, list[int]]:
    """A prompt text and the ids it encodes to (decoding then encoding may merge differently)."""
    text = gen.package.tokenizer.decode(ids)
    return text, gen.package.tokenizer.encode(text).ids


def greedy_from_ids(gen: Generator, ids: list[int], n: int) -> list[int]:
    """Greedy tokens after exactly `ids`, with prefill and decode_step (no text, no truncation)."""
    logits, cache = gen.prefill(ids)
    out = []
    while len(out) < n:
        out.append(int(np.argmax(logits)))
        if cache.length >= gen.max_length:
            break
        logits, cache = gen.decode_step(out[-1], cache)
    return out


# -- too long: an error by default, the last tokens with truncate="left" ---------------------------------


def test_a_prompt_longer_than_the_context_is_an_error_naming_the_way_out(gen, corpus_ids):
    long, _ = prompt_of(gen, corpus_ids[: gen.max_length + 40])
    batch = lambda p, **o: gen.generate_batch([p], **o)  # noqa: E731
    for call in (gen.generate, gen.stream, gen.generate_ids, gen.stream_tokens, batch):
        with pytest.raises(EdgeGPTError, match=rf"context is {gen.max_length} tokens.*truncate='left'") as raised:
            call(long, max_new_tokens=5)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("new", [1, 10, 50])
def test_truncate_left_keeps_the_last_tokens_with_room_for_the_new_ones(gen, corpus_ids, new):
    long, ids = prompt_of(gen, corpus_ids[: gen.max_length + 40])
    assert len(ids) > gen.max_length
    stream = gen.stream_tokens(long, truncate="left", max_new_tokens=new, temperature=0, stop_at_eos=False)
    tokens = list(stream)
    assert tokens == greedy_from_ids(gen, ids[-(gen.max_length - new):], new)
    assert len(tokens) == new and stream.finish_reason == "length"
    text = gen.generate(long, truncate="left", max_new_tokens=new, temperature=0, stop_at_eos=False)
    assert text == gen.package.tokenizer.decode(tokens)


def test_truncate_left_of_a_prompt_far_beyond_the_context_keeps_the_same_last_tokens(gen, corpus_text):
    """Only the prompt's tail is tokenized when it cannot fit (a huge paste stays cheap), and the tokens
    kept are exactly the last tokens of the whole prompt's encoding."""
    long = corpus_text[:200_000]
    whole = gen.package.tokenizer.encode(long).ids
    new = 10
    tokens = gen.generate_ids(long, truncate="left", max_new_tokens=new, temperature=0, stop_at_eos=False)
    assert tokens == greedy_from_ids(gen, whole[-(gen.max_length - new):], new)
    with pytest.raises(EdgeGPTError, match=r"the prompt is over [\d,]+ tokens"):
        gen.generate(long)


def test_truncate_left_makes_room_for_max_new_tokens_even_when_the_prompt_fits(gen, corpus_ids):
    text, ids = prompt_of(gen, corpus_ids[: gen.max_length - 5])
    options = dict(max_new_tokens=20, temperature=0, stop_at_eos=False)
    without = gen.stream_tokens(text, **options)
    assert len(list(without)) == gen.max_length - len(ids) + 1 and without.finish_reason == "max_length"
    cut = gen.stream_tokens(text, truncate="left", **options)
    assert list(cut) == greedy_from_ids(gen, ids[-(gen.max_length - 20):], 20) and cut.finish_reason == "length"


def test_truncate_left_keeps_at_least_one_prompt_token(gen, corpus_ids):
    long, ids = prompt_of(gen, corpus_ids[: gen.max_length + 40])
    stream = gen.stream_tokens(long, truncate="left", max_new_tokens=gen.max_length + 50, temperature=0,
                               stop_at_eos=False)
    tokens = list(stream)
    assert tokens == greedy_from_ids(gen, ids[-1:], gen.max_length)
    assert len(tokens) == gen.max_length and stream.finish_reason == "max_length"


def test_truncate_left_changes_nothing_for_a_prompt_with_room(gen):
    options = dict(max_new_tokens=20, temperature=0.9, seed=4)
    assert gen.generate("The ", truncate="left", **options) == gen.generate("The ", **options)


def test_truncate_in_a_batch_equals_one_by_one(gen, corpus_ids):
    long, _ = prompt_of(gen, corpus_ids[: gen.max_length + 40])
    options = dict(max_new_tokens=12, temperature=0.8, seed=2, truncate="left")
    expected = [gen.generate(long, **options), gen.generate("The ", **options)]
    assert gen.generate_batch([long, "The "], **options) == expected


@pytest.mark.parametrize("value", ["right", "LEFT", True, 1])
def test_a_bad_truncate_value_is_refused(gen, value):
    with pytest.raises(EdgeGPTError, match=r"truncate must be None .* or 'left'"):
        gen.stream("The ", truncate=value)


# -- finish_reason -------------------------------------------------------------------------------------


def test_finish_reason_length_stop_and_max_length(gen, corpus_ids):
    stream = gen.stream("The ", max_new_tokens=8, temperature=0, stop_at_eos=False)
    assert stream.finish_reason is None
    next(stream)
    assert stream.finish_reason is None  # not until the end
    list(stream)
    assert stream.finish_reason == "length"
    full = gen.generate("The ", max_new_tokens=30, temperature=0, stop_at_eos=False)
    stopped = gen.stream("The ", max_new_tokens=30, temperature=0, stop_at_eos=False, stop=full[12:15])
    assert "".join(stopped) == full[: full.index(full[12:15])] and stopped.finish_reason == "stop"
    text, ids = prompt_of(gen, corpus_ids[: gen.max_length - 3])
    full_context = gen.stream(text, max_new_tokens=50, temperature=0, stop_at_eos=False)
    list(full_context)
    assert full_context.finish_reason == "max_length"
    zero = gen.stream("The ", max_new_tokens=0)
    assert list(zero) == [] and zero.finish_reason == "length"


def test_finish_reason_eos(gen, tmp_path):
    import json
    import shutil

    ids = gen.generate_ids("The ", max_new_tokens=10, temperature=0)
    package = shutil.copytree(gen.package.path, tmp_path / "model")
    (package / "manifest.json").unlink()  # the edit below would fail its sha256
    config = json.loads((package / "generation_config.json").read_text())
    (package / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": ids[4]}))
    eos = Generator.load(package, provider=gen.provider)
    stream = eos.stream_tokens("The ", max_new_tokens=10, temperature=0)
    assert list(stream) == ids[: ids.index(ids[4])] and stream.finish_reason == "eos"


def test_finish_reason_cancelled(gen):
    cancel = threading.Event()
    stream = gen.stream("The ", cancel=cancel, max_new_tokens=50, temperature=0, stop_at_eos=False)
    next(stream)
    cancel.set()
    list(stream)
    assert stream.finish_reason == "cancelled"
    closed = gen.stream_tokens("The ", max_new_tokens=50, temperature=0)
    next(closed)
    closed.close()
    assert closed.finish_reason == "cancelled" and list(closed) == []
    assert gen.stream("The ", cancel=cancel).finish_reason is None  # set only by iterating
    assert list(gen.stream("The ", cancel=cancel)) == []


# -- the CLI --------------------------------------------------------------------------------------------


def test_generate_truncate_left_and_the_context_notice(gen, runtime_package, corpus_ids):
    base = ["--model", str(runtime_package), "--temperature", "0", "--provider", "cpu"]
    long, _ = prompt_of(gen, corpus_ids[: gen.max_length + 40])
    refused = runner.invoke(app, ["generate", long, *base, "--max-new-tokens", "5"])
    assert refused.exit_code == 2 and "--truncate left" in refused.stderr and refused.stderr.count("\n") == 1
    kept = runner.invoke(app, ["generate", long, *base, "--max-new-tokens", "5", "--truncate", "left"])
    assert kept.exit_code == 0, kept.output
    assert kept.stdout == long + gen.generate(long, max_new_tokens=5, temperature=0, truncate="left") + "\n"
    assert kept.stderr == ""  # room was left for the 5 tokens: no notice
    near, _ = prompt_of(gen, corpus_ids[: gen.max_length - 3])
    filled = runner.invoke(app, ["generate", near, *base, "--max-new-tokens", "50"])
    assert filled.exit_code == 0, filled.output
    assert filled.stderr.strip() == f"edgegpt: the model's context ({gen.max_length} tokens) is full; " \
                                    "generation stopped before --max-new-tokens"
    assert runner.invoke(app, ["generate", "x", *base, "--truncate", "middle"]).exit_code == 2


def test_chat_truncate_none_is_an_error_and_a_full_context_is_announced(gen, runtime_package, corpus_text):
    lines = [line for line in corpus_text.splitlines() if len(line) > 60][:12]
    base = ["chat", "--model", str(runtime_package), "--max-new-tokens", "12", "--temperature", "0",
            "--provider", "cpu"]
    strict = runner.invoke(app, [*base, "--truncate", "none"], input="\n".join(lines) + "\n")
    last_line = strict.stderr.strip().splitlines()[-1]  # after the "> " prompt
    assert strict.exit_code == 2 and "edgegpt: error: the prompt is" in last_line and "--truncate left" in last_line
    assert runner.invoke(app, [*base, "--truncate", "left"], input="\n".join(lines) + "\n").exit_code == 0
    said: list[str] = []
    out = io.StringIO()
    inputs = iter(["The import statement\n", ""])
    chat_loop(gen, lambda: next(inputs), out, said.append,
              dict(max_new_tokens=gen.max_length + 10, temperature=0, stop=["\x00"], stop_at_eos=False))
    assert f"(the context of {gen.max_length} tokens is full: the reply was cut short)\n" in said
    assert len(gen.package.tokenizer.encode(out.getvalue()).ids) > gen.max_length // 2
