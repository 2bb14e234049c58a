"""The generation API: every option changes the outcome, stop strings never leak, batch equals one-by-one,
threads share one Generator, cancelling stops within one step, and the PyTorch reference samples the
same tokens as the runtime."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref

import pytest

from conftest import RUNTIME_PROVIDER, same_tokens
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator
from edgegpt.runtime.sampling import SamplingParams

PROMPTS = ["The ", "def f(x):\n\treturn", "", "The import statement binds a name in the local namespace"]
HOT = dict(temperature=5.0, seed=0, max_new_tokens=30)  # nearly uniform: far from greedy unless filtered


@pytest.fixture(scope="module")
def gen(runtime_package, runtime_provider) -> Generator:
    return Generator.load(runtime_package, provider=runtime_provider)


@pytest.fixture(scope="module")
def plain(plain_package, runtime_provider) -> Generator:
    return Generator.load(plain_package, provider=runtime_provider)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from edgegpt.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)[0]


def greedy(g: Generator, prompt: str = "The ", n: int = 30) -> list[int]:
    return g.generate_ids(prompt, max_new_tokens=n, temperature=0)


def edited_copy(g: Generator, directory, **generation_config):
    """A copy of g's package with generation_config.json changed, and without manifest.json, whose
    sha256 of the file would otherwise refuse the edit."""
    package = shutil.copytree(g.package.path, directory / "model")
    (package / "manifest.json").unlink()
    path = package / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **generation_config}))
    return package


# -- every option, each with a test that fails when the option is ignored ------------------------------


def test_temperature_zero_is_greedy_and_hot_sampling_is_not(gen):
    assert gen.generate_ids("The ", temperature=0, max_new_tokens=30, seed=0) == greedy(gen)
    assert gen.generate_ids("The ", **HOT) != greedy(gen)


@pytest.mark.parametrize("option", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_each_filter_alone_can_make_hot_sampling_greedy(gen, option):
    assert gen.generate_ids("The ", **HOT, **option) == greedy(gen)


def test_repetition_penalty_keeps_greedy_from_repeating(gen):
    plain_ids = gen.generate_ids("The ", max_new_tokens=40, temperature=0, stop_at_eos=False)
    assert len(set(plain_ids)) < len(plain_ids), "greedy must repeat itself for this test to mean anything"
    prompt_ids = gen.encode("The ")
    # stop_at_eos=False: the length is then the penalty's doing whatever tokens this CPU's kernels pick.
    penalised = gen.generate_ids("The ", max_new_tokens=40, temperature=0, repetition_penalty=1e6, stop_at_eos=False)
    assert len(penalised) == 40 and len(set(penalised)) == 40 and not set(penalised) & set(prompt_ids)


def test_seed(gen):
    options = dict(temperature=1.0, top_k=40, min_p=0.02, max_new_tokens=30)
    assert gen.generate("The ", seed=1, **options) == gen.generate("The ", seed=1, **options)
    assert gen.generate("The ", seed=1, **options) != gen.generate("The ", seed=2, **options)


def test_max_new_tokens_and_stop_at_eos(gen, runtime_provider, tmp_path):
    assert len(gen.generate_ids("The ", max_new_tokens=7, temperature=0, stop_at_eos=False)) == 7
    # Make the fifth greedy token the end-of-text token: generation stops before it unless told not to.
    ids = gen.generate_ids("The ", max_new_tokens=10, temperature=0, stop_at_eos=False)
    eos = Generator.load(edited_copy(gen, tmp_path, eos_token_id=ids[4]), provider=runtime_provider)
    assert eos.generate_ids("The ", max_new_tokens=10, temperature=0) == ids[: ids.index(ids[4])]
    assert eos.generate_ids("The ", max_new_tokens=10, temperature=0, stop_at_eos=False) == ids
    assert eos.generate_batch(["The "], max_new_tokens=10, temperature=0) == [eos.generate("The ", max_new_tokens=10,
                                                                                             temperature=0)]


# -- stop strings ------------------------------------------------------------------------------------


def stop_spanning_tokens(g: Generator, ids: list[int]) -> str:
    """A stop string that starts inside one token and ends inside a later one."""
    decode = g.package.tokenizer.decode
    start = len(decode(ids[:6])) - 1  # the last character of token 6
    end = len(decode(ids[:8])) + 1  # the first character of token 9
    return decode(ids)[start:end]


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=4)])
def test_stop_string_spanning_tokens_never_leaks(gen, options):
    full = gen.generate("The ", max_new_tokens=30, **options)
    stop = stop_spanning_tokens(gen, gen.generate_ids("The ", max_new_tokens=30, **options))
    expected = full[: full.index(stop)]
    assert gen.generate("The ", max_new_tokens=30, stop=stop, **options) == expected
    shown = ""
    for piece in gen.stream("The ", max_new_tokens=30, stop=["never there", stop], **options):
        shown += piece
        assert expected.startswith(shown), "a stream showed text it had to take back"
    assert shown == expected
    assert gen.generate_batch(["The ", "def "], max_new_tokens=30, stop=stop, **options)[0] == expected


def early_and_late(text: str) -> tuple[str, str]:
    """Two stop strings taken from `text`: `early` first occurs at position 1 or later, `late` only after
    `early` has ended (read from the text this CPU generated, not assumed of a trained model's)."""
    for start in range(1, len(text) - 3):
        early = text[start : start + 3]
        begins = text.index(early)
        for late_start in range(begins + len(early), len(text) - 3):
            late = text[late_start : late_start + 4]
            if text.index(late) >= begins + len(early):
                return early, late
    pytest.fail(f"the text repeats too tightly to hold a late stop string: {text!r}")


def test_the_earliest_stop_string_wins_and_a_held_back_prefix_is_released(gen):
    full = gen.generate("The ", max_new_tokens=30, temperature=0)
    early, late = early_and_late(full)
    assert gen.generate("The ", max_new_tokens=30, temperature=0, stop=[late, early]) == full[: full.index(early)]
    # A stop string whose beginning appears but never completes: nothing may be lost at the end.
    assert gen.generate("The ", max_new_tokens=30, temperature=0, stop=full[-2:] + "\x00") == full


# -- batches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0, max_new_tokens=40),
     dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=3, max_new_tokens=40),
     dict(temperature=0.8, seed=5, max_new_tokens=60, stop=["\n\n", "ing"])],
)
def test_batch_equals_one_by_one(gen, plain, options):
    expected = [gen.generate(prompt, **options) for prompt in PROMPTS]
    assert gen.generate_batch(PROMPTS, **options) == expected
    # The concat layout runs the rows one after another (and is float32 even when `gen` is float16).
    assert plain.generate_batch(PROMPTS, **options) == [plain.generate(prompt, **options) for prompt in PROMPTS]


def test_batch_with_one_seed_per_row_and_a_row_that_fills_the_context(gen, corpus_text):
    tokenizer = gen.package.tokenizer
    long_prompt = tokenizer.decode(tokenizer.encode(corpus_text).ids[: gen.max_length - 3])
    prompts = ["The ", long_prompt, "def "]
    seeds = [7, 8, 9]
    options = dict(temperature=1.0, max_new_tokens=20, stop_at_eos=False)
    expected = [gen.generate(p, seed=s, **options) for p, s in zip(prompts, seeds)]
    assert gen.generate_batch(prompts, seed=seeds, **options) == expected
    assert len(gen.generate_ids(long_prompt, seed=8, **options)) == gen.max_length - len(gen.encode(long_prompt)) + 1
    assert gen.generate_batch([], temperature=0) == []
    with pytest.raises(EdgeGPTError, match="seed has 2 values for 3 prompts"):
        gen.generate_batch(prompts, seed=[1, 2])
    with pytest.raises(EdgeGPTError, match="list of strings"):
        gen.generate_batch("The ")


# -- threads and cancelling --------------------------------------------------------------------------


@pytest.mark.slow  # over half a second on two cores
def test_eight_threads_share_one_generator(gen):
    """8 threads × 20 seeded generations each, every thread in its own order, equal the sequential ones."""
    jobs = [(prompt, seed) for prompt in PROMPTS for seed in range(5)]  # 20
    options = dict(temperature=1.0, top_k=40, repetition_penalty=1.1, max_new_tokens=24)
    expected = {job: gen.generate(job[0], seed=job[1], **options) for job in jobs}
    assert len(set(expected.values())) > 10, "the jobs must differ for a mix-up between threads to show"
    results: dict[int, dict] = {}

    def work(worker: int) -> None:
        order = jobs[worker:] + jobs[:worker]  # threads run different jobs at the same moment
        results[worker] = {job: gen.generate(job[0], seed=job[1], **options) for job in order}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: expected for i in range(8)}


def test_a_stream_cancelled_from_another_thread_leaves_the_generator_as_fresh(gen, runtime_package, runtime_provider):
    """Cancel a stream mid-way from another thread while other threads generate: it ends as cancelled,
    the others are untouched, and the next generation (no lock left held) equals a fresh Generator's."""
    options = dict(temperature=1.0, seed=3, max_new_tokens=60, stop_at_eos=False)
    expected = gen.generate("The ", **options)
    cancel, three_pieces = threading.Event(), threading.Event()
    cancelled: dict = {}
    others: list[str] = []

    def consume() -> None:
        stream = gen.stream("The ", cancel=cancel, **options)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 3:
                three_pieces.set()
                cancel.wait()  # the cancel lands while this stream is half done
        cancelled.update(text="".join(pieces), reason=stream.finish_reason)

    threads = [threading.Thread(target=consume)] + [
        threading.Thread(target=lambda: others.append(gen.generate("The ", **options))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    assert three_pieces.wait(timeout=60)
    cancel.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert cancelled["reason"] == "cancelled"
    assert expected.startswith(cancelled["text"]) and len(cancelled["text"]) < len(expected)
    assert others == [expected] * 3
    # Usable again at once, from any thread, and the same as a Generator that never saw a cancel.
    after: list[str] = []
    worker = threading.Thread(target=lambda: after.append(gen.generate("The ", **options)))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the generator hangs after a cancel"
    fresh = Generator.load(runtime_package, provider=runtime_provider)
    assert after == [fresh.generate("The ", **options)] == [expected]


def test_cancelling_from_another_thread_stops_within_one_step(gen, monkeypatch):
    cancel, steps, steps_when_cancelled, caches = threading.Event(), [], [], []
    decode_step, empty_cache = gen.decode_step, gen.empty_cache
    six_tokens = gen.package.tokenizer.decode(greedy(gen, n=6))

    def counting_step(token, cache):
        steps.append(token)
        if len(steps) == 5:  # another thread cancels while this step runs
            canceller = threading.Thread(target=lambda: (steps_when_cancelled.append(len(steps)), cancel.set()))
            canceller.start()
            canceller.join()
        return decode_step(token, cache)

    def recorded_cache():
        cache = empty_cache()
        caches.append(weakref.ref(cache.step if cache.step is not None else cache))
        return cache

    monkeypatch.setattr(gen, "decode_step", counting_step)
    monkeypatch.setattr(gen, "empty_cache", recorded_cache)
    pieces = list(gen.stream("The ", cancel=cancel, max_new_tokens=100, temperature=0, stop_at_eos=False))
    assert steps_when_cancelled == [5] and len(steps) == 5  # the step in flight finished, no other began
    assert 1 <= len(pieces) and "".join(pieces) == six_tokens
    gc.collect()
    assert [ref() for ref in caches] == [None], "the cancelled stream still holds its cache"
    assert gen.generate("The ", cancel=cancel, max_new_tokens=10) == ""  # already cancelled: nothing runs


def test_closing_a_stream_releases_its_cache(gen, monkeypatch):
    caches = []
    empty_cache = gen.empty_cache
    monkeypatch.setattr(gen, "empty_cache", lambda: caches.append(cache := empty_cache()) or cache)
    stream = gen.stream("The ", max_new_tokens=100, temperature=0)
    next(stream)
    refs = [weakref.ref(c.step if c.step is not None else c) for c in caches]
    caches.clear()
    stream.close()
    gc.collect()
    assert [ref() for ref in refs] == [None]


# -- one sampler for PyTorch and the runtime ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=20),
     SamplingParams(temperature=1.2, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05),
     SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
     SamplingParams(temperature=0.0, repetition_penalty=2.0)],
)
def test_seeded_reference_and_runtime_sample_the_same_tokens(gen, model, params, seed):
    if RUNTIME_PROVIDER == "cuda" and params.temperature > 0:
        # float16 logits differ from the float32 reference by ~1e-3, enough to flip a token drawn at
        # temperature ~1 (seen on an H200: seed 2 diverged at the second token); the shared-sampler
        # identity is what this test is for, and it holds exactly in float32 on the CPU.
        pytest.skip("seeded sampling identity is checked in float32 on the CPU")
    from edgegpt.reference import TorchReference

    prompt = "The import statement"
    vocab = gen.package.tokenizer.get_vocab_size()
    expected = TorchReference(model).generate(gen.encode(prompt), 48, params, seed,
                                              gen.package.generation.eos_token_id, vocab_size=vocab)
    got = gen.generate_ids(prompt, max_new_tokens=48, seed=seed, **params.__dict__)
    assert len(expected) > 8 and same_tokens(got, expected)


# -- bad options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [(dict(top_q=0.5), r"unknown generation option 'top_q'"), (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"),
     (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"), (dict(stop=3), "stop"),
     (dict(stop_at_eos="no"), "stop_at_eos"), (dict(seed=True), "seed")],
)
def test_bad_options_raise_one_line_errors(gen, options, message):
    for call in (gen.stream, gen.generate, lambda p, **o: gen.generate_batch([p], **o)):
        with pytest.raises(EdgeGPTError, match=message) as raised:
            call("The ", **options)
        assert "\n" not in str(raised.value)


def test_token_methods_refuse_stop_strings(gen):
    with pytest.raises(EdgeGPTError, match="stop strings apply to text"):
        gen.generate_ids("The ", stop="x")


@pytest.mark.skipif(RUNTIME_PROVIDER != "cpu", reason="generation_config defaults: checked once, on the CPU")
def test_generation_config_may_set_min_p_and_repetition_penalty(gen, tmp_path):
    package = edited_copy(gen, tmp_path, temperature=0, repetition_penalty=1e6)
    assert Generator.load(package).generate_ids("The ", max_new_tokens=20) == gen.generate_ids(
        "The ", max_new_tokens=20, temperature=0, repetition_penalty=1e6)
    config = json.loads((package / "generation_config.json").read_text())
    (package / "generation_config.json").write_text(json.dumps({**config, "min_p": 2}))
    with pytest.raises(EdgeGPTError, match=r"generation_config\.json: min_p must be in"):
        Generator.load(package)
