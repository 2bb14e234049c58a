"""`edgegpt serve` as the tests run it: a real server process on a free loopback port, and a small raw HTTP
client (http.client: it can send what no well-behaved client would, and hang up mid-stream)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTUP_SECONDS = 60


class Server:
    """`python -m edgegpt serve PACKAGE --port 0 ARGS...`, ready when it prints its address."""

    def __init__(self, package: Path, *args: str, env: dict | None = None) -> None:
        command = [sys.executable, "-m", "edgegpt", "serve", str(package), "--port", "0", "--provider", "cpu", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        self.log: list[str] = []
        ready = threading.Event()
        self.port: int | None = None

        def drain() -> None:  # the server's stderr, kept for the tests' assertions (never left to fill up)
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
                if found:
                    self.port = int(found.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(STARTUP_SECONDS) or self.port is None:
            self.stop()
            raise AssertionError(f"the server did not start: {''.join(self.log)[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        """(status, parsed JSON) of one request; `body` bytes are sent as they are, anything else as JSON."""
        connection = self.connection()
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            raise AssertionError(f"{method} {path} answered {response.status} with non-JSON {raw[:200]!r}") from None

    def health(self) -> dict:
        status, body = self.request("GET", "/health")
        assert status == 200, body
        return body

    def wait_until(self, condition, seconds: float = 10) -> dict:
        """Poll /health until condition(health) holds (bounded); the last health either way."""
        deadline = time.monotonic() + seconds
        while True:
            health = self.health()
            if condition(health) or time.monotonic() > deadline:
                return health
            time.sleep(0.02)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then the exit code (killed if it does not exit in `timeout` seconds: a failure)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the server did not exit within its shutdown timeout after SIGTERM") from None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_events(response) -> list[dict | str]:
    """The server-sent events of a streamed reply: parsed JSON, and "[DONE]" as a string."""
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
