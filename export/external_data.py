"""ONNX external data: how export writes a graph too large for one protobuf, and keeps its memory bounded.

protobuf refuses to serialize a message over 2 GiB, so a graph whose weights pass a threshold keeps them
in one file beside it, `model.onnx.data`, which model.onnx references by relative location, offset and
length (ONNX's external data). onnxruntime resolves the location against the model's path, so the runtime
creates its sessions from the path (runtime/session.py), and the package stays relocatable; the manifest
lists and hashes the data file like every other file (docs/FORMATS.md).

    weights ≤ threshold   model.onnx                      (one file, as every small package)
    weights > threshold   model.onnx + model.onnx.data    (tensors of TENSOR_SIZE_THRESHOLD bytes or more)

The float graph a quantized export starts from is an intermediate nothing ships: it always keeps its
weights outside (threshold 0), so quantization reads one weight at a time from the data file
(read_tensor) instead of holding the whole float graph, and a copy of it, in memory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

# Below protobuf's 2 GiB with room for the graph itself; also where one file stops being practical to
# hash and map in one piece. Packages under it are exactly what they were before external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Tensors smaller than this stay inside model.onnx even when the rest goes out (norm weights, scales):
# many tiny reads cost more than the bytes they save.
TENSOR_SIZE_THRESHOLD = 1024

_threshold: ContextVar[int] = ContextVar("external_data_threshold", default=EXTERNAL_DATA_THRESHOLD)


@contextmanager
def external_data_threshold(limit: int | None) -> Iterator[None]:
    """Graphs saved inside the block keep their weights outside model.onnx above `limit` bytes (None: keep
    the current threshold). export_package's `external_data_threshold` sets it; tests lower it so a tiny
    model takes the large-model path."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"external_data_threshold must be a number of bytes >= 0, got {limit!r}")
    token = _threshold.set(_threshold.get() if limit is None else limit)
    try:
        yield
    finally:
        _threshold.reset(token)


def current_threshold() -> int:
    return _threshold.get()


def data_path(model_path: Path) -> Path:
    """The external data file of the graph at `model_path`: `model.onnx.data` (formats.MODEL_DATA) beside
    `model.onnx`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def initializer_bytes(proto: onnx.ModelProto) -> int:
    """The serialized size of the graph's initializers (ByteSize: reading raw_data would copy it)."""
    return sum(t.ByteSize() for t in proto.graph.initializer)


def save_model(proto: onnx.ModelProto, path: Path, threshold: int | None = None) -> None:
    """Write `proto` (every tensor's data in memory) at `path`: one file, or with its weights in
    data_path(path) when they pass `threshold` bytes (default: current_threshold()). Saving with external
    data moves the tensors' bytes out of `proto`; use it no more afterwards."""
    path = Path(path)
    limit = current_threshold() if threshold is None else threshold
    data = data_path(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    path.parent.mkdir(parents=True, exist_ok=True)
    if initializer_bytes(proto) <= limit:
        onnx.save_model(proto, str(path), save_as_external_data=False)
        return
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=TENSOR_SIZE_THRESHOLD, convert_attribute=False)


def move_initializers(tensors: list[onnx.TensorProto], graph: onnx.GraphProto) -> None:
    """Append `tensors` to `graph` one at a time, emptying the list: protobuf copies what it appends, so
    moving them one by one keeps the weights in memory once, not twice (helper.make_graph copies them all
    while the list still holds them, and helper.make_model copies the graph again)."""
    tensors.reverse()
    while tensors:
        graph.initializer.append(tensors.pop())


class WeightSpool:
    """Initializers written to the graph's data file as they are made (export/fused.py), so the weights
    never sit in memory as protobuf: an array that views a PyTorch parameter goes to disk without a copy.
    save() then keeps the file (weights above the threshold) or reads the weights back into one file."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = Path(model_path)
        self.path = data_path(self.model_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by save(), or with the staging directory)
        self.inline_bytes = 0

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A TensorProto of `array` (C-contiguous) whose bytes are in the data file, or inline if tiny."""
        if array.nbytes < TENSOR_SIZE_THRESHOLD:
            self.inline_bytes += array.nbytes
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape)
        offset = self.file.tell()
        array.tofile(self.file)  # the array's own buffer, not a bytes copy of it
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        return tensor

    def save(self, proto: onnx.ModelProto, threshold: int | None = None) -> None:
        """Write `proto` (whose initializers came from tensor()) at the spool's model path."""
        self.file.close()
        limit = current_threshold() if threshold is None else threshold
        if self.path.stat().st_size + self.inline_bytes <= limit:  # small: one file, as before external data
            onnx.external_data_helper.load_external_data_for_model(proto, str(self.path.parent))
            self.path.unlink()
        onnx.save_model(proto, str(self.model_path), save_as_external_data=False)


def read_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The tensor's values, read from its external data file under `base_dir` if it has one; the tensor
    itself is left as it is (the graph keeps pointing at the file rather than holding the bytes)."""
    if uses_external_data(tensor):
        if base_dir is None:
            raise RuntimeError(f"tensor {tensor.name} is external data but no directory was given to read it from")
        return numpy_helper.to_array(tensor, str(base_dir))
    return numpy_helper.to_array(tensor)


def load_remaining(proto: onnx.ModelProto, base_dir: Path | None) -> None:
    """Bring every tensor of `proto` still stored outside (under `base_dir`) into memory, so the graph can
    be saved somewhere else; after quantization these are the few float tensors left (norms, rotary tables)."""
    if base_dir is not None:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base_dir))


def external_locations(proto: onnx.ModelProto) -> set[str]:
    """The external-data file names the graph's initializers point at."""
    locations = set()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return locations


def graph_bytes(model_path: Path) -> int:
    """Bytes of the graph on disk: model.onnx and its data file, if it has one."""
    data = data_path(model_path)
    return Path(model_path).stat().st_size + (data.stat().st_size if data.is_file() else 0)


def replace_data_file(source_model: Path, target_model: Path) -> None:
    """Move source_model's data file to be target_model's (or remove target_model's when the source has none)."""
    source, target = data_path(source_model), data_path(target_model)
    if source.is_file():
        os.replace(source, target)
    else:
        target.unlink(missing_ok=True)
