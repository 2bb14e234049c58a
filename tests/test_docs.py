"""The docs hold to the code: every `edgegpt ...` command line in README.md and docs/*.md parses against the
real command line, every relative link (and #anchor) resolves, and docs/commands.md is what
edgegpt.cli.reference generates from the Typer app."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgegpt.cli import reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
DOC_IDS = [str(path.relative_to(ROOT)) for path in DOCS]

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)\s*(?P<info>[^\s`]*)")
GENERATED = re.compile(r"<!-- generated: .*?<!-- end generated -->", re.S)
INLINE_CODE = re.compile(r"(`+)(?P<code>.+?)\1")
# An inline span written as a synopsis (`edgegpt bench [MODEL] [--json]`) describes a command rather than
# giving one; those are left to the generated reference.
SYNOPSIS = re.compile(r"[\[\]{}…]|\.\.\.|\|")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
WRAPPERS = {"time", "env", "nohup", "sudo", "exec"}


# -- Markdown --------------------------------------------------------------------------------------------

def split_fences(text: str) -> tuple[list[tuple[str, int, list[str]]], list[tuple[int, str]]]:
    """(fenced blocks as (info string, first line number, lines), the other lines with their numbers)."""
    blocks, prose = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, info, start, body = opening["fence"], opening["info"].lower(), i + 2, []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((info, start, body))
        i += 1
    return blocks, prose


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines with their backslash continuations joined."""
    joined, pending, at = [], "", first
    for number, line in enumerate(lines, first):
        if not pending:
            at = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((at, pending + line))
        pending = ""
    if pending:
        joined.append((at, pending))
    return joined


def command_lines(text: str) -> list[tuple[int, str, bool]]:
    """Every shell command line of a page that may run edgegpt, as (line number, command, inline): the lines
    of shell code blocks, the `$ ` lines of other blocks, and inline code spans that start with `edgegpt `
    (outside generated blocks)."""
    found = []
    blocks, prose = split_fences(text)
    for info, start, body in blocks:
        for number, line in logical_lines(body, start):
            stripped = line.strip()
            if stripped.startswith("$ "):
                found.append((number, stripped[2:], False))
            elif info in SHELL_LANGUAGES and info != "console":
                found.append((number, stripped, False))
    outside_generated = GENERATED.sub(lambda m: "\n" * m.group().count("\n"), "\n".join(line for _, line in prose))
    for number, line in enumerate(outside_generated.splitlines()):
        for span in INLINE_CODE.finditer(line):
            code = span["code"].strip()
            if re.match(r"^edgegpt( |$)", code) and not SYNOPSIS.search(code):
                found.append((prose[number][0], code, True))
    return found


def heading_anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to hyphens, a
    repeated one numbered), and any explicit <a id/name> anchors."""
    anchors, seen = set(), {}
    _, prose = split_fences(text)
    for _, line in prose:
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading[1])
            title = re.sub(r"<[^>]+>", "", title).replace("`", "").replace("*", "")
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
        anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return anchors


def relative_links(text: str) -> list[tuple[int, str]]:
    """Link and image targets outside code that name no scheme (http:, mailto:, ...)."""
    links = []
    _, prose = split_fences(text)
    for number, line in prose:
        line = INLINE_CODE.sub("", line)
        targets = re.findall(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", line)
        targets += re.findall(r"<(?:a|img)\s[^>]*(?:href|src)=\"([^\"]+)\"", line)
        links += [(number, target) for target in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)]
    return links


def link_error(page: Path, target: str, root: Path = ROOT) -> str | None:
    path_part, _, anchor = target.partition("#")
    destination = (page.parent / path_part).resolve() if path_part else page
    if root not in destination.parents and destination != root:
        return f"{target} points outside the repository"
    if not destination.exists():
        return f"{target}: no such file"
    if anchor and destination.suffix == ".md":
        if anchor not in heading_anchors(destination.read_text(encoding="utf-8")):
            return f"{target}: {destination.name} has no heading with the anchor #{anchor}"
    return None


# -- the command line ------------------------------------------------------------------------------------

def edgegpt_arguments(line: str) -> list[list[str]]:
    """The arguments of each edgegpt run in a shell line (`edgegpt ...`, `python -m edgegpt ...`, `torchrun
    ... -m edgegpt ...`), through `&&`, `;` and pipes, after environment assignments, minus redirections."""
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)  # 2>&1, 2> log: the descriptor goes with its operator
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    commands, current, skip_next = [], [], False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token and all(char in "();<>|&" for char in token):
            if token.startswith((">", "<")) or token == "&>":
                skip_next = True  # a redirection's target
            else:
                commands.append(current)
                current = []
        else:
            current.append(token)
    commands.append(current)
    runs = []
    for words in commands:
        while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in WRAPPERS):
            words = words[1:]
        if words and (words[0] == "edgegpt" or words[0].endswith("/edgegpt")):
            runs.append(words[1:])
        elif "-m" in words[:-1] and words[words.index("-m") + 1] == "edgegpt":
            runs.append(words[words.index("-m") + 2:])
    return runs


def with_placeholders_filled(command, args: list[str]) -> list[str]:
    """A placeholder such as N or MINUTES after a numeric option becomes 1, so the line is checked for its
    options and arguments rather than for the reader's values; any other value is parsed as written."""
    numeric = {}
    for param in command.params:
        if param.param_type_name == "option" and not getattr(param, "is_flag", False):
            if reference.python_type(param) in (int, float):
                numeric.update({name: param for name in param.opts})
    filled = list(args)
    for i, arg in enumerate(filled):
        name, equals, value = arg.partition("=")
        if equals and name in numeric and PLACEHOLDER.match(value):
            filled[i] = f"{name}=1"
        elif arg in numeric and i + 1 < len(filled) and PLACEHOLDER.match(filled[i + 1]):
            filled[i + 1] = "1"
    return filled


def parse_error(args: list[str], partial: bool = False) -> str | None:
    """Why `edgegpt ARGS` would be refused by the command line before running, or None when it parses:
    the subcommand exists, every option is one it takes with a value of its type, and no argument is missing
    or left over. `partial` is for prose that names a command or an option in passing (`edgegpt eval`,
    `edgegpt export --draft`): a missing argument, or the value of a last option, is not held against it."""
    from edgegpt.cli.app import with_quantize_auto

    group = reference.cli_command()
    args = with_quantize_auto(list(args))
    if not args:
        return None
    if args[0].startswith("-"):
        command, name, rest = group, "edgegpt", args
    elif args[0] not in group.commands:
        return f"edgegpt has no command {args[0]!r}"
    else:
        command, name, rest = group.commands[args[0]], f"edgegpt {args[0]}", args[1:]
    if "--help" in rest:
        rest = [arg for arg in rest if arg != "--help"]
        if not rest:
            return None
    if partial and rest and any(rest[-1] in param.opts for param in command.params
                                if param.param_type_name == "option" and not getattr(param, "is_flag", False)):
        rest = [*rest, "VALUE"]
    try:
        command.make_context(name, with_placeholders_filled(command, rest), resilient_parsing=False)
    except Exception as error:  # click's UsageError family, or Exit from an eager option such as --version
        if type(error).__name__ == "Exit" and getattr(error, "exit_code", 0) == 0:
            return None
        missing_argument = getattr(getattr(error, "param", None), "param_type_name", None) == "argument"
        if partial and type(error).__name__ == "MissingParameter" and missing_argument:
            return None
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        return f"{type(error).__name__}: {message}"
    return None


# -- the tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", DOCS, ids=DOC_IDS)
def test_every_edgegpt_command_line_parses_against_the_cli(page):
    failures = []
    for number, line, inline in command_lines(page.read_text(encoding="utf-8")):
        for args in edgegpt_arguments(line):
            error = parse_error(args, partial=inline)
            if error:
                failures.append(f"{page.name}:{number}: edgegpt {shlex.join(args)}\n    {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("page", DOCS, ids=DOC_IDS)
def test_every_relative_link_resolves(page):
    failures = []
    for number, target in relative_links(page.read_text(encoding="utf-8")):
        error = link_error(page, target)
        if error:
            failures.append(f"{page.name}:{number}: {error}")
    assert not failures, "\n".join(failures)


def test_the_command_reference_is_what_the_cli_generates():
    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert reference.render(page) == page, "docs/commands.md is out of date: python -m edgegpt.cli.reference " \
        "docs/commands.md"


def test_the_reference_covers_every_command_and_option():
    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    group = reference.cli_command()
    for name, command in reference.visible_commands(group).items():
        assert f"<!-- generated: edgegpt {name} -->" in page
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                assert f"`{param.opts[0]}`" in page


# -- the checkers themselves catch what they are for -------------------------------------------------------

@pytest.mark.parametrize("line", [
    "edgegpt generate 'hi' --no-such-option",
    "edgegpt train --time-budget eight",
    "edgegpt generate --provider tpu 'hi'",
    "edgegpt convert model.gguf",                      # OUT missing
    "edgegpt info a b",                                # an argument left over
    "edgegpt trian --max-steps 5",
    "pip install -e . && EDGEGPT_HOME=/tmp edgegpt export --quantise",
    "torchrun --nproc_per_node 2 -m edgegpt train --devices cpu",
])
def test_a_bad_command_line_is_refused(line):
    runs = edgegpt_arguments(line)
    assert runs and any(parse_error(args) for args in runs)


@pytest.mark.parametrize("line", [
    "edgegpt train --time-budget MINUTES --data notes/ --data more.jsonl",
    "edgegpt export --quantize auto --max-ppl-increase P  # a comment",
    "edgegpt generate - --seed 3 < prompt.txt | tee out.txt",
    "EDGEGPT_HOME=/tmp/w edgegpt generate \"The socket module\" --stop '\n\n' 2>&1",
    "torchrun --standalone --nproc_per_node 2 -m edgegpt train --device cpu",
    "edgegpt convert --help",
])
def test_a_good_command_line_parses(line):
    runs = edgegpt_arguments(line)
    assert runs and all(parse_error(args) is None for args in runs)


def test_markdown_helpers_find_commands_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` title — here\n\n## Speed, on the same weights\n\n## Speed, on the same weights\n\n"
        "Run `edgegpt info DIR`, see [a](#a-code-title--here), [b](#speed-on-the-same-weights-1), [c](#nope),"
        " [d](missing.md), [e](https://example.com), `[f](missing-in-code.md)`.\n\n"
        "```bash\nedgegpt train \\\n    --max-steps 5   # trains\n```\n", encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    assert [line for _, line, _ in command_lines(text)] == ["edgegpt train      --max-steps 5   # trains",
                                                            "edgegpt info DIR"]
    errors = {target: link_error(page, target, root=tmp_path) for _, target in relative_links(text)}
    assert [target for target, error in errors.items() if error] == ["#nope", "missing.md"]
