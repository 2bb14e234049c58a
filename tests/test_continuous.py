"""Continuous batching (runtime/continuous.py): sequences that join and leave a running batch each get
exactly the text they get alone, and a cancelled or abandoned one frees its row within a step."""

from __future__ import annotations

import threading

import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator
from edgegpt.runtime.continuous import ContinuousBatcher

PROMPTS = ["The import statement", "def ", "A class", "Exceptions are raised", "The ", "for loops"]
# The third sequence also gets a stop string, picked from its own text in the test (stop_inside).
OPTIONS = [dict(temperature=0, max_new_tokens=60, stop_at_eos=False),
           dict(temperature=1.0, seed=3, max_new_tokens=40, top_k=30),
           dict(temperature=0.8, seed=5, max_new_tokens=50, repetition_penalty=1.3),
           dict(temperature=0, max_new_tokens=7),
           dict(temperature=1.0, seed=11, max_new_tokens=70, min_p=0.05, stop_at_eos=False),
           dict(temperature=0, max_new_tokens=90, frequency_penalty=0.5, stop_at_eos=False)]


@pytest.fixture(scope="module")
def gen(tiny_package) -> Generator:
    return Generator.load(tiny_package, provider="cpu")


def run_together(batcher: ContinuousBatcher, jobs) -> list[tuple[str, str]]:
    """Start each job after the one before has produced its first piece, so they join a running batch;
    returns (text, finish_reason) per job."""
    streams = []
    results: list = [None] * len(jobs)
    threads = []
    for i, (prompt, options) in enumerate(jobs):
        stream = batcher.stream(prompt, **options)
        first = next(stream, "")
        streams.append(stream)

        def finish(i=i, stream=stream, first=first):
            results[i] = (first + "".join(stream), stream.finish_reason)

        threads.append(threading.Thread(target=finish))
        threads[-1].start()
    for thread in threads:
        thread.join(60)
    return results


def stop_inside(gen: Generator, prompt: str, options: dict) -> str:
    """Three characters from the first third of what this job generates on this CPU: the stop string that
    ends it there (the text of a briefly trained model is not known before it is generated)."""
    text = gen.generate(prompt, **options)
    assert len(text) >= 9, f"too little text to put a stop string in: {text!r}"
    return text[len(text) // 3 : len(text) // 3 + 3]


@pytest.mark.parametrize("rows", [2, 4])
def test_sequences_joining_a_running_batch_get_their_text_alone(gen, rows, monkeypatch):
    # A first capacity of 8 positions makes the shared buffers grow while sequences run.
    monkeypatch.setattr("edgegpt.runtime.kv_cache.FIRST_POSITIONS", 8)
    jobs = list(zip(PROMPTS, OPTIONS))
    jobs[2] = (jobs[2][0], {**jobs[2][1], "stop": ["never in this text", stop_inside(gen, *jobs[2])]})
    alone = []
    for prompt, options in jobs:
        stream = gen.stream(prompt, **options)
        alone.append(("".join(stream), stream.finish_reason))
    # A stop string ends one inside the batch (well before its max_new_tokens); others run to their length.
    assert alone[2][1] == "stop" and alone[0][1] == alone[5][1] == "length"
    batcher = ContinuousBatcher(gen, rows)
    try:
        assert run_together(batcher, jobs) == alone
        assert batcher.peak == rows  # they did run together (more jobs than rows: some waited)
    finally:
        batcher.close()


def test_token_counts_match_the_generator(gen):
    batcher = ContinuousBatcher(gen, 2)
    try:
        stream = batcher.stream("The import statement", temperature=0, max_new_tokens=12, stop_at_eos=False)
        "".join(stream)
        alone = gen.stream("The import statement", temperature=0, max_new_tokens=12, stop_at_eos=False)
        "".join(alone)
        assert (stream.prompt_tokens, stream.completion_tokens) == (alone.prompt_tokens, 12)
    finally:
        batcher.close()


def test_a_cancelled_or_closed_sequence_leaves_and_the_others_go_on(gen):
    batcher = ContinuousBatcher(gen, 2)
    try:
        cancel = threading.Event()
        long = dict(temperature=0, max_new_tokens=100, stop_at_eos=False)
        cancelled = batcher.stream("The ", cancel=cancel, **long)
        closed = batcher.stream("def ", **long)
        assert next(cancelled) is not None and next(closed) is not None
        cancel.set()
        list(cancelled)
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 100
        closed.close()
        assert closed.finish_reason == "cancelled"
        # Both rows are free again: two new sequences run to the end, equal to their text alone.
        again = [batcher.stream(p, **long) for p in ("A class", "for loops")]
        assert ["".join(s) for s in again] == [gen.generate(p, **long) for p in ("A class", "for loops")]
    finally:
        batcher.close()


def test_only_fused_packages_on_the_cpu_batch(plain_package, gen):
    with pytest.raises(EdgeGPTError, match="continuous batching needs a fused package on the CPU"):
        ContinuousBatcher(Generator.load(plain_package, provider="cpu"), 2)
    with pytest.raises(EdgeGPTError, match="rows must be a positive integer"):
        ContinuousBatcher(gen, 0)


def test_bad_options_are_refused_before_anything_runs(gen):
    batcher = ContinuousBatcher(gen, 2)
    try:
        with pytest.raises(EdgeGPTError, match="temperature"):
            batcher.stream("x", temperature=-1)
        with pytest.raises(EdgeGPTError, match="context"):
            batcher.stream("word " * 1000)
    finally:
        batcher.close()
