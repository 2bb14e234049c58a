"""`edgegpt generate` takes its prompt as an argument, from standard input (`-`) or from --prompt-file:
a prompt of 120,000 characters cannot pass as an argument on Linux."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgegpt.cli.app import app
from edgegpt.runtime import Generator

runner = CliRunner()
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def expected(tiny_package) -> str:
    return Generator.load(tiny_package).generate("The import statement", temperature=0, max_new_tokens=8)


def test_standard_input_and_a_file_give_what_the_argument_gives(tiny_package, tmp_path, expected):
    model = ["--model", str(tiny_package)]
    argument = runner.invoke(app, ["generate", "The import statement", *model, *GREEDY])
    assert argument.exit_code == 0 and argument.stdout == "The import statement" + expected + "\n"
    piped = runner.invoke(app, ["generate", "-", *model, *GREEDY], input="The import statement")
    assert piped.exit_code == 0, piped.output
    assert piped.stdout == expected + "\n"  # a prompt read from a stream or a file is not printed back
    path = tmp_path / "prompt.txt"
    path.write_text("The import statement", encoding="utf-8")
    from_file = runner.invoke(app, ["generate", "--prompt-file", str(path), *model, *GREEDY])
    assert from_file.exit_code == 0 and from_file.stdout == expected + "\n"


def test_a_prompt_file_longer_than_any_argument(tiny_package, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("The import statement binds names. " * 3600, encoding="utf-8")  # ~120,000 characters
    assert path.stat().st_size > 120_000
    result = runner.invoke(app, ["generate", "--prompt-file", str(path), "--model", str(tiny_package),
                                 "--truncate", "left", *GREEDY])
    assert result.exit_code == 0, result.output
    line = one_line_error(runner.invoke(app, ["generate", "--prompt-file", str(path), "--model", str(tiny_package)]))
    assert "context" in line


@pytest.mark.parametrize("args, fragment", [
    (["generate"], "exactly one"),
    (["generate", "hello", "--prompt-file", "x.txt"], "exactly one"),
    (["generate", "--prompt-file", "no/such/file.txt"], "cannot read --prompt-file"),
])
def test_bad_prompt_sources_are_one_line(tiny_package, args, fragment):
    assert fragment in one_line_error(runner.invoke(app, [*args, "--model", str(tiny_package)]))


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_package, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in one_line_error(runner.invoke(app, ["generate", "--prompt-file", str(path), "--model",
                                                             str(tiny_package)]))
    piped = runner.invoke(app, ["generate", "-", "--model", str(tiny_package)], input="café".encode("latin-1"))
    assert "not UTF-8" in one_line_error(piped)
