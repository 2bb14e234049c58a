"""examples/desktop_chat.py, the Tkinter chat window, run for real under Xvfb in its scripted mode: the reply
read back from the Text widget is the runtime's own greedy reply, follow-up turns see the conversation, Stop
and closing the window cancel mid-reply, and a bad model path is one line, not a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"
RUN_TIMEOUT_S = 120  # one scripted run of the tiny model takes seconds


def display_missing() -> str | None:
    """Why the window cannot be opened here, or None."""
    if shutil.which("Xvfb") is None:
        return "Xvfb is not on PATH (Debian: apt-get install xvfb)"
    try:
        import tkinter  # noqa: F401
    except ImportError as e:
        return f"this Python has no tkinter ({e})"
    return None


needs_display = pytest.mark.skipif(display_missing() is not None, reason=str(display_missing()))
pytestmark = needs_display


@contextlib.contextmanager
def xvfb(timeout: float = 30.0):
    """A private X server: its display name (":N") while the block runs. Xvfb picks a free display number
    itself and writes it to -displayfd once it accepts connections, so there is neither a guessed number
    nor a sleep; it is always killed on the way out."""
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write)
    try:
        number, deadline = b"", time.monotonic() + timeout
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                raise RuntimeError(f"Xvfb did not start within {timeout} s")
            chunk = os.read(read, 16)
            if not chunk:  # it exited
                raise RuntimeError(f"Xvfb failed: {server.stderr.read().decode(errors='replace')[-500:]}")
            number += chunk
        yield f":{int(number)}"
    finally:
        os.close(read)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def display():
    with xvfb() as name:
        yield name


def run_window(command: list[str], display: str, env: dict[str, str] | None = None,
               timeout: float = RUN_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the example (or the frozen app) in scripted mode on `display`: the process and its JSON report."""
    env = dict(os.environ if env is None else env, DISPLAY=display)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    return result, json.loads(lines[-1]) if lines else None


def expected_replies(package: Path, turns: list[str], max_new_tokens: int) -> list[tuple[list[str], str]]:
    """(pieces, finish_reason) per turn from the runtime itself, greedy, each turn seeing the earlier replies."""
    from edgegpt.runtime import Generator
    from edgegpt.runtime.transcript import TRANSCRIPT_STOPS, plain_transcript

    generator = Generator.load(package)
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        stream = generator.stream(plain_transcript(messages), stop=list(TRANSCRIPT_STOPS), temperature=0,
                                  max_new_tokens=max_new_tokens)
        pieces = list(stream)
        messages.append({"role": "assistant", "content": "".join(pieces)})
        replies.append((pieces, stream.finish_reason))
    return replies


def example(package: Path | str, *flags: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), str(package), "--temperature", "0", *flags]


def test_the_window_shows_the_runtimes_reply_and_keeps_the_conversation(display, tiny_package):
    turns = ["Hello", "What is a list?"]
    expected = expected_replies(tiny_package, turns, 16)
    assert all("".join(pieces).strip() for pieces, _ in expected), expected  # else the check would be empty

    flags = [a for turn in turns for a in ("--send", turn)]
    result, report = run_window(example(tiny_package, *flags, "--quit-when-done", "--max-new-tokens", "16"),
                                display)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The window does not show a reply's leading whitespace (the space after "Assistant:").
    assert report["replies"] == ["".join(pieces).lstrip() for pieces, _ in expected]
    assert report["finish_reasons"] == [reason for _, reason in expected]
    assert report["reply"] == report["replies"][-1] and report["error"] is None
    assert 0 < report["startup_s"] < report["ready_s"] < report["first_token_s"]
    assert all(0 < ttft < RUN_TIMEOUT_S for ttft in report["ttfts"])
    assert report["tokens"] > 0 and "finish: " in report["status"]


def stop_point(package: Path) -> tuple[list[str], int]:
    """The greedy reply to "Hello" in 40 tokens, as pieces, and a piece count N that shows text (the reply starts
    with blank pieces) and leaves most of the reply unwritten."""
    (pieces, reason), = expected_replies(package, ["Hello"], 40)
    n = next(i for i, piece in enumerate(pieces) if piece.strip()) + 2
    assert reason == "length" and len(pieces) > 2 * n, pieces
    return pieces, n


def test_stop_cancels_the_reply_mid_stream(display, tiny_package):
    pieces, n = stop_point(tiny_package)

    result, report = run_window(example(tiny_package, "--send", "Hello", "--quit-when-done", "--max-new-tokens", "40",
                                        "--stop-after-pieces", str(n)), display)

    assert result.returncode == 0, result.stderr
    assert report["finish_reason"] == "cancelled"
    # The worker waits for the window to press Stop after piece n: no forward pass runs after it.
    assert report["reply"] == "".join(pieces[:n]).lstrip()
    assert report["status"].endswith("finish: cancelled")


def test_closing_the_window_cancels_the_reply_and_exits_cleanly(display, tiny_package):
    pieces, n = stop_point(tiny_package)

    result, report = run_window(example(tiny_package, "--send", "Hello", "--max-new-tokens", "40",
                                        "--close-after-pieces", str(n)), display)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert report["finish_reason"] == "cancelled"
    assert report["reply"] == "".join(pieces[:n]).lstrip()


def test_a_bad_model_path_is_one_line_in_the_window_not_a_traceback(display, tmp_path):
    result, report = run_window(example(tmp_path / "no-such-model", "--send", "Hello", "--quit-when-done"), display)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr == ""
    assert "no model package at" in report["error"] and "\n" not in report["error"]
    assert report["status"] == f"error: {report['error']}"
    assert report["replies"] == [] and report["ready_s"] is None


@pytest.mark.slow  # over half a second on two cores
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not on PATH (Debian: apt-get install xdotool)")
def test_without_a_path_the_model_is_chosen_in_the_folder_dialog(display, tiny_package):
    (pieces, _), = expected_replies(tiny_package, ["Hello"], 16)
    env = dict(os.environ, DISPLAY=display)
    command = [sys.executable, str(EXAMPLE), "--send", "Hello", "--quit-when-done", "--max-new-tokens", "16",
               "--temperature", "0"]  # no MODEL: the folder dialog opens
    app = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        xdotool = ["xdotool", "search", "--sync", "--name", "Choose an edgegpt model package", "windowfocus", "--sync",
                   "type", "--delay", "5", str(tiny_package)]
        subprocess.run(xdotool, env=env, check=True, timeout=30, capture_output=True)
        # The first Return opens the typed folder in the dialog, the second chooses it.
        subprocess.run(["xdotool", "key", "--delay", "100", "Return", "Return"], env=env, check=True, timeout=30)
        out, err = app.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()

    assert app.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["model"] == str(tiny_package)
    assert report["reply"] == "".join(pieces).lstrip()

