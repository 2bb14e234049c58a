"""Reading a corpus: files, directories and JSONL, or the embedded default.

A corpus is a list of documents (strings). Every failure names the file and says what to do.
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
from pathlib import Path
from typing import Sequence

from edgegpt.core.errors import EdgeGPTError

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_CORPUS_NAME = "python-docs"


def read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeGPTError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeGPTError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 or leave it out"
        ) from None


def read_jsonl(path: Path) -> list[str]:
    documents = []
    for line_no, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgeGPTError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EdgeGPTError(f'{path}:{line_no} has no string "text" field')
        documents.append(record["text"])
    return documents


def read_corpus(paths: list[Path]) -> list[str]:
    """Documents from files, directories (recursively *.txt, *.md) and *.jsonl files, in a stable order."""
    documents: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise EdgeGPTError(f"data path {path} does not exist")
        if path.is_dir():
            suffixes = TEXT_SUFFIXES + (".jsonl",)
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise EdgeGPTError(f"{path} contains no .txt, .md or .jsonl files")
        else:
            files = [path]
        for file in files:
            if file.suffix.lower() == ".jsonl":
                documents.extend(read_jsonl(file))
            else:
                documents.append(read_text_file(file))
    documents = [d for d in documents if d.strip()]
    if not documents:
        shown = ", ".join(str(p) for p in paths)
        raise EdgeGPTError(f"the corpus is empty: {shown} holds no text")
    return documents


def default_corpus() -> list[str]:
    """The embedded corpus (below), read once per process: parsing the standard library takes seconds, and
    an export reads it for calibration as well as training does."""
    return list(_default_corpus())


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    """Documentation that ships inside Python itself: the `pydoc_data` help topics and the standard
    library's docstrings (read from source with `ast`, never imported, so nothing runs).

    A few megabytes of English prose about programming; needs no network and is the same on every
    machine with the same Python version.
    """
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
    for source in sorted(stdlib.rglob("*.py")):
        relative = source.relative_to(stdlib)
        if skipped & set(relative.parts):
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                # Short docstrings ("Return self.") teach little and skew the corpus toward boilerplate.
                if doc and len(doc) > 80:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    documents.append(f"{name}\n\n{doc}")
    return tuple(documents)


def split_documents(documents: list[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Train = the first (1 - val_fraction) of the characters, validation = the rest, in order.

    A single file splits mid-document, as the tinyshakespeare convention (first 90% / last 10%) needs.
    """
    total = sum(len(d) for d in documents)
    cut = round(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            val.append(doc)
        else:
            train.append(doc[: cut - seen])
            val.append(doc[cut - seen :])
        seen += len(doc)
    train, val = [d for d in train if d], [d for d in val if d]
    if not train or not val:
        raise EdgeGPTError("the corpus is too small to split into training and validation text; add more data")
    return train, val


CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")


def is_example_data(paths: Sequence[Path]) -> bool:
    """Whether `paths` are JSONL examples (messages or prompt/completion records) rather than plain text
    (.txt, .md, or JSONL of {"text": ...}): judged by the first record of each file given, and of each .jsonl
    file in a directory given (the files train/corpus.py would read as text: .txt, .md, .jsonl)."""
    kinds = set()
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        else:
            files = [path] if path.is_file() else []
        for file in files:
            kinds.add("examples" if _first_record_is_an_example(file) else "text")
    if len(kinds) > 1:
        raise EdgeGPTError("the data mixes plain text with JSONL examples (messages or prompt/completion); "
                           "train on one kind at a time")
    return kinds == {"examples"}


def _first_record_is_an_example(file: Path) -> bool:
    try:
        with open(file, encoding="utf-8", errors="replace") as lines:  # the first line, not the whole file
            first = next((line for line in lines if line.strip()), "")
    except OSError:
        return False  # the corpus reader says what is wrong
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and ("messages" in record or "prompt" in record)
