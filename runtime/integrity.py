"""Checks that make a model package safe to load when it comes from somewhere else.

    manifest.json ─► sha256 of every file it lists, streamed ─► equal?      (damage, truncation, edits)
                  ─► and of every file of the draft/ folder its `draft` entry lists (export/draft.py)
    model.onnx    ─► opset imports and node domains           ─► known?      (custom-op libraries)
                  ─► external-data locations of every tensor  ─► inside the package, listed?  (path escape)

The manifest is an integrity check, not a signature: whoever can edit a file can also rewrite its hash.
It catches a damaged, truncated or partly copied package, and a file changed after export. What keeps a
hostile package from reaching outside itself are the graph checks below, which run on every package,
with or without a manifest (hand-built packages, such as the tests' and the exporter's staging
directory before its manifest is written, have none).

Why a hand-written protobuf walk: the runtime may not import `onnx` (a desktop app ships numpy,
onnxruntime and tokenizers only), and onnxruntime exposes neither the opset imports nor the tensors'
external-data locations. The walk reads only the few fields it needs (about 60 lines of wire format)
and skips every other field, the weights included, by its length, so it costs a pass over the field
headers, not over the bytes. Field numbers are those of onnx.proto.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Mapping

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import MANIFEST
from edgegpt.core.io import sha256_file  # stdlib only: the runtime stays light

# The domains edgegpt's exporter emits: the ONNX default domain ("" or its long name) for standard ops,
# com.microsoft for GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits,
# GatherBlockQuantized, DynamicQuantizeMatMul (export/fused.py, export/quantize.py). Any other domain
# would need a custom-op library this runtime never registers.
ALLOWED_DOMAINS = ("", "ai.onnx", "com.microsoft")
SHA256 = re.compile(r"[0-9a-f]{64}")


def verify_manifest(directory: Path, manifest: Any, required: tuple[str, ...]) -> frozenset[str]:
    """Check every file manifest.json lists against its sha256; return the names it lists.

    `manifest` is manifest.json's parsed content; `required` are files that must be among those listed.
    """
    source = directory / MANIFEST
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return verify_files(directory, files, required, f"{source}", f"{source}: 'files'")


def verify_files(directory: Path, files: Any, required: tuple[str, ...], source: str, key: str) -> frozenset[str]:
    """Check each file of `directory` named in `files` ({plain file name: sha256}) against its digest; `source`
    names the manifest in messages, `key` the field of it `files` came from."""
    if not isinstance(files, dict):
        raise EdgeGPTError(f"{key} must map file names to sha256 digests; re-run `edgegpt export`")
    for name, digest in files.items():
        if not is_plain_name(name):
            # Hashing "../x" would read outside the package; edgegpt lists plain file names only.
            raise EdgeGPTError(f"{source} lists {name!r:.80}, which is not a file name inside the package")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise EdgeGPTError(f"{source}: the sha256 of {name} must be 64 lowercase hex digits, got {digest!r:.80}")
    for name in required:
        if name not in files:
            raise EdgeGPTError(f"{source} does not list {name}, so it cannot be verified; re-run `edgegpt export`")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise EdgeGPTError(
                f"{directory} is not a complete model package: {name} is missing; re-run `edgegpt export`"
            )
        if sha256_file(path) != digest:
            raise EdgeGPTError(
                f"{path} is corrupt: its sha256 differs from the one in manifest.json (damaged, truncated or "
                "modified after export); re-run `edgegpt export` or copy the package again"
            )
    return frozenset(files)


def verify_draft(directory: Path, manifest: Any, required: tuple[str, ...]) -> dict[str, Any] | None:
    """manifest.json's `draft` entry (export/draft.py), checked, with every file of the draft's folder it
    lists verified against its sha256 (`required` and the draft's own manifest.json among them); None when
    the package has no draft. The draft is not loaded: only its files are read, to hash them."""
    source = directory / MANIFEST
    entry = manifest.get("draft") if isinstance(manifest, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise EdgeGPTError(f"{source}: 'draft' must be an object, got {type(entry).__name__}; re-run `edgegpt export`")
    folder = entry.get("directory")
    if not is_plain_name(folder):
        raise EdgeGPTError(f"{source}: the draft's directory must be a folder name inside the package, "
                           f"got {folder!r:.80}")
    for key, least in (("parameters", 1), ("max_len", 1), ("acceptance_tokens", 0)):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise EdgeGPTError(f"{source}: the draft's {key} must be an integer of at least {least}, "
                               f"got {value!r:.80}")
    acceptance = entry.get("acceptance")
    if acceptance is not None and (isinstance(acceptance, bool) or not isinstance(acceptance, (int, float))
                                   or not 0 <= acceptance <= 1):
        raise EdgeGPTError(f"{source}: the draft's acceptance must be a fraction from 0 to 1 or null, "
                           f"got {acceptance!r:.80}")
    path = directory / folder
    if not path.is_dir():
        raise EdgeGPTError(f"{source} lists a draft model in {folder}/, which is missing ({path}); copy the whole "
                           "package again or re-run `edgegpt export --draft`")
    verify_files(path, entry.get("files"), (*required, MANIFEST), f"{source} (draft)", f"{source}: the draft's 'files'")
    return entry


def is_plain_name(name: Any) -> bool:
    """A single file name: no directory part, not absolute, not '.' or '..' (on POSIX and Windows)."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        and ":" not in name and "\0" not in name
    )


def check_graph(model_path: Path, listed: frozenset[str] | None) -> None:
    """Refuse a model.onnx that uses an operator domain edgegpt never emits, or whose external data lies
    outside the package (an absolute path, `..`) or, when there is a manifest (`listed`: the names it
    lists), in a file the manifest does not list and so did not verify."""
    domains, locations = scan_model(model_path)
    for domain in sorted(domains):
        if domain not in ALLOWED_DOMAINS:
            raise EdgeGPTError(
                f"{model_path} uses operators of the domain {domain!r:.80}, which edgegpt does not emit "
                f"(allowed: the ONNX default domain and com.microsoft); refusing to load it"
            )
    for location in sorted(locations):
        if not is_inside(location):
            raise EdgeGPTError(
                f"{model_path} reads external data from {location!r:.120}, outside the package directory; "
                "refusing to load it"
            )
        if listed is not None and location not in listed:
            raise EdgeGPTError(
                f"{model_path} reads external data from {location!r:.120}, a file manifest.json does not "
                "list (so it was not verified); refusing to load it"
            )


def is_inside(location: str) -> bool:
    """Whether an external-data location (relative to model.onnx's directory) stays inside it."""
    if not location or "\0" in location:
        return False
    windows = PureWindowsPath(location)
    if PurePosixPath(location).is_absolute() or windows.drive or windows.root:
        return False
    return ".." not in re.split(r"[\\/]", location)


# -- a minimal protobuf reader ---------------------------------------------------------------------

# message -> {field number: (message it holds, or a tag for the value we keep)}
MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, ENTRY, OPSET, FUNCTION, TRAINING = range(10)
DOMAIN, KEY, VALUE = "domain", "key", "value"
SCHEMA: Mapping[int, Mapping[int, Any]] = {
    MODEL: {7: GRAPH, 8: OPSET, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE, 9: OPSET},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE, 7: DOMAIN},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},  # external_data: StringStringEntryProto
    ENTRY: {1: KEY, 2: VALUE},
    OPSET: {1: DOMAIN},
}
MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a deeper file is not one edgegpt wrote


class Malformed(Exception):
    pass


def scan_model(model_path: Path) -> tuple[set[str], set[str]]:
    """(operator domains, external-data locations) used anywhere in the ONNX file, subgraphs included."""
    domains: set[str] = set()
    locations: set[str] = set()
    try:
        with open(model_path, "rb") as f:
            if f.seek(0, 2) == 0:
                return domains, locations  # empty: onnxruntime refuses it with its own message
            # Mapped, not read: the weights are skipped, never copied. Indexing an mmap gives ints and
            # slicing it gives bytes, so no view outlives the `with`.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                walk(data, 0, len(data), MODEL, domains, locations, 0)
    except (Malformed, RecursionError):
        raise EdgeGPTError(f"{model_path} is corrupt (not a readable ONNX model); re-run `edgegpt export`") from None
    return domains, locations


def walk(data, start: int, end: int, message: int, domains: set, locations: set, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Malformed
    schema = SCHEMA[message]
    strings: dict[str, str] = {}
    for field, begin, stop in fields(data, start, end):
        kind = schema.get(field)
        if kind is None or begin is None:
            continue
        if kind in (DOMAIN, KEY, VALUE):
            # onnx.proto is proto2, whose strings need not be UTF-8; keep odd bytes visible, never fail.
            strings[kind] = data[begin:stop].decode("utf-8", "surrogateescape")
        else:
            walk(data, begin, stop, kind, domains, locations, depth + 1)
    if message in (NODE, OPSET):
        domains.add(strings.get(DOMAIN, ""))  # no domain field: the default domain
    elif message == ENTRY and strings.get(KEY) == "location":
        locations.add(strings.get(VALUE, ""))


def fields(data, pos: int, end: int) -> Iterator[tuple[int, int | None, int | None]]:
    """(field number, start, end) of each field; start/end are None for a field that is not length-delimited."""
    while pos < end:
        key, pos = varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = varint(data, pos, end)
            yield field, None, None
            continue
        if wire == 2:
            length, pos = varint(data, pos, end)
            size = length
        elif wire == 1:
            size = 8
        elif wire == 5:
            size = 4
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise Malformed
        if field == 0 or pos + size > end:
            raise Malformed
        yield (field, pos, pos + size) if wire == 2 else (field, None, None)
        pos += size


def varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
