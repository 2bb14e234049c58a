"""Speculative decoding (runtime/speculative.py): with a draft model or prompt lookup the greedy text is
the plain text, sampled text follows the plain distribution exactly, and every stop rule and cancel
behaves as without speculation, also when it falls inside a run of accepted guesses."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator, speculative
from edgegpt.runtime.decoding import Decoding
from edgegpt.runtime.sampling import Sampler, SamplingParams
from edgegpt.runtime.speculative import Drafters, LookupDrafter, SpeculationStats, run_speculative


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, tiny_checkpoint):
    """A draft with the target's tokenizer and random weights: it is mostly wrong (the rejection path)."""
    import torch

    from edgegpt.checkpoint import load_checkpoint, save_checkpoint
    from edgegpt.core.config import ModelConfig
    from edgegpt.export import export_package
    from edgegpt.model import GPT

    target, tokenizer = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=target.cfg.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                         max_len=target.cfg.max_len)
    checkpoint = tmp_path_factory.mktemp("draft") / "checkpoint"
    save_checkpoint(checkpoint, GPT(config).eval(), tokenizer)
    export_package(checkpoint, checkpoint.parent / "model", gate=False)
    return checkpoint.parent / "model"


@pytest.fixture(scope="module")
def plain(tiny_package) -> Generator:
    return Generator.load(tiny_package, provider="cpu")


@pytest.fixture(scope="module", params=["same weights", "random weights"])
def drafted(request, tiny_package, random_draft) -> Generator:
    """The target with a draft: itself (every guess right: the bonus path) or a random model (mostly wrong)."""
    draft = tiny_package if request.param == "same weights" else random_draft
    return Generator.load(tiny_package, provider="cpu", draft=draft)


def corpus_prompts(corpus_text: str, count: int = 12) -> list[str]:
    """Prompts from the corpus; every third repeats a passage, so lookup finds something to guess from."""
    prompts = []
    for i in range(count):
        piece = corpus_text[i * 997 : i * 997 + 160]
        prompts.append(piece + " " + piece[:60] if i % 3 == 0 else piece)
    return prompts


# A stop case's strings come from the plain text itself (stop_from_text), so every CPU's text has them.
GREEDY_CASES = [dict(max_new_tokens=40), dict(max_new_tokens=25, stop="one"), dict(max_new_tokens=60, stop="two"),
                dict(max_new_tokens=1), dict(max_new_tokens=50, stop_at_eos=False)]


def stop_from_text(options: dict, plain: Generator, prompt: str) -> dict:
    """options with "stop" replaced by strings the plain greedy text holds: "one", three characters from its
    middle (it ends there or earlier); "two", those and two characters near its start (the earlier one wins)."""
    if "stop" not in options:
        return options
    text = plain.generate(prompt, temperature=0, **{k: v for k, v in options.items() if k != "stop"})
    middle, start = len(text) // 2, min(3, len(text) // 4)
    stops = [text[middle : middle + 3]] + ([text[start : start + 2]] if options["stop"] == "two" else [])
    return {**options, "stop": [s for s in stops if s] or None}


@pytest.mark.parametrize("options", GREEDY_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_greedy_with_a_draft_is_the_plain_text(drafted, plain, corpus_text, options):
    stopped = 0
    for prompt in corpus_prompts(corpus_text):
        options_here = stop_from_text(options, plain, prompt)
        expected = plain.stream(prompt, temperature=0, **options_here)
        text = "".join(expected)
        stream = drafted.stream(prompt, temperature=0, **options_here)
        assert "".join(stream) == text
        assert (stream.finish_reason, stream.completion_tokens) == (expected.finish_reason, expected.completion_tokens)
        assert stream.speculation is not None and stream.speculation.target_steps <= expected.completion_tokens
        stopped += stream.finish_reason == "stop"
    assert stopped > 0 or "stop" not in options  # the stop path ran


@pytest.mark.parametrize("options", GREEDY_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_greedy_with_lookup_is_the_plain_text(plain, corpus_text, options):
    kept = stopped = 0
    for prompt in corpus_prompts(corpus_text):
        options_here = stop_from_text(options, plain, prompt)
        expected = plain.stream(prompt, temperature=0, **options_here)
        text = "".join(expected)
        stream = plain.stream(prompt, temperature=0, lookup=True, **options_here)
        assert "".join(stream) == text and stream.finish_reason == expected.finish_reason
        kept += stream.speculation.accepted
        stopped += stream.finish_reason == "stop"
    # Lookup did guess right, so runs were accepted: the cases that run on (a stop string from the text's
    # middle may end a reply before it repeats anything) and make more than one token.
    assert kept > 0 or options["max_new_tokens"] == 1 or "stop" in options
    assert stopped > 0 or "stop" not in options  # the stop path ran


def test_the_same_weights_as_draft_are_always_right(tiny_package, plain):
    same = Generator.load(tiny_package, provider="cpu", draft=tiny_package)
    stream = same.stream("The import statement", temperature=0, max_new_tokens=60, stop_at_eos=False)
    assert "".join(stream) == plain.generate("The import statement", temperature=0, max_new_tokens=60,
                                             stop_at_eos=False)
    stats = stream.speculation
    assert stats.acceptance == 1.0 and stats.tokens_per_step > 3  # several tokens per target pass


def test_the_context_filling_inside_an_accepted_run(tiny_package, corpus_text):
    """max_length reached in the middle of a verified run: the same tokens and finish reason as plain."""
    short_plain = Generator.load(tiny_package, provider="cpu", max_length=48, draft=None)
    short_draft = Generator.load(tiny_package, provider="cpu", max_length=48, draft=tiny_package)
    for prompt in corpus_prompts(corpus_text, 6):
        prompt_ids = short_plain.encode(prompt[:40])
        expected = short_plain.stream_tokens(prompt_ids, temperature=0, max_new_tokens=200, stop_at_eos=False)
        tokens = list(expected)
        for generator, options in ((short_draft, {}), (short_plain, {"lookup": True})):
            stream = generator.stream_tokens(prompt_ids, temperature=0, max_new_tokens=200, stop_at_eos=False,
                                             **options)
            assert list(stream) == tokens and stream.finish_reason == expected.finish_reason == "max_length"


def test_no_speculation_switches_it_off(drafted):
    stream = drafted.stream("The ", temperature=0, max_new_tokens=5, speculate=False, lookup=True)
    "".join(stream)
    assert stream.speculation is None


def test_cancel_stops_within_one_pass(drafted):
    cancel = threading.Event()
    stream = drafted.stream_tokens("The ", temperature=0, max_new_tokens=100, stop_at_eos=False, cancel=cancel)
    first = next(stream)
    cancel.set()
    rest = list(stream)
    assert first is not None and len(rest) <= speculative.MOST_GUESSES  # what the pass in flight made at most
    assert stream.finish_reason == "cancelled"


def test_a_draft_with_another_tokenizer_is_refused(tiny_package, tmp_path):
    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.core.config import preset
    from edgegpt.export import export_package
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a completely different little corpus " * 50], 300)
    save_checkpoint(tmp_path / "checkpoint", GPT(preset("nano", vocab_size=300, max_len=128)).eval(), tokenizer)
    export_package(tmp_path / "checkpoint", tmp_path / "model", gate=False)
    with pytest.raises(EdgeGPTError, match="^the draft .* has another tokenizer") as error:
        Generator.load(tiny_package, provider="cpu", draft=tmp_path / "model")
    assert "\n" not in str(error.value)


def test_bad_switches_are_refused(plain):
    with pytest.raises(EdgeGPTError, match="lookup must be True or False"):
        plain.generate("x", lookup="yes")


# -- the distribution: speculative sampling is plain sampling, exactly -----------------------------------

VOCAB = 4
RNG = np.random.default_rng(0)
TARGET_BIGRAM = RNG.normal(0, 1.5, (VOCAB, VOCAB))  # logits of the next token given the last one
DRAFT_BIGRAM = RNG.normal(0, 1.5, (VOCAB, VOCAB))  # a draft that is often wrong
PARAMS = SamplingParams(temperature=0.9, repetition_penalty=1.5)
PROMPT = [1]
NEW = 3


def toy_forward(history: list[int]):
    """A bigram 'model' over `history`: forward(tokens) gives logits for each token appended."""

    def forward(tokens: list[int]) -> np.ndarray:
        history.extend(tokens)
        return TARGET_BIGRAM[tokens]

    return forward


class ToyDraft:
    """The draft bigram, sampled as a draft model is (its q from the forked sampler)."""

    def __init__(self, k: int, rng: np.random.Generator) -> None:
        self.k, self.rng = k, rng

    def propose(self, history, k, sampler):
        fork, last, guesses, qs = sampler.fork(self.rng), history[-1], [], []
        for _ in range(min(k, self.k)):
            q = fork.probabilities(DRAFT_BIGRAM[last])
            last = int(self.rng.choice(VOCAB, p=q))
            fork.record(last)
            guesses.append(last)
            qs.append(q)
        return guesses, qs

    def settle(self, valid, proposed, accepted):
        pass


def continuations(draws: int, speculate: bool) -> np.ndarray:
    """Counts of every NEW-token continuation of PROMPT over `draws` seeded runs."""
    counts = np.zeros(VOCAB ** NEW, int)
    for seed in range(draws):
        sampler = Sampler(PARAMS, seed, PROMPT, VOCAB)
        decoding = Decoding(len(PROMPT), NEW, max_length=64, stop_at_eos=False)
        if speculate:
            history: list[int] = []

            def truncate(length: int, history=history) -> None:
                del history[length:]

            tokens = list(run_speculative(decoding, PROMPT, toy_forward(history), truncate, sampler,
                                          ToyDraft(3, np.random.default_rng([seed, 1])), 64, SpeculationStats()))
        else:
            tokens = list(decoding.run(lambda: TARGET_BIGRAM[PROMPT[-1]], lambda t: TARGET_BIGRAM[t], sampler.choose))
        counts[np.ravel_multi_index(tokens, (VOCAB,) * NEW)] += 1
    return counts


def exact_distribution() -> np.ndarray:
    """The target's own probability of each continuation, with the repetition penalty's dependence on history."""
    probs = np.zeros(VOCAB ** NEW)
    for index in range(VOCAB ** NEW):
        tokens, p = np.unravel_index(index, (VOCAB,) * NEW), 1.0
        sampler = Sampler(PARAMS, 0, PROMPT, VOCAB)
        last = PROMPT[-1]
        for token in tokens:
            p *= sampler.probabilities(TARGET_BIGRAM[last])[token]
            sampler.record(int(token))
            last = int(token)
        probs[index] = p
    return probs


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# df = 63; the 0.999 quantile of chi-square(63) is 103.4: a right rule passes (deterministic seeds), a wrong
# one is far beyond it.
CHI2_LIMIT = 103.4
DRAWS = 6000


@pytest.mark.slow  # over half a second on two cores
def test_speculative_sampling_has_the_target_distribution():
    probs = exact_distribution()
    assert chi_square(continuations(DRAWS, speculate=False), probs) < CHI2_LIMIT  # the test's own yardstick
    assert chi_square(continuations(DRAWS, speculate=True), probs) < CHI2_LIMIT


def accept_all(guesses, distributions, logits, sampler):
    """Wrong: every guess kept (the draft's distribution)."""
    for guess in guesses:
        sampler.record(guess)
    return [*guesses, sampler.choose(logits[len(guesses)])], len(guesses)


def resample_from_p(guesses, distributions, logits, sampler):
    """Subtly wrong: accept with probability p (not p / q) and, on a rejection, draw from p, not from the
    normalised max(0, p - q)."""
    tokens = []
    for i, guess in enumerate(guesses):
        p = sampler.probabilities(logits[i])
        if sampler.rng.random() < p[guess]:
            sampler.record(guess)
            tokens.append(guess)
            continue
        return [*tokens, sampler.choose(logits[i])], len(tokens)
    return [*tokens, sampler.choose(logits[len(guesses)])], len(tokens)


@pytest.mark.slow  # over half a second on two cores
@pytest.mark.parametrize("wrong_rule", [accept_all, resample_from_p])
def test_a_wrong_acceptance_rule_fails_the_same_test(monkeypatch, wrong_rule):
    monkeypatch.setattr(speculative, "verify", wrong_rule)
    assert chi_square(continuations(DRAWS, speculate=True), exact_distribution()) > CHI2_LIMIT


def test_lookup_guesses_what_followed_the_last_ngram():
    lookup = LookupDrafter()
    for length in lookup.lengths.values():  # as if every guess so far was kept: k is not the limit
        length.kept = length.checked
    sampler = Sampler(SamplingParams(), None, [], 50)
    history = [5, 6, 7, 8, 9, 5, 6, 7]
    assert lookup.propose(history, 3, sampler) == ([8, 9, 5], None)  # after the earlier "5 6 7"
    assert lookup.propose([1, 2, 3], 3, sampler) == ([], None)  # nothing repeats
    drafters = Drafters([lookup])
    assert drafters.propose(history + [8], 2, sampler)[0] == [9, 5]


def test_lookup_pauses_when_it_is_rarely_right():
    lookup = LookupDrafter()
    sampler = Sampler(SamplingParams(), None, [], 50)
    history = [1, 2, 1, 2, 1]
    for _ in range(3):
        guesses, _ = lookup.propose(history, 4, sampler)
        lookup.settle(len(history), len(guesses), 0)
    assert lookup.propose(history, 4, sampler) == ([], None)  # paused: no guesses for a while


def test_lookup_keeps_an_account_per_ngram_length():
    """Repeated single tokens that are rarely followed by the same thing stop being guessed from, while a
    repeated 3-gram still is."""
    lookup = LookupDrafter()
    lookup.lengths[1].kept, lookup.lengths[1].checked = 0.0, 10.0  # 1-gram guesses have all failed
    sampler = Sampler(SamplingParams(), None, [], 50)
    history = [7, 8, 9, 6, 1, 2, 3, 4, 5, 1]  # ends in a token seen before, no longer n-gram repeats
    assert lookup.propose(history, 4, sampler) == ([], None)
    history += [7, 8, 9]  # now the 3-gram 7 8 9 repeats
    guesses, _ = lookup.propose(history, 4, sampler)
    assert guesses and guesses == [6, 1, 2, 3][: len(guesses)]  # what followed 7 8 9, as many as pay


def test_guess_length_follows_the_kept_rate():
    always = speculative.GuessLength(speculative.DRAFT_GUESS_COST)
    for _ in range(10):
        k = always.next()
        always.update(k, k)
    assert always.next() == speculative.MOST_GUESSES  # every guess kept: as many as a pass takes

    never = speculative.GuessLength(speculative.DRAFT_GUESS_COST)
    passes_with_guesses = 0
    for _ in range(200):
        k = never.next()
        passes_with_guesses += k > 0
        never.update(k, 0)
    # One try after each pause, and the pauses double (8, 16, 32, 64, 128): 5 of 200 passes guess.
    assert passes_with_guesses == 5 and never.pause == 128

    middling = speculative.GuessLength(speculative.DRAFT_GUESS_COST)
    middling.kept, middling.checked = 6.0, 10.0  # 60% kept: a few guesses pay, not many
    assert 1 <= middling.best() <= 4 and middling.next() == middling.best()
    rare = speculative.GuessLength(speculative.DRAFT_GUESS_COST)
    rare.kept, rare.checked = 3.0, 10.0  # 30% kept: a verification of even one guess costs more than it makes
    assert rare.best() == 0 and rare.next() == 0 and rare.paused


def test_guess_length_is_the_same_for_the_same_history():
    """A function of what was kept only: a seeded run makes the same choices, so the same text."""
    first, second = (speculative.GuessLength(speculative.LOOKUP_GUESS_COST) for _ in range(2))
    outcomes = np.random.default_rng(0).integers(0, 9, 300)
    for outcome in outcomes:
        k1, k2 = first.next(), second.next()
        assert k1 == k2
        first.update(k1, min(k1, int(outcome)))
        second.update(k2, min(k2, int(outcome)))


# -- the commands ------------------------------------------------------------------------------------------

@pytest.mark.slow  # over half a second on two cores
def test_generate_and_bench_take_the_speculation_flags(tiny_package, plain):
    from typer.testing import CliRunner

    from edgegpt.cli.app import app

    runner = CliRunner()
    greedy = ["--model", str(tiny_package), "--temperature", "0", "--max-new-tokens", "30"]
    expected = "The import statement" + plain.generate("The import statement", temperature=0, max_new_tokens=30)
    for flags in (["--lookup"], ["--draft", str(tiny_package)], ["--draft", str(tiny_package), "--lookup"],
                  ["--lookup", "--no-speculation"]):
        result = runner.invoke(app, ["generate", "The import statement", *greedy, *flags])
        assert result.exit_code == 0 and result.stdout == expected + "\n", (flags, result.output)
    missing = runner.invoke(app, ["generate", "x", *greedy, "--draft", str(tiny_package.parent / "nothing")])
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1

    from edgegpt.cli.bench import run_bench

    report = run_bench(tiny_package, prompt_len=8, new_tokens=16, runs=1, provider="cpu", draft=tiny_package)
    assert report["speculation"]["acceptance"] == 1.0 and report["speculation"]["tokens_per_step"] > 1
    assert run_bench(tiny_package, prompt_len=8, new_tokens=16, runs=1, provider="cpu")["speculation"] is None


@pytest.mark.slow  # over half a second on two cores
def test_the_server_speculates_with_a_draft_and_gives_the_plain_text(tiny_package, plain):
    from serving import Server

    body = {"prompt": "The import statement", "temperature": 0, "max_tokens": 30}
    expected = plain.generate("The import statement", temperature=0, max_new_tokens=30)
    with Server(tiny_package, "--draft", str(tiny_package)) as server:
        assert server.request("POST", "/v1/completions", body)[1]["choices"][0]["text"] == expected
        assert server.request("POST", "/v1/completions", {**body, "lookup": True, "speculate": False}
                              )[1]["choices"][0]["text"] == expected
        assert server.request("POST", "/v1/completions", {**body, "lookup": "yes"})[0] == 400


# -- speculation with batching: each row speculates as it would alone, never a silent plain decode ------------

def lookup_differs_from_plain(plain: Generator, corpus_text: str, options: dict) -> tuple[str, int, str]:
    """A prompt and seed whose seeded text with lookup differs from the plain one (speculation draws other
    random numbers), found in what this CPU generates; and that text. A batch that decoded it plainly
    would give the plain text, so the property the tests need is built here, not assumed."""
    for prompt in corpus_prompts(corpus_text, 6):
        for seed in range(4):
            text = plain.generate(prompt, lookup=True, seed=seed, **options)
            if text != plain.generate(prompt, seed=seed, **options):
                return prompt, seed, text
    pytest.fail("lookup never changed a seeded sampled text: nothing to tell speculation from plain decoding")


def counting_speculation(monkeypatch) -> list[SpeculationStats]:
    """Every speculative decode the Generator starts from now on, as the stats it fills."""
    from edgegpt.runtime import generator as generator_module

    started: list[SpeculationStats] = []
    run = generator_module.run_speculative

    def recorded(*args, **keywords):
        started.append(args[-1])
        return (yield from run(*args, **keywords))

    monkeypatch.setattr(generator_module, "run_speculative", recorded)
    return started


@pytest.mark.parametrize("options", [dict(temperature=0, max_new_tokens=40),
                                     dict(temperature=1.2, top_k=0, max_new_tokens=40, stop_at_eos=False)])
def test_a_batch_with_lookup_is_its_one_by_one_lookups(plain, corpus_text, options, monkeypatch):
    prompts = corpus_prompts(corpus_text, 6)
    seeds = list(range(len(prompts)))
    expected = [plain.generate(p, lookup=True, seed=s, **options) for p, s in zip(prompts, seeds)]
    started = counting_speculation(monkeypatch)
    assert plain.generate_batch(prompts, lookup=True, seed=seeds, **options) == expected
    assert len(started) == len(prompts) and sum(stats.proposed for stats in started) > 0  # it did guess
    started.clear()
    assert plain.generate_batch(prompts, lookup=True, speculate=False, seed=seeds, **options) == \
        plain.generate_batch(prompts, seed=seeds, **options)
    assert started == []  # speculate=False: batched plainly, as asked


def test_a_batch_with_a_draft_is_its_one_by_one_generations(drafted, corpus_text, monkeypatch):
    prompts = corpus_prompts(corpus_text, 4)
    seeds, options = [3, 1, 4, 1], dict(temperature=0.9, max_new_tokens=30)
    expected = [drafted.generate(p, seed=s, **options) for p, s in zip(prompts, seeds)]
    started = counting_speculation(monkeypatch)
    assert drafted.generate_batch(prompts, seed=seeds, **options) == expected
    assert len(started) == len(prompts) and all(stats.target_steps > 0 for stats in started)


def test_the_continuous_batcher_speculates_a_sequence_that_asks(plain, corpus_text):
    from edgegpt.runtime.continuous import ContinuousBatcher

    options = dict(temperature=1.2, top_k=0, max_new_tokens=40, stop_at_eos=False)
    prompt, seed, expected = lookup_differs_from_plain(plain, corpus_text, options)
    batcher = ContinuousBatcher(plain, 2)
    try:
        beside = batcher.stream(prompt, seed=seed, **options)  # a plain sequence in the batch meanwhile
        first = next(beside)
        stream = batcher.stream(prompt, lookup=True, seed=seed, **options)
        assert "".join(stream) == expected and stream.speculation.proposed > 0
        assert first + "".join(beside) == plain.generate(prompt, seed=seed, **options) != expected
        assert beside.speculation is None
    finally:
        batcher.close()


@pytest.mark.slow  # over half a second on two cores
def test_a_batching_server_honours_lookup_per_request(tiny_package, plain, corpus_text):
    from serving import Server

    options = dict(temperature=1.2, top_k=0, max_new_tokens=40, stop_at_eos=False)
    prompt, seed, expected = lookup_differs_from_plain(plain, corpus_text, options)
    body = {"prompt": prompt, "temperature": 1.2, "top_k": 0, "max_tokens": 40, "ignore_eos": True, "seed": seed}
    with Server(tiny_package, "--parallel", "2") as server:  # a fused package on the CPU: continuous batching
        status, reply = server.request("POST", "/v1/completions", {**body, "lookup": True})
        assert status == 200 and reply["choices"][0]["text"] == expected
        status, reply = server.request("POST", "/v1/completions", body)
        assert status == 200 and reply["choices"][0]["text"] == plain.generate(prompt, seed=seed, **options)
