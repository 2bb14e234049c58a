"""Atomic file writes and checked reads.

Every file edgegpt writes goes through a temporary file in the same directory and a rename, so a crash
or a full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgegpt.core.errors import EdgeGPTError

# The process's umask, read once at import (reading it means setting it, which is not thread-safe later):
# mkstemp and mkdtemp create 0600 files and 0700 folders, but what edgegpt writes is the user's ordinary
# output (a checkpoint, a package to ship), so it gets the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIRECTORY_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on failure delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, FILE_MODE)
    except OSError as e:
        raise EdgeGPTError(f"could not write {path} ({e.strerror or e})") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:  # a full disk, a read-only folder, a quota: the user's to fix, not a bug
        raise EdgeGPTError(
            f"could not write {path} ({e.strerror or e}); the previous version, if any, is intact"
        ) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeGPTError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeGPTError(f"{path} is not valid JSON ({e}); the file is corrupt") from None


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Build a whole directory beside `final`, then swap it in, so readers never see half of it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(staging, DIRECTORY_MODE)
    try:
        yield staging
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streamed in 1 MiB reads into one reused buffer: a package's weights are never held whole."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
