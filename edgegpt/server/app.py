"""The HTTP side of `edgegpt serve`: a Starlette app with the OpenAI routes.

    GET  /health                 {"status": "ok", "model", "slots": {...}}   (no API key needed)
    GET  /v1/models              the one model this server holds
    POST /v1/chat/completions    chat, streamed as server-sent events or whole
    POST /v1/completions         text completion, likewise

Every error is the API's JSON ({"error": {"message", "type", "param", "code"}}) with its status: 400 a bad
request or option, 401 a missing or wrong API key, 404 an unknown model or route, 405 a wrong method, 413
a body larger than max_body_bytes or a prompt longer than the context, 503 the slots and the line are
full (or the server is stopping), 500 a bug (logged on the server; the client never sees a traceback).
Nothing in a request names a file: the model is the one the server was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgegpt.core.errors import EdgeGPTError, PromptTooLong
from edgegpt.runtime.continuous import ContinuousBatcher, supports
from edgegpt.runtime.transcript import TRANSCRIPT_STOPS, plain_transcript
from edgegpt.server.generation import Generation, Slots
from edgegpt.server.protocol import (
    CHAT,
    COMPLETION,
    FINISH,
    APIError,
    Request,
    chunk,
    completion_body,
    parse_request,
    usage,
)

log = logging.getLogger("edgegpt.server")


@dataclass(frozen=True)
class Settings:
    model_name: str
    parallel: int = 4
    max_queue: int = 8
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB: a long document fits, a runaway upload does not
    lookup: bool = False  # prompt lookup for requests that do not say (their "lookup" field)


def create_app(generator, settings: Settings) -> Starlette:
    """The app for one loaded Generator. Slots are made at startup, on the server's event loop."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["slots"] = app.state.slots = Slots(settings.parallel, settings.max_queue)
        # Parallel requests share each decode step when the package allows (runtime/continuous.py; what that
        # buys under load: docs/benchmarks.md, section Serving). Otherwise, and when guessing
        # ahead was asked for (a draft, lookup: runtime/speculative.py, one sequence at a time), each slot
        # decodes on its own, side by side on the one session.
        speculating = generator.draft is not None or settings.lookup
        batcher = ContinuousBatcher(generator, settings.parallel) \
            if settings.parallel > 1 and supports(generator) and not speculating else None
        state["source"] = batcher or generator
        try:
            yield
        finally:  # finish what is running: cancel it, and wait for the workers to stop (one step each)
            slots: Slots = state["slots"]
            slots.cancel_all()
            slots.executor.shutdown(wait=True)
            if batcher is not None:
                batcher.close()

    def authorize(request: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": settings.model_name, **state["slots"].stats()})

    async def models(request: HTTPRequest) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: HTTPRequest) -> Response:
        authorize(request)
        if request.path_params["name"] != settings.model_name:
            raise unknown_model(request.path_params["name"])
        return JSONResponse(model_card())

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "edgegpt"}

    async def chat_completions(request: HTTPRequest) -> Response:
        return await complete(request, CHAT)

    async def completions(request: HTTPRequest) -> Response:
        return await complete(request, COMPLETION)

    async def complete(http: HTTPRequest, kind: str) -> Response:
        authorize(http)
        request = parse_request(kind, await read_json(http, settings.max_body_bytes))
        if request.model is not None and request.model != settings.model_name:
            raise unknown_model(request.model)
        cancel = threading.Event()
        if settings.lookup and "lookup" not in request.options:
            request.options["lookup"] = True
        # Tokenizing a long prompt or rendering a template takes milliseconds: off the event loop.
        stream = await run_in_threadpool(open_stream, state["source"], generator, request, cancel)
        generation = Generation(stream, cancel)
        await generation.start(state["slots"])
        if request.stream:
            return EventStream(events(request, generation), generation)
        watcher = asyncio.ensure_future(generation.watch_disconnect(http.receive))
        try:
            text = await generation.text()
        finally:
            watcher.cancel()
        if generation.finish_reason == "cancelled":  # the client left, or the server is stopping
            raise cancelled()
        counts = usage(stream.prompt_tokens, stream.completion_tokens)
        return JSONResponse(completion_body(request, settings.model_name, text, FINISH[generation.finish_reason],
                                            counts))

    async def events(request: Request, generation: Generation) -> AsyncIterator[bytes]:
        name = settings.model_name
        if request.kind == CHAT:
            yield sse(chunk(request, name, role=True))
        try:
            async for piece in generation.pieces():
                yield sse(chunk(request, name, text=piece))
        except Exception as error:  # the reply has begun (status 200): the error goes in the stream
            yield sse(api_error(error).body())
            yield b"data: [DONE]\n\n"
            return
        reason = generation.finish_reason
        if reason == "cancelled":
            yield sse(cancelled().body())
        else:
            yield sse(chunk(request, name, finish=FINISH[reason]))
            if request.include_usage:
                stream = generation.stream
                yield sse(chunk(request, name, counts=usage(stream.prompt_tokens, stream.completion_tokens)))
        yield b"data: [DONE]\n\n"

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"the model {name!r:.80} does not exist; this server has {settings.model_name!r}",
                        "model", "model_not_found")

    async def on_api_error(request: HTTPRequest, error: APIError) -> Response:
        return JSONResponse(error.body(), status_code=error.status)

    async def on_http_error(request: HTTPRequest, error: HTTPException) -> Response:
        message = {404: f"no route {request.url.path!r:.80}; the API is under /v1",
                   405: f"{request.method} is not allowed on {request.url.path!r:.80}"}.get(error.status_code,
                                                                                           str(error.detail))
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    async def on_bug(request: HTTPRequest, error: Exception) -> Response:
        log.exception("bug while answering %s %s", request.method, request.url.path)
        return JSONResponse(api_error(error).body(), status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {APIError: on_api_error, HTTPException: on_http_error, Exception: on_bug}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def open_stream(source, generator, request: Request, cancel: threading.Event):
    """The runtime Stream for a request, from `source` (the Generator or its ContinuousBatcher): options
    and prompt are checked now; nothing runs until it is iterated."""
    options = dict(request.options)
    try:
        if request.kind == COMPLETION:
            return source.stream(request.prompt, cancel=cancel, **options)
        if generator.package.chat_template is not None:
            return source.stream_chat(request.messages, cancel=cancel, **options)
        options["stop"] = [*options.get("stop", ()), *TRANSCRIPT_STOPS]
        return source.stream(plain_transcript(request.messages), cancel=cancel, **options)
    except PromptTooLong as error:  # the runtime's advice names its Python option; the API's field is the same
        message = str(error).replace("truncate='left' (--truncate left)", '"truncate": "left"')
        raise APIError(413, message, "messages" if request.kind == CHAT else "prompt",
                       "context_length_exceeded") from None
    except EdgeGPTError as error:
        raise APIError(400, str(error)) from None


def api_error(error: BaseException) -> APIError:
    """An APIError for anything raised while generating: a user mistake is a 400, anything else a bug."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EdgeGPTError):
        return APIError(400, str(error))
    log.error("bug while generating: %r", error, exc_info=error)
    return APIError(500, "internal error while generating; the server's log has the details")


async def read_json(request: HTTPRequest, limit: int):
    """The body parsed as JSON, read no further than `limit` bytes (413 beyond: never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large(limit)
    if not body:
        raise APIError(400, "the request has no body; send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise APIError(400, f"the body is not valid JSON ({str(error)[:80]})") from None


def cancelled() -> APIError:
    return APIError(503, "the generation was cancelled (the client left, or the server is stopping)",
                    code="cancelled")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit:,} bytes (the server's --max-body-bytes)",
                    code="request_too_large")


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A server-sent event reply that cancels its generation as soon as the client disconnects, without
    waiting for the next piece to fail to send (a stop string can hold text back for several steps)."""

    def __init__(self, events: AsyncIterator[bytes], generation: Generation) -> None:
        super().__init__(events, headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                         media_type="text/event-stream")
        self.events, self.generation = events, generation

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self.generation.watch_disconnect(receive))
        try:
            async for event in self.events:
                if self.generation.disconnected:
                    break  # nothing more can reach the client
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under the send
            self.generation.cancel.set()
        finally:
            watcher.cancel()
            await self.events.aclose()  # runs the generation's own cleanup now (cancel if unfinished)
