"""`edgegpt serve`: one model package behind an OpenAI-compatible HTTP API on loopback, for apps in any
language (Electron, .NET, Swift, Qt, Tauri) to talk to the way they talk to llama.cpp's server or ollama.

    edgegpt serve edgegpt-out/model --port 8080 --parallel 2
    curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Starlette for routing and uvicorn for HTTP (the `[serve]` extra); protocol.py checks requests and shapes
replies, generation.py runs them in slots, app.py wires the routes and errors, this module starts it all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from edgegpt.core.errors import EdgeGPTError

LOOPBACK = "127.0.0.1"
# Seconds a cancelled generation has to send its last events on shutdown (it stops within one decode step).
FINAL_EVENT_SECONDS = 2.0


def serve(
    model: Path,
    *,
    host: str = LOOPBACK,
    port: int = 8080,
    parallel: int = 4,
    max_queue: int = 8,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body_bytes: int = 1 << 20,
    shutdown_timeout: float = 10.0,
    provider: str = "auto",
    threads: int | None = None,
    max_length: int | None = None,
    draft: str | Path | None = "auto",
    lookup: bool = False,
) -> None:
    """Load the package and serve it until SIGINT or SIGTERM; then let running requests finish for up to
    shutdown_timeout seconds, cancel what is left and return."""
    import uvicorn  # the [serve] extra; the CLI checks for it first (cli/errors.py)

    from edgegpt.runtime import Generator
    from edgegpt.server.app import Settings, create_app

    for name, value, low in (("--parallel", parallel, 1), ("--max-queue", max_queue, 0),
                             ("--max-body-bytes", max_body_bytes, 1024), ("--port", port, 0)):
        if value < low:
            raise EdgeGPTError(f"{name} must be at least {low}, got {value}")
    if api_key is not None and not api_key.strip():
        raise EdgeGPTError("--api-key is empty; give a key, or leave it out to serve without one")
    listener = bind(host, port)
    generator = Generator.load(model, provider=provider, threads=threads, max_length=max_length, draft=draft)
    name = model_name or Path(model).resolve().name
    settings = Settings(name, parallel, max_queue, api_key, max_body_bytes, lookup)
    app = create_app(generator, settings)
    # uvicorn cancels the requests still open when its graceful timeout ends, mid-reply; cancelling their
    # generations a moment before lets each end properly: a streamed reply with an error event and [DONE].
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="none",
                            timeout_graceful_shutdown=shutdown_timeout + FINAL_EVENT_SECONDS)
    bound_host, bound_port = listener.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    if not is_loopback(host) and api_key is None:
        print(f"edgegpt: warning: {url} is reachable from other machines and has no --api-key", file=sys.stderr)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(f"edgegpt: serving {name!r} at {url}/v1 ({parallel} slot{'s' * (parallel > 1)}, "
                      f"{max_queue} may wait); Ctrl-C stops", file=sys.stderr, flush=True)

        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(shutdown_timeout, app.state.slots.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # uvicorn stops on SIGINT/SIGTERM and then raises the signal again to the handler it found; a no-op
    # one makes that a clean exit (code 0) rather than death by the signal once the shutdown is done.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    Server(config).run(sockets=[listener])
    print("edgegpt: server stopped", file=sys.stderr)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free one), so the address printed is the one really used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise EdgeGPTError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                           "choose another --port or --host") from None
    listener.setblocking(False)
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
