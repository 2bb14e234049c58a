"""The OpenAI API as edgegpt serves it: requests checked into runtime options, responses shaped as the
official `openai` client reads them. No HTTP here (edgegpt/server/app.py), no threads (generation.py).

    POST /v1/chat/completions  {"messages": [...], ...}  ─► Request(kind="chat", messages=...)
    POST /v1/completions       {"prompt": "...", ...}    ─► Request(kind="completion", prompt=...)
                                 │ every field checked here, with the API's own names in the errors
                                 ▼
                 Request.options: the Generator's GenerateOptions (runtime/options.py)

Fields (OpenAI's names):
    max_tokens (chat also max_completion_tokens)  -> max_new_tokens; absent: the package's default
    temperature [0, 2], top_p (0, 1], seed >= 0, stop (a string or up to 16), presence_penalty and
    frequency_penalty [-2, 2], n (1 only: one generation per request), stream, stream_options.include_usage
edgegpt's own, as extra fields (the `openai` client sends them with extra_body=...):
    top_k, min_p, repetition_penalty, ignore_eos (true: the end-of-text token does not end the reply,
    as llama.cpp's server's ignore_eos; benchmarks use it to generate exactly max_tokens tokens),
    truncate ("left": keep the end of a prompt too long for the context; in chat, drop the oldest turns),
    lookup and speculate (booleans: guess ahead from the text so far; false: no guessing ahead at all).
    Honoured on every server: where the --parallel slots share a continuous batch, a request that guesses
    ahead is decoded on its own beside the batch (runtime/continuous.py), so it gets what
    Generator.stream gives with the same options
Accepted and ignored, because they change nothing here: user, metadata, store, service_tier, and the
off values of logprobs, top_logprobs, logit_bias, tools, tool_choice, response_format {"type": "text"},
echo, best_of, suffix. Anything else is a 400 naming the field: a request that asks for something edgegpt
does not do gets told so, rather than a reply that silently ignored it.

Messages: {"role", "content"} with content a string or a list of {"type": "text", "text"} parts; the
"developer" role is the system role (OpenAI's newer name). Rendered with the package's chat template, or,
when it has none, as the plain transcript (runtime/transcript.py) with its stop strings.

finish_reason: the runtime's "eos" and "stop" are "stop"; "length" and "max_length" (the context is full)
are "length".
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CHAT, COMPLETION = "chat", "completion"
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "max_length": "length"}
MAX_STOPS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty", "n", "stream", "stream_options", "top_k", "min_p", "repetition_penalty",
                 "ignore_eos", "truncate", "lookup", "speculate", "user", "metadata", "store", "service_tier",
                 "logprobs", "logit_bias"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
# Fields accepted only at the value that asks for nothing edgegpt lacks (None is always fine).
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "echo": (False,),
    "best_of": (1,), "suffix": ("",),
}


class APIError(Exception):
    """An error as the OpenAI API returns it: an HTTP status and {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class Request:
    """One checked request: what to generate from and how (options: the Generator's keyword arguments)."""

    kind: str  # CHAT or COMPLETION
    model: str | None
    options: dict[str, Any]
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(kind: str, body: Any) -> Request:
    """The request body (parsed JSON) checked; APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    allowed = CHAT_FIELDS if kind == CHAT else COMPLETION_FIELDS
    for name, value in body.items():
        if name not in allowed:
            raise bad(f"unknown field {name!r:.60}; edgegpt does not support it", name)
        if name in OFF_VALUES and value is not None and not any(_same(value, off) for off in OFF_VALUES[name]):
            raise bad(f"{name}={_short(value)} is not supported by edgegpt", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    options = _options(body, kind)
    stream = _boolean(body, "stream", False)
    include_usage = False
    if body.get("stream_options") is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        stream_options = body["stream_options"]
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise bad('stream_options must be {"include_usage": true|false}', "stream_options")
        include_usage = _boolean(stream_options, "include_usage", False, "stream_options.include_usage")
    request = Request(kind, model, options, stream=stream, include_usage=include_usage)
    if kind == CHAT:
        request.messages = _messages(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return request


def _options(body: dict, kind: str) -> dict[str, Any]:
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad(f"n={n} is not supported: edgegpt generates one choice per request (send n requests)", "n")
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, open_low=True),
        "seed": _integer(body, "seed", 0),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
        "top_k": _integer(body, "top_k", 0),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, math.inf, open_low=True),
        "stop": _stops(body.get("stop")),
    }
    if _boolean(body, "ignore_eos", False):
        options["stop_at_eos"] = False
    for switch in ("lookup", "speculate"):
        if body.get(switch) is not None:
            options[switch] = _boolean(body, switch, False)
    if body.get("truncate") is not None:
        if body["truncate"] != "left":
            raise bad(f"truncate must be \"left\" or null, got {_short(body['truncate'])}", "truncate")
        options["truncate"] = "left"
    return {name: value for name, value in options.items() if value is not None}


def _integer(body: dict, name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # JSON 64.0: a client's number type, not a mistake
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(f"{name} must be an integer >= {minimum}, got {_short(value)}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    inside = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if open_low else low <= value) and value <= high)
    if not inside:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]" if math.isfinite(high) else f"> {low:g}"
        raise bad(f"{name} must be a number in {bounds}, got {_short(value)}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{param or name} must be true or false, got {_short(value)}", param or name)
    return value


def _stops(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"stop must be a string or a list of at most {MAX_STOPS} strings, got {_short(value)}", "stop")
    return [s for s in stops if s] or None  # an empty stop string stops nothing


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # the API's batch form with one prompt
    if isinstance(value, list):
        raise bad("prompt must be one string: edgegpt takes one prompt per request (and no token ids)", "prompt")
    if not isinstance(value, str):
        raise bad(f"prompt must be a string, got {_short(value)}", "prompt")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{param} must be an object with role and content", param)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{param}.role must be one of {', '.join(ROLES)}, got {_short(role)}", f"{param}.role")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(f"{param} has the field {sorted(extra)[0]!r:.40}, which edgegpt does not support", param)
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return messages


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{param} parts must be {{\"type\": \"text\", \"text\": str}} (edgegpt reads text only)",
                          param)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{param} must be a string or a list of text parts, got {_short(value)}", param)


def _same(value: Any, off: Any) -> bool:
    return type(value) is type(off) and value == off


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- responses ------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: Request, model: str, text: str, finish: str, counts: dict) -> dict:
    """The whole reply of a request that did not stream."""
    if request.kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": f"chatcmpl-{request.id}", "object": "chat.completion", "created": request.created,
                "model": model, "choices": [choice], "usage": counts}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": f"cmpl-{request.id}", "object": "text_completion", "created": request.created, "model": model,
            "choices": [choice], "usage": counts}


def chunk(request: Request, model: str, *, text: str | None = None, role: bool = False,
          finish: str | None = None, counts: dict | None = None) -> dict:
    """One server-sent event of a streamed reply. Chat: the first chunk carries the role, then content
    deltas, then an empty delta with finish_reason; with include_usage, every chunk has "usage": null but
    a last one with no choices and the counts (as OpenAI streams it)."""
    if request.kind == CHAT:
        head = {"id": f"chatcmpl-{request.id}", "object": "chat.completion.chunk"}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        head = {"id": f"cmpl-{request.id}", "object": "text_completion"}
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {**head, "created": request.created, "model": model, "choices": [] if counts else choices}
    if request.include_usage:
        body["usage"] = counts
    return body
