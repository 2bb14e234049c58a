"""The wheel as a user gets it: built from the tracked sources, installed non-editable into fresh virtual
environments, used from a folder outside the checkout.

    base install (what a desktop app ships)      edgegpt --version, info, generate, chat on a tiny package;
                                                 every module that needs no extra imports; convert and train
                                                 answer with their one-line "install the extra" error
    + torch, edgegpt[convert,serve] from the     convert a tiny GGUF file, export it, generate; serve it and
      same wheel                                 answer an OpenAI-style completion

The checkout's Python (with the [dev] extra) makes the fixtures: a tiny GGUF file written with gguf's own
writer (the tests' helper) and the package exported from it. Exits non-zero at the first broken promise.

    python .ci/check_wheel.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # pinned as in .ci/run: an unpinned torch pulls a CUDA build of several GB
PROMPT = "Hello"


def step(message: str) -> None:
    print(f"check-wheel: {message}", flush=True)


def fail(message: str) -> None:
    print(f"check-wheel: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(command: list[str], *, cwd: Path, expect: int = 0, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=900,
                            env={**os.environ, **(env or {})})
    if result.returncode != expect:
        fail(f"{' '.join(command)} exited {result.returncode} (expected {expect})\n"
             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def tracked_sources() -> list[str]:
    """Files git tracks (or would: untracked and not ignored) under the three package folders."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                              "edgegpt", "export", "runtime"], cwd=CHECKOUT, capture_output=True, text=True,
                             check=True).stdout.split()
    return sorted(path for path in listing if (CHECKOUT / path).is_file())


def source_modules() -> set[str]:
    """The import names of the tracked Python files, as setup.py maps the three folders (no __main__)."""
    prefix = {"edgegpt": "edgegpt", "export": "edgegpt.export", "runtime": "edgegpt.runtime"}
    names = set()
    for path in tracked_sources():
        folder, _, rest = path.removesuffix(".py").partition("/")
        if path.endswith(".py") and not rest.endswith("__main__"):
            names.add(".".join([prefix[folder], *rest.split("/")]).removesuffix(".__init__"))
    return names


def build_wheel(work: Path) -> Path:
    """pip wheel over a copy of the tracked files, so nothing stale in build/ or the working tree rides along."""
    source = work / "source"
    for path in [*tracked_sources(), "pyproject.toml", "setup.py", "README.md"]:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CHECKOUT / path, source / path)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
         str(work / "dist"), str(source)], cwd=work)
    (wheel,) = (work / "dist").glob("edgegpt-*.whl")
    return wheel


def make_fixtures(work: Path) -> tuple[Path, Path]:
    """A tiny GGUF file with a chat template, and the package the checkout's edgegpt exports from it."""
    sys.path.insert(0, str(CHECKOUT / "tests"))
    from test_convert_gguf import CHATML, tiny_model, tokenizer_meta, train_original, write_gguf

    from conftest import sample_text

    tokenizer = train_original("gpt2", sample_text()[:20_000])
    meta = tokenizer_meta(tokenizer, "gpt2", eos=2, chat_template=CHATML)
    gguf_file = write_gguf(work / "tiny.gguf", tiny_model(tokenizer.get_vocab_size()), meta)
    run([sys.executable, "-m", "edgegpt", "convert", str(gguf_file), str(work / "checkpoint")], cwd=work)
    run([sys.executable, "-m", "edgegpt", "export", str(work / "checkpoint"), "--out", str(work / "package")],
        cwd=work)
    return gguf_file, work / "package"


def venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


def greedy(edgegpt: list[str], package: Path, cwd: Path) -> str:
    return run([*edgegpt, "generate", PROMPT, "--model", str(package), "--max-new-tokens", "12",
                "--temperature", "0"], cwd=cwd).stdout


def check_base_install(bin_dir: Path, wheel: Path, package: Path, gguf_file: Path, outside: Path) -> None:
    run([str(bin_dir / "pip"), "install", "--quiet", str(wheel)], cwd=outside)
    installed = run([str(bin_dir / "pip"), "list", "--format", "json"], cwd=outside).stdout
    names = {entry["name"].lower() for entry in json.loads(installed)}
    for heavy in ("torch", "onnx", "transformers", "gguf", "starlette"):
        if heavy in names:
            fail(f"the base install pulled in {heavy}")
    edgegpt = [str(bin_dir / "edgegpt")]

    version = run([*edgegpt, "--version"], cwd=outside).stdout.strip()
    wheel_version = wheel.name.split("-")[1]
    if version != f"edgegpt {wheel_version}":
        fail(f"edgegpt --version said {version!r}, the wheel is {wheel_version}")
    step(f"base install: {version}")

    info = run([*edgegpt, "info", str(package)], cwd=outside).stdout
    if "chat_template.jinja" not in info or "GroupQueryAttention" not in info:
        fail(f"edgegpt info does not show the package's chat template and fused graph:\n{info}")

    text = greedy(edgegpt, package, outside)
    from_checkout = greedy([sys.executable, "-m", "edgegpt"], package, outside)
    if not text.startswith(PROMPT) or text != from_checkout:
        fail(f"generate from the wheel gave {text!r}, the checkout {from_checkout!r}")
    step("base install: info, and generate equal to the checkout's")

    options = ["--model", str(package), "--max-new-tokens", "8", "--temperature", "0"]
    chat = run([*edgegpt, "chat", *options], cwd=outside, stdin="Hi there\n/quit\n")
    answer = run([*edgegpt, "generate", "--chat", "Hi there", *options], cwd=outside).stdout
    if "/quit leaves" not in chat.stderr or chat.stdout != answer:
        fail(f"edgegpt chat replied {chat.stdout!r}, generate --chat {answer!r}:\n{chat.stderr}")
    step("base install: chat replies as generate --chat does")

    check_imports(bin_dir / "python", outside)
    for command, extra in ((["convert", str(gguf_file), str(outside / "converted")], "convert"),
                           (["train", "--max-steps", "1", "--out", str(outside / "trained")], "train")):
        result = run([*edgegpt, *command], cwd=outside, expect=2)
        lines = result.stderr.strip().splitlines()
        if len(lines) != 1 or f"pip install 'edgegpt[{extra}]'" not in lines[0]:
            fail(f"edgegpt {command[0]} without the [{extra}] extra said:\n{result.stderr}")
        if (outside / "converted").exists() or (outside / "trained").exists():
            fail(f"edgegpt {command[0]} wrote output although it could not run")
    step("base install: convert and train name their extra in one line")


IMPORT_EVERY_MODULE = r"""
import importlib, json, pathlib, re
from importlib.metadata import distribution

import edgegpt

# The distributions only an extra brings: importing a module may fail on these and nothing else.
optional = set()
for requirement in distribution("edgegpt").requires or []:
    if "extra ==" in requirement:
        optional.add(re.split(r"[ <>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("-", "_"))
optional.discard("edgegpt")  # [convert] brings edgegpt[train]: a missing edgegpt module is never optional
imported, needs_extra = [], {}
root = pathlib.Path(edgegpt.__file__).parent
for path in sorted(root.rglob("*.py")):  # every file, also inside packages that need an extra
    name = ".".join(("edgegpt", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    if name.endswith(".__main__"):  # runs the CLI
        continue
    try:
        importlib.import_module(name)
        imported.append(name)
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top.lower() not in optional:
            raise
        needs_extra[name] = top
print(json.dumps({"imported": imported, "needs_extra": needs_extra}))
"""


def check_imports(python: Path, outside: Path) -> None:
    """Every module imports, or fails only on a distribution an extra brings; the runtime, the core and
    the CLI need none."""
    report = json.loads(run([str(python), "-c", IMPORT_EVERY_MODULE], cwd=outside).stdout)
    found = {"edgegpt", *report["imported"], *report["needs_extra"]}
    if found != (expected := source_modules()):
        fail(f"modules in the checkout but not in the installed wheel: {sorted(expected - found)}; "
             f"in the wheel only: {sorted(found - expected)}")
    for name, missing in report["needs_extra"].items():
        if name.startswith(("edgegpt.runtime", "edgegpt.core", "edgegpt.cli")):
            fail(f"{name} needs {missing}, which the base install lacks")
    if not any(name.startswith("edgegpt.runtime.") for name in report["imported"]):
        fail(f"no runtime module was found in the installed wheel: {report}")
    step(f"base install: {len(report['imported'])} modules import; {len(report['needs_extra'])} need an extra")


def check_extras(bin_dir: Path, wheel: Path, gguf_file: Path, outside: Path, package: Path) -> None:
    run([str(bin_dir / "pip"), "install", "--quiet", TORCH], cwd=outside)
    run([str(bin_dir / "pip"), "install", "--quiet", f"edgegpt[convert,serve] @ {wheel.as_uri()}"], cwd=outside)
    edgegpt = [str(bin_dir / "edgegpt")]
    run([*edgegpt, "convert", str(gguf_file), str(outside / "checkpoint")], cwd=outside)
    run([*edgegpt, "export", str(outside / "checkpoint"), "--out", str(outside / "package")], cwd=outside)
    text = greedy(edgegpt, outside / "package", outside)
    expected = greedy(edgegpt, package, outside)
    if text != expected:
        fail(f"the package converted and exported from the wheel generates {text!r}, the checkout's {expected!r}")
    step("[convert]: convert a GGUF file, export, generate what the checkout's package does")
    check_serve(edgegpt, outside / "package", outside)


def check_serve(edgegpt: list[str], package: Path, outside: Path) -> None:
    server = subprocess.Popen([*edgegpt, "serve", str(package), "--port", "0", "--provider", "cpu"],
                              cwd=outside, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(found.group(1)) if found else None
        if port is None:
            fail("edgegpt serve never said where it listens")
        body = json.dumps({"model": package.name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        if reply["choices"][0]["finish_reason"] not in ("length", "stop") or reply["usage"]["completion_tokens"] < 1:
            fail(f"edgegpt serve answered {reply}")
        step("[serve]: a completion over HTTP")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="Work in this folder and leave it (default: a temporary one).")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgegpt-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        wheel = build_wheel(work)
        step(f"built {wheel.name}")
        gguf_file, package = make_fixtures(work)
        outside = work / "elsewhere"
        outside.mkdir()
        bin_dir = venv(work / "venv")
        check_base_install(bin_dir, wheel, package, gguf_file, outside)
        check_extras(bin_dir, wheel, gguf_file, outside, package)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    step("the wheel installs whole")


if __name__ == "__main__":
    main()
