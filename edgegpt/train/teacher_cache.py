"""A package teacher's top k, kept on disk per window of the fixed grid (edgegpt.train.data.sample_grid), so that
later epochs and later runs over the same tokens skip the teacher's forward pass.

    <root>/<key>/                     root: --teacher-cache, else --cache-dir/teacher-top-k
        log_probs.bin   float16 [windows, block, k]         log_softmax at temperature 1 of the teacher's k most
                                                            likely next tokens, most likely first
        ids.bin         uint16 or int32 [windows, block, k]  their token ids (uint16 when the vocabulary fits)
        filled.bin      uint8 [windows]                      1 once the window's values are on disk
        meta.json       what the folder holds; written last, so a folder without it is built again

key: a sha256 of what the values depend on: the teacher (its manifest, which holds the sha256 of every file of
the package, and the onnxruntime version and provider that run it), the token data's key, the block size and
k. Whatever changes what the teacher would say makes another folder.

Crash safety: values are flushed to the disk before their windows are flagged, so a flag never stands without
its values, even after a power cut; windows computed since the last commit are computed again. A window is
checked when read (see _plausible) and computed again when it fails; a folder whose files have the wrong size
(truncated) or whose meta.json does not match is built again from nothing.

The files are memory-mapped and sparse: a window takes disk space once it is filled, and the whole cache's size
is checked against the free space when the folder is made (a write to a memory-mapped file on a full disk would
kill the process, not raise).

Several processes (torchrun's ranks) share one folder; rank 0 makes it before the others open it
(edgegpt.train.loop). Each fills the windows of its own rows; two that compute the same window write the same
values (one teacher, one package, one runtime), so either write is the window's. Ranks on other machines need
the folder on a local disk of each machine: memory-mapped writes are not shared through a network file system.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST
from edgegpt.core.io import atomic_path, read_json, sha256_file, write_json_atomic

CACHE_FORMAT = 1
LOG_PROBS, IDS, FILLED, META = "log_probs.bin", "ids.bin", "filled.bin", "meta.json"


@dataclass(frozen=True)
class CacheShape:
    windows: int
    block_size: int
    k: int
    vocab_size: int

    @property
    def ids_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)

    def file_sizes(self) -> dict[str, int]:
        values = self.windows * self.block_size * self.k
        return {LOG_PROBS: values * 2, IDS: values * self.ids_dtype.itemsize, FILLED: self.windows}


class TopKCache:
    """One folder of the cache, memory-mapped: get and put windows, commit to flag them."""

    def __init__(self, folder: Path, shape: CacheShape) -> None:
        self.folder, self.shape = folder, shape
        rows = (shape.windows, shape.block_size, shape.k)
        self.log_probs = np.memmap(folder / LOG_PROBS, np.float16, "r+", shape=rows)
        self.ids = np.memmap(folder / IDS, shape.ids_dtype, "r+", shape=rows)
        self.filled = np.memmap(folder / FILLED, np.uint8, "r+", shape=(shape.windows,))
        self._unflagged: list[int] = []

    @classmethod
    def open(cls, root: Path, identity: dict[str, Any], shape: CacheShape,
             log: Callable[[str], None] = lambda message: None) -> TopKCache:
        """The folder for `identity` (what the values depend on besides the shape) under `root`, made or made
        again when it is missing or damaged."""
        meta = {"format": CACHE_FORMAT, **identity, "windows": shape.windows, "block_size": shape.block_size,
                "k": shape.k, "vocab_size": shape.vocab_size, "ids_dtype": shape.ids_dtype.name}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(root) / key
        if not _intact(folder, meta, shape):
            if folder.exists():
                log(f"the teacher's top-k cache {folder} is incomplete or damaged: starting it again")
            _create(folder, meta, shape)
        cache = cls(folder, shape)
        log(f"teacher top-k cache {folder}: {cache.filled_count():,} of {shape.windows:,} windows filled "
            f"({_size(sum(shape.file_sizes().values()))} when full)")
        return cache

    def get(self, window: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The window's float16 log-probabilities and ids [block, k], or None when it is not filled (or its
        values fail the check: computed again, then)."""
        if not self.filled[window]:
            return None
        log_probs, ids = np.array(self.log_probs[window]), np.array(self.ids[window])
        return (log_probs, ids) if _plausible(log_probs, ids, self.shape.vocab_size) else None

    def put(self, window: int, log_probs: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write a window's values [block, k] (flagged at the next commit); returns them as stored."""
        self.log_probs[window] = log_probs
        self.ids[window] = ids
        self._unflagged.append(window)
        return np.array(self.log_probs[window]), np.array(self.ids[window])

    def commit(self) -> None:
        """Flag the windows put since the last commit, once their values have reached the disk."""
        if not self._unflagged:
            return
        self.log_probs.flush()
        self.ids.flush()
        self.filled[self._unflagged] = 1
        self.filled.flush()
        self._unflagged.clear()

    def filled_count(self) -> int:
        return int(np.count_nonzero(self.filled))


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def _intact(folder: Path, meta: dict[str, Any], shape: CacheShape) -> bool:
    if not (folder / META).is_file():
        return False
    try:
        if read_json(folder / META) != meta:
            return False
    except EdgeGPTError:  # not JSON: damaged
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in shape.file_sizes().items())


def _create(folder: Path, meta: dict[str, Any], shape: CacheShape) -> None:
    sizes = shape.file_sizes()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # first: a folder interrupted while being made is made again
    needed = sum(sizes.values())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise EdgeGPTError(
            f"the teacher's top-k cache needs {_size(needed)} in {folder} but only {_size(free)} is free; lower "
            "--teacher-top-k, or give --teacher-cache on a bigger disk"
        )
    for name, size in sizes.items():
        with atomic_path(folder / name) as tmp:
            with open(tmp, "r+b") as f:
                f.truncate(size)  # sparse: zeros that take no space until written
    write_json_atomic(folder / META, meta)


def _plausible(log_probs: np.ndarray, ids: np.ndarray, vocab_size: int) -> bool:
    """What any teacher's top k satisfies: ids inside the vocabulary; log-probabilities finite, most likely first,
    and probabilities that add up to at most 1 (float16 rounding aside). A zeroed or overwritten window fails."""
    values = log_probs.astype(np.float32)
    return bool(np.isfinite(values).all() and (np.diff(values, axis=-1) <= 0).all()
                and (np.exp(values).sum(axis=-1) <= 1.01).all() and (ids >= 0).all() and (ids < vocab_size).all())


def package_identity(package: Path) -> str:
    """What names a package's graph and weights: the sha256 of its manifest.json, which holds the sha256 of every
    file (the runtime checks them when it loads the package); without a manifest, of the files themselves."""
    package = Path(package)
    if (package / MANIFEST).is_file():
        return sha256_file(package / MANIFEST)
    digest = hashlib.sha256()
    for path in sorted(p for p in package.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()
