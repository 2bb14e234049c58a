"""A desktop chat window around the edgegpt runtime: Tkinter (standard library only), replies streamed in.

    python examples/desktop_chat.py [MODEL_DIR]     # no MODEL_DIR: a folder dialog asks for a model package
    python examples/desktop_chat.py MODEL --send "Hello" --quit-when-done --max-new-tokens 16 --temperature 0

Two threads, and only one of them touches Tk:

    Tk main loop (widgets, events)                    worker thread (one per job: a load, or one reply)
      Send / Enter ─► start a worker ───────────────►   Generator.load(path) | for piece in stream: ...
      after(10 ms) polls the queue ◄── queue.Queue ◄──  ("loaded", g) ("piece", text) ("done", ...) ("error", msg)
      Stop / Esc / closing the window ─► cancel.set()   the stream ends before its next forward pass

The model loads in the worker too, so the window shows "loading…" at once and stays responsive; the
runtime itself (numpy, onnxruntime) is imported there, after the window is up. A message sent while the
model loads is answered once it is ready. Packages with a chat template are prompted with it
(Generator.stream_chat); packages without one (a base model from `edgegpt train`) with the plain
transcript (edgegpt.runtime.transcript). The conversation is kept, so follow-up turns see the earlier
ones; the oldest turns are dropped when it outgrows the context (truncate="left").

Scripted mode (tests and measurements): --send TEXT (repeatable) types each message into the entry once
the model is ready and presses Send (the button's own code path), one after the other; when the last
reply is done, on an error, or when the window closes, one JSON line goes to stdout:

    reply / replies              the replies as read back from the Text widget (leading whitespace is not
                                 shown: a transcript reply starts with the space after "Assistant:")
    finish_reason / finish_reasons, tokens, tokens_per_s (of the last reply), status (the status line)
    startup_s                    process start (the interpreter's or the frozen app's) to the window shown
    ready_s, load_s              process start to the model loaded; seconds the load itself took
    ttft_s / ttfts               Send pressed to the reply's first text in the widget (time to first token)
    first_token_s                process start to the first reply's first text in the widget
    error                        null, or the one-line EdgeGPTError message (exit status 2)

--stop-after-pieces N presses Stop once N pieces of a reply have arrived, and --close-after-pieces N
closes the window then (as the window manager's close button does); the worker waits until the window
has acted on piece N, so the cancel lands mid-reply however fast the model is. --quit-when-done closes
the window after the report.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import tkinter as tk
import traceback
from pathlib import Path
from tkinter import filedialog, messagebox, ttk
from typing import Any

from edgegpt import EdgeGPTError  # the light core; the runtime itself is imported by the worker


def _process_age() -> float:
    """Seconds since this process started: on Linux from /proc (so a frozen app's bootloader and the
    interpreter's own start-up count), elsewhere since this module ran."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


PROCESS_START = time.perf_counter() - _process_age()  # every figure below is relative to this
POLL_BUSY_MS, POLL_IDLE_MS = 10, 100  # how often the window drains the worker's queue
CLOSE_WAIT_S = 10.0  # at most this long for a worker to end after the window closes
TITLE = "edgegpt chat"


def since_start() -> float:
    return time.perf_counter() - PROCESS_START


class ChatWindow:
    """The window and its conversation. Every method runs on the Tk main thread except the two `_worker_`
    ones, which touch no widget and talk to the window only through `self.events`."""

    def __init__(self, root: tk.Tk, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.generator = None  # edgegpt.runtime.Generator, once loaded
        self.model_path: str | None = None
        self.messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        self.state = "idle"  # idle | loading | generating | closing
        self.pending = False  # a message sent while the model loads waits for it
        self.cancel = threading.Event()  # a fresh one per reply: a late Stop never reaches the next reply
        self.worker: threading.Thread | None = None
        self.reply: dict[str, Any] = {}  # the reply being streamed: raw text, pieces, timings
        self.script = list(args.send or [])
        self.report: dict[str, Any] = {"model": None, "reply": None, "replies": [], "finish_reason": None,
                                       "finish_reasons": [], "startup_s": None, "ready_s": None, "load_s": None,
                                       "ttft_s": None, "ttfts": [], "first_token_s": None, "tokens": None,
                                       "tokens_per_s": None, "status": "", "error": None}
        self.exit_code = 0
        self._build()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.bind("<Map>", self._on_map)
        root.after(POLL_IDLE_MS, self._poll)

    # -- widgets -------------------------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.title(TITLE)
        root.geometry(self.args.geometry)
        root.minsize(360, 240)
        top = ttk.Frame(root, padding=(8, 6, 8, 0))
        top.pack(fill="x")
        self.model_label = ttk.Label(top, text="no model", anchor="w")
        self.model_label.pack(side="left", fill="x", expand=True)
        self.open_button = ttk.Button(top, text="Open model…", command=self.ask_for_model)
        self.open_button.pack(side="right")

        middle = ttk.Frame(root, padding=(8, 6))
        middle.pack(fill="both", expand=True)
        self.text = tk.Text(middle, wrap="word", state="disabled", height=10, width=60, padx=8, pady=6,
                            relief="flat", borderwidth=1, highlightthickness=1, font="TkTextFont")
        scroll = ttk.Scrollbar(middle, orient="vertical", command=self.text.yview)
        self.text.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.text.pack(side="left", fill="both", expand=True)
        self.text.tag_configure("role", font="TkHeadingFont", spacing1=6)
        self.text.tag_configure("user", foreground="#1d3f8a")
        self.text.tag_configure("assistant", foreground="#111111")
        self.text.tag_configure("note", foreground="#9a1c1c")

        bottom = ttk.Frame(root, padding=(8, 0, 8, 4))
        bottom.pack(fill="x")
        self.entry = ttk.Entry(bottom)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _event: self.send())
        self.send_button = ttk.Button(bottom, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = ttk.Button(bottom, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        root.bind("<Escape>", lambda _event: self.stop())
        root.bind("<Control-q>", lambda _event: self.close())

        self.status = ttk.Label(root, text="", anchor="w", padding=(8, 2, 8, 6))
        self.status.pack(fill="x")
        self.entry.focus_set()

    def _set_status(self, text: str) -> None:
        self.status.configure(text=text)
        self.report["status"] = text

    def _append(self, text: str, *tags: str) -> None:
        self.text.configure(state="normal")
        self.text.insert("end-1c", text, tags)
        self.text.configure(state="disabled")
        self.text.see("end")

    def _refresh_buttons(self) -> None:
        busy = self.state in ("loading", "generating", "closing")
        self.send_button.configure(state="disabled" if self.pending or self.state in ("generating", "closing")
                                   else "normal")
        self.stop_button.configure(state="normal" if self.state == "generating" else "disabled")
        self.open_button.configure(state="disabled" if busy else "normal")

    # -- start: the model from the command line, or from a dialog -------------------------------------

    def _on_map(self, event: tk.Event) -> None:
        if event.widget is not self.root or self.report["startup_s"] is not None:
            return
        self.report["startup_s"] = round(since_start(), 4)
        if self.args.model is not None:
            self.load(self.args.model)
        else:
            self.root.after(1, self.ask_for_model)

    def ask_for_model(self) -> None:
        if self.state != "idle":
            return
        path = filedialog.askdirectory(parent=self.root, title="Choose an edgegpt model package",
                                       mustexist=True)
        if path:
            self.load(path)
        elif self.generator is None:
            self._set_status("No model: choose a model package folder with “Open model…”.")
            if self.args.send:  # scripted: nothing will ever be answered
                self.report["error"], self.exit_code = "no model package was chosen", 2
                self._end_script()

    def load(self, path: str) -> None:
        self.state, self.model_path = "loading", str(path)
        self.report["model"] = self.model_path
        self.model_label.configure(text=f"model: {self.model_path}")
        self._set_status(f"loading {Path(self.model_path).name}…")
        self._refresh_buttons()
        self._start_worker(self._worker_load, self.model_path)

    def _worker_load(self, path: str) -> None:
        started = time.perf_counter()
        from edgegpt.runtime import Generator  # numpy and onnxruntime take a moment: after the window is up

        generator = Generator.load(path, threads=self.args.threads)
        self.events.put(("loaded", generator, time.perf_counter() - started))

    # -- a reply ----------------------------------------------------------------------------------------

    def send(self) -> None:
        """Send and Enter: the entry's text becomes the next user message."""
        text = self.entry.get().strip()
        if not text or self.pending or self.state in ("generating", "closing"):
            return
        if self.generator is None and self.state != "loading":
            self.root.bell()
            self._set_status("No model yet: choose one with “Open model…”.")
            return
        self.entry.delete(0, "end")
        self.messages.append({"role": "user", "content": text})
        self._append("You\n", "role", "user")
        self._append(text + "\n", "user")
        self.reply = {"sent": time.perf_counter(), "raw": "", "pieces": 0, "shown": False}
        if self.generator is None:  # still loading: answered when the model is ready
            self.pending = True
            self._set_status("loading… the message is answered when the model is ready")
            self._refresh_buttons()
            return
        self._generate()

    def _generate(self) -> None:
        self.pending, self.state = False, "generating"
        self.cancel = threading.Event()
        self._append("Assistant\n", "role", "assistant")
        self.text.mark_set("reply_start", "end-1c")
        self.text.mark_gravity("reply_start", "left")
        self._set_status("generating…  (Stop or Esc cancels)")
        self._refresh_buttons()
        hold = threading.Event() if self.args.stop_after_pieces or self.args.close_after_pieces else None
        self.reply["hold"] = hold
        self._start_worker(self._worker_reply, self.generator, list(self.messages), self.cancel, hold)

    def _worker_reply(self, generator, messages: list[dict[str, str]], cancel: threading.Event,
                      hold: threading.Event | None) -> None:
        options = {"cancel": cancel, "max_new_tokens": self.args.max_new_tokens,
                   "temperature": self.args.temperature, "truncate": "left"}
        started = time.perf_counter()
        if generator.package.chat_template is not None:
            stream = generator.stream_chat(messages, **options)
        else:  # a base model: the documented plain transcript
            from edgegpt.runtime.transcript import TRANSCRIPT_STOPS, plain_transcript

            stream = generator.stream(plain_transcript(messages), stop=list(TRANSCRIPT_STOPS), **options)
        text = []
        for count, piece in enumerate(stream, 1):
            text.append(piece)
            self.events.put(("piece", piece))
            if hold is not None and count == (self.args.stop_after_pieces or self.args.close_after_pieces):
                hold.wait(timeout=30)  # scripted cancel: let the window press Stop before the next step
        seconds = time.perf_counter() - started
        # Counted by encoding the reply again: stream() yields text pieces, which are not one per token.
        tokens = len(generator.package.tokenizer.encode("".join(text), add_special_tokens=False).ids)
        self.events.put(("done", stream.finish_reason, tokens, seconds))

    def _on_piece(self, piece: str) -> None:
        reply = self.reply
        reply["raw"] += piece
        reply["pieces"] += 1
        shown = piece if reply["shown"] else piece.lstrip()
        if shown:
            if not reply["shown"]:
                reply["shown"] = True
                reply["ttft"] = time.perf_counter() - reply["sent"]
                if self.report["first_token_s"] is None:
                    self.report["first_token_s"] = round(since_start(), 4)
            self._append(shown, "assistant")
        if reply["pieces"] == self.args.stop_after_pieces:
            self.stop_button.invoke()
        if reply["pieces"] == self.args.close_after_pieces:
            self.close()
        if reply.get("hold") is not None and reply["pieces"] in (self.args.stop_after_pieces,
                                                                 self.args.close_after_pieces):
            reply["hold"].set()

    def _on_done(self, finish_reason: str, tokens: int, seconds: float) -> None:
        shown = self.text.get("reply_start", "end-1c")
        self._append("\n")
        # What the user saw is what the model said: a stopped reply stays in the conversation as it is.
        self.messages.append({"role": "assistant", "content": self.reply["raw"]})
        rate = tokens / seconds if seconds > 0 else 0.0
        ttft = self.reply.get("ttft")
        first = f" · first token {ttft:.2f} s" if ttft is not None else ""
        self._set_status(f"{tokens} tokens · {rate:.1f} tokens/s{first} · finish: {finish_reason}")
        report = self.report
        report["replies"].append(shown)
        report["finish_reasons"].append(finish_reason)
        report["ttfts"].append(None if ttft is None else round(ttft, 4))
        report.update(reply=shown, finish_reason=finish_reason, ttft_s=report["ttfts"][0], tokens=tokens,
                      tokens_per_s=round(rate, 2))
        if self.state != "closing":
            self.state = "idle"
            self._refresh_buttons()
            self._next_scripted_step()

    def stop(self) -> None:
        if self.state == "generating" and not self.cancel.is_set():
            self.cancel.set()
            self._set_status("stopping…")

    # -- the worker's messages, errors, closing -----------------------------------------------------------

    def _start_worker(self, target, *args) -> None:
        def run() -> None:
            try:
                target(*args)
            except EdgeGPTError as e:  # a user's mistake (bad package, prompt too long): one line, no traceback
                self.events.put(("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
            except Exception:  # a bug: its traceback goes to stderr, and the window must not hang on it
                self.events.put(("crash", traceback.format_exc()))

        self.worker = threading.Thread(target=run, name="edgegpt-worker", daemon=True)
        self.worker.start()

    def _poll(self) -> None:
        try:
            while True:
                kind, *payload = self.events.get_nowait()
                if kind == "piece":
                    self._on_piece(*payload)
                elif kind == "done":
                    self._on_done(*payload)
                elif kind == "loaded":
                    self._on_loaded(*payload)
                else:
                    self._on_error(kind, *payload)
        except queue.Empty:
            pass
        if self.state == "closing":
            return self._finish_closing()
        self.root.after(POLL_BUSY_MS if self.state in ("loading", "generating") else POLL_IDLE_MS, self._poll)

    def _on_loaded(self, generator, seconds: float) -> None:
        self.generator = generator
        self.report.update(ready_s=round(since_start(), 4), load_s=round(seconds, 4))
        kind = "chat template" if generator.package.chat_template is not None else "plain transcript"
        self._set_status(f"ready: {Path(self.model_path).name} ({kind}, loaded in {seconds:.2f} s)")
        if self.state == "closing":
            return
        self.state = "idle"
        if self.pending:
            self._generate()
        else:
            self._refresh_buttons()
            self._next_scripted_step()

    def _on_error(self, kind: str, message: str) -> None:
        if kind == "crash":
            sys.stderr.write(message)
            message, self.exit_code = "internal error (the details are on the console)", 1
        else:
            self.exit_code = 2
        self.report["error"] = message
        if self.reply and self.state in ("generating", "closing") and "hold" in self.reply:
            if self.reply["pieces"]:  # what was shown stays in the conversation
                self.messages.append({"role": "assistant", "content": self.reply["raw"]})
            else:  # the message got no reply: take it back out of the conversation
                self.messages.pop()
            self.reply = {}
        if self.state == "loading":
            if self.pending:  # a message sent while loading will get no reply
                self.messages.pop()
            self.generator, self.pending = None, False
            self.model_label.configure(text="no model")
        self._append(f"error: {message}\n", "note")
        self._set_status(f"error: {message}")
        if self.state != "closing":
            self.state = "idle"
            self._refresh_buttons()
        if self.args.send:  # scripted: report and stop, never wait on a dialog
            self.script.clear()
            self._end_script()
        elif self.state != "closing":
            messagebox.showerror(TITLE, message, parent=self.root)

    def _next_scripted_step(self) -> None:
        if not self.args.send or self.generator is None:
            return
        if self.script:
            self.entry.delete(0, "end")
            self.entry.insert(0, self.script.pop(0))
            self.send_button.invoke()
        else:
            self._end_script()

    def _end_script(self) -> None:
        if self.report.get("printed"):
            return
        self.report["printed"] = True
        print(json.dumps({k: v for k, v in self.report.items() if k != "printed"}), flush=True)
        if self.args.quit_when_done:
            self.close()

    def close(self) -> None:
        """The window's close button, Ctrl+Q and --quit-when-done: cancel what runs, then leave."""
        if self.state == "closing":
            return
        self.state = "closing"
        self.cancel.set()
        self.root.withdraw()
        self.close_deadline = time.monotonic() + CLOSE_WAIT_S  # the poll loop ends it (_finish_closing)

    def _finish_closing(self) -> None:
        if self.worker is not None and self.worker.is_alive() and time.monotonic() < self.close_deadline:
            self.root.after(POLL_BUSY_MS, self._poll)  # the stream ends at its next forward pass
            return
        if self.args.send and not self.report.get("printed"):
            self._end_script()
        self.root.destroy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A desktop chat window for an edgegpt model package.")
    parser.add_argument("model", nargs="?", help="model package directory (default: choose it in a dialog)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the package's")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default: the package's")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.add_argument("--geometry", default="720x520", help="window size, as Tk takes it (WxH)")
    scripted = parser.add_argument_group("scripted mode (tests, measurements)")
    scripted.add_argument("--send", action="append", metavar="TEXT", help="send TEXT once ready (repeatable)")
    scripted.add_argument("--quit-when-done", action="store_true", help="close the window after the report")
    scripted.add_argument("--stop-after-pieces", type=int, default=None, metavar="N",
                          help="press Stop when N pieces of a reply have arrived")
    scripted.add_argument("--close-after-pieces", type=int, default=None, metavar="N",
                          help="close the window when N pieces of a reply have arrived")
    args = parser.parse_args(argv)
    if (args.stop_after_pieces or args.close_after_pieces) and not args.send:
        parser.error("--stop-after-pieces and --close-after-pieces go with --send")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = tk.Tk(className="EdgegptChat")
    except tk.TclError as e:  # no display
        print(f"desktop_chat: error: cannot open a window ({e})", file=sys.stderr)
        return 2
    window = ChatWindow(root, args)
    root.mainloop()
    if window.worker is not None and window.worker.is_alive():
        # A load still running after CLOSE_WAIT_S: leave without waiting for it (a daemon thread inside
        # onnxruntime may not outlive interpreter shutdown quietly).
        sys.stdout.flush()
        os._exit(window.exit_code)
    return window.exit_code


if __name__ == "__main__":
    sys.exit(main())
