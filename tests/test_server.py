"""`edgegpt serve` through real clients: the official `openai` package for what an app does, raw HTTP for
everything else (each error status, a client that hangs up). Servers run as processes on loopback."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import PLAIN_CHAT, package_with
from edgegpt.runtime import Generator
from edgegpt.runtime.transcript import TRANSCRIPT_STOPS, plain_transcript
from serving import Server, read_events

QUESTION = [{"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "What does the import statement do?"}]
SAMPLED = dict(temperature=0.9, seed=7, max_tokens=16)


def runtime_options(api: dict) -> dict:
    """The Generator's keyword arguments for the API's fields in SAMPLED."""
    return dict(temperature=api["temperature"], seed=api["seed"], max_new_tokens=api["max_tokens"])


@pytest.fixture(scope="module")
def chat_package(tiny_package, tmp_path_factory):
    return package_with(tiny_package, tmp_path_factory.mktemp("served") / "model", PLAIN_CHAT)


@pytest.fixture(scope="module")
def server(chat_package):
    with Server(chat_package, "--parallel", "4") as running:
        yield running
    assert "Traceback" not in "".join(running.log), "".join(running.log)


@pytest.fixture(scope="module")
def gen(chat_package) -> Generator:
    return Generator.load(chat_package, provider="cpu")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


# -- what an app does, with the official client ------------------------------------------------------

def test_chat_equals_the_generator_with_the_same_seed(client, gen):
    reply = client.chat.completions.create(model="model", messages=QUESTION, **SAMPLED, extra_body={"top_k": 40})
    expected = gen.stream_chat(QUESTION, top_k=40, **runtime_options(SAMPLED))
    assert reply.choices[0].message.content == "".join(expected)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          expected.completion_tokens)
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens > expected.prompt_tokens


def test_streamed_chat_is_role_then_deltas_then_finish_then_usage(client, gen):
    chunks = list(client.chat.completions.create(model="model", messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    deltas = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert all(deltas) and all(c.choices[0].finish_reason is None for c in chunks[:-2])
    expected = gen.stream_chat(QUESTION, **runtime_options(SAMPLED))
    assert "".join(deltas) == "".join(expected)
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_whole_and_streamed_equal_generate(client, gen):
    prompt = "The import statement"
    expected = gen.generate(prompt, **runtime_options(SAMPLED), stop=[" is"])
    whole = client.completions.create(model="model", prompt=prompt, stop=[" is"], **SAMPLED)
    streamed = list(client.completions.create(model="model", prompt=prompt, stop=[" is"], stream=True, **SAMPLED))
    assert whole.choices[0].text == "".join(c.choices[0].text for c in streamed) == expected
    finish = "stop" if " is" in gen.generate(prompt, **runtime_options(SAMPLED)) else "length"
    assert whole.choices[0].finish_reason == streamed[-1].choices[0].finish_reason == finish


def test_edgegpt_options_pass_as_extra_fields(client, gen):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    penalties = dict(presence_penalty=0.5, frequency_penalty=1.0)
    # A seed where the options change this CPU's text, so equal replies show they reached the sampler.
    for seed in range(7, 47):
        sampled = {**SAMPLED, "seed": seed}
        expected = gen.chat(QUESTION, **penalties, **extra, **runtime_options(sampled))
        if expected != gen.chat(QUESTION, **runtime_options(sampled)):
            break
    else:
        pytest.fail("no seed in 40 where the options change the text: the comparison would be weak")
    reply = client.chat.completions.create(model="model", messages=QUESTION, **penalties, **sampled, extra_body=extra)
    assert reply.choices[0].message.content == expected


def test_ignore_eos_generates_exactly_max_tokens(client):
    reply = client.completions.create(model="model", prompt="x", max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


def test_models_lists_the_one_model(client, server):
    assert [m.id for m in client.models.list().data] == ["model"]
    assert client.models.retrieve("model").id == "model"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "model" and health["slots"] == 4


def test_four_concurrent_streams_return_what_four_sequential_calls_return(client):
    def ask(seed: int) -> str:
        stream = client.chat.completions.create(model="model", messages=QUESTION, temperature=1.0, seed=seed,
                                                max_tokens=24, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    sequential = [ask(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(ask, range(4)))
    assert concurrent == sequential and len(set(sequential)) > 1


# -- errors: OpenAI-style JSON with the right status, and the server keeps serving -------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    ("not JSON", CHAT, b"{not json", 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("messages a string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("no messages", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("negative max_tokens", CHAT, {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens a string", CHAT, {**GOOD, "max_tokens": "8"}, 400, "max_tokens"),
    ("max_tokens true", CHAT, {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("temperature 3", CHAT, {**GOOD, "temperature": 3}, 400, "temperature"),
    ("top_p 0", CHAT, {**GOOD, "top_p": 0}, 400, "top_p"),
    ("negative seed", CHAT, {**GOOD, "seed": -1}, 400, "seed"),
    ("stop a number", CHAT, {**GOOD, "stop": 3}, 400, "stop"),
    ("n 2", CHAT, {**GOOD, "n": 2}, 400, "n"),
    ("unknown field", CHAT, {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("logprobs", CHAT, {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("tools", CHAT, {**GOOD, "tools": [{"type": "function"}]}, 400, "tools"),
    ("stream_options without stream", CHAT, {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("presence_penalty 5", CHAT, {**GOOD, "presence_penalty": 5}, 400, "presence_penalty"),
    ("truncate right", CHAT, {**GOOD, "truncate": "right"}, 400, "truncate"),
    ("prompt a number", COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    ("token-id prompt", COMPLETIONS, {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("echo", COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("a file path as model", CHAT, {**GOOD, "model": "../../etc/passwd"}, 404, "model"),
    ("10 MB body", CHAT, {**GOOD, "padding": "x" * 10_000_000}, 413, None),
    ("prompt beyond the context", COMPLETIONS, {"prompt": "word " * 2000}, 413, "prompt"),
    ("conversation beyond the context", CHAT, {"messages": [{"role": "user", "content": "word " * 2000}]}, 413,
     "messages"),
]


@pytest.mark.parametrize("path,body,status,param", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_error_and_the_server_keeps_serving(server, path, body, status, param):
    got, answer = server.request("POST", path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert "Traceback" not in error["message"] and error["param"] == param
    assert server.request("POST", CHAT, GOOD)[0] == 200


def test_routes_and_methods_that_do_not_exist_are_json_404_and_405(server):
    status, answer = server.request("GET", "/v2/everything")
    assert status == 404 and "/v1" in answer["error"]["message"]
    status, answer = server.request("GET", CHAT)
    assert status == 405 and answer["error"]["message"]
    assert server.request("GET", "/v1/models/other")[0] == 404


def test_a_long_prompt_with_truncate_left_is_served(server):
    status, answer = server.request("POST", COMPLETIONS, {"prompt": "word " * 2000, "max_tokens": 4,
                                                          "truncate": "left"})
    assert status == 200 and answer["usage"]["prompt_tokens"] + 4 <= 128


@pytest.mark.slow  # over half a second on two cores
def test_a_plain_transcript_when_the_package_has_no_template(tiny_package):
    gen = Generator.load(tiny_package, provider="cpu")
    expected = gen.generate(plain_transcript(QUESTION), stop=list(TRANSCRIPT_STOPS), temperature=0, max_new_tokens=24)
    with Server(tiny_package) as server:
        status, answer = server.request("POST", CHAT, {"messages": QUESTION, "temperature": 0, "max_tokens": 24})
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected


# -- the API key ------------------------------------------------------------------------------------

@pytest.mark.slow  # over half a second on two cores
def test_an_api_key_is_required_when_set(chat_package):
    with Server(chat_package, env={"EDGEGPT_API_KEY": "sesame"}) as server:
        status, answer = server.request("POST", CHAT, GOOD)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert server.request("POST", CHAT, GOOD, {"authorization": "Bearer wrong"})[0] == 401
        assert server.request("GET", "/v1/models")[0] == 401
        assert server.request("GET", "/health")[0] == 200  # liveness needs no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.url, api_key="sesame", max_retries=0)
        assert client.chat.completions.create(model="model", messages=GOOD["messages"], max_tokens=2).choices


# -- slots, the waiting line, cancellation, shutdown ------------------------------------------------

@pytest.fixture(scope="module")
def long_package(tmp_path_factory, tiny_checkpoint):
    """Random weights with a 4,096-token context: a generation long enough (seconds) to hang up on."""
    import torch

    from edgegpt.checkpoint import load_checkpoint, save_checkpoint
    from edgegpt.core.config import preset
    from edgegpt.export import export_package
    from edgegpt.model import GPT

    _, tokenizer = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("long") / "checkpoint"
    save_checkpoint(checkpoint, GPT(preset("micro", vocab_size=tokenizer.get_vocab_size(), max_len=4096)).eval(),
                    tokenizer)
    package = checkpoint.parent / "model"
    export_package(checkpoint, package, gate=False)
    return package


LONG = {"prompt": "x", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}


def start_stream(server: Server, body: dict):
    connection = server.connection()
    connection.request("POST", COMPLETIONS, body=json.dumps(body), headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generation has begun
    return connection, response


@pytest.mark.slow  # over half a second on two cores
def test_a_client_that_hangs_up_is_cancelled_and_frees_its_slot(long_package):
    with Server(long_package, "--parallel", "1", "--max-queue", "0") as server:
        connection, _ = start_stream(server, LONG)
        assert server.health()["busy"] == 1
        status, answer = server.request("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 2})
        assert status == 503 and answer["error"]["code"] == "server_busy"  # one slot, no line
        connection.sock.shutdown(2)
        connection.close()
        health = server.wait_until(lambda h: h["busy"] == 0, seconds=5)
        assert health["busy"] == 0 and health["cancelled"] == 1, health  # stopped early, not run to the end
        assert server.request("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 2})[0] == 200
        # A whole (not streamed) reply is cancelled the same way when its client leaves before it is ready.
        connection = server.connection()
        connection.request("POST", COMPLETIONS, body=json.dumps({**LONG, "stream": False}),
                           headers={"content-type": "application/json"})
        assert server.wait_until(lambda h: h["busy"] == 1)["busy"] == 1
        connection.sock.shutdown(2)
        connection.close()
        health = server.wait_until(lambda h: h["busy"] == 0, seconds=5)
        assert health["busy"] == 0 and health["cancelled"] == 2, health


@pytest.mark.slow  # over half a second on two cores
def test_a_request_waits_in_line_for_a_slot(long_package):
    with Server(long_package, "--parallel", "1", "--max-queue", "1") as server:
        connection, _ = start_stream(server, LONG)
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(server.request("POST", COMPLETIONS,
                                                                                {"prompt": "x", "max_tokens": 2})))
        waiting.start()
        assert server.wait_until(lambda h: h["waiting"] == 1)["waiting"] == 1
        assert server.request("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 2})[0] == 503  # the line is full
        connection.close()
        waiting.join(30)
        assert answers and answers[0][0] == 200


@pytest.mark.slow  # over half a second on two cores
def test_sigterm_cancels_what_runs_past_the_timeout_and_exits_cleanly(long_package):
    server = Server(long_package, "--shutdown-timeout", "0.5")
    connection, response = start_stream(server, {**LONG, "max_tokens": 4000})
    assert server.stop() == 0
    events = read_events(response)
    connection.close()
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "cancelled"
    assert "Traceback" not in "".join(server.log)


@pytest.mark.slow  # over half a second on two cores
def test_bad_server_options_are_one_line(chat_package):
    import subprocess
    import sys

    for args, message in ((["--parallel", "0"], "--parallel must be at least 1"),
                          (["--host", "256.0.0.1"], "cannot listen on 256.0.0.1")):
        result = subprocess.run([sys.executable, "-m", "edgegpt", "serve", str(chat_package), "--port", "0", *args],
                                capture_output=True, text=True, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
