"""The model package directory, as `edgegpt export` writes it (docs/FORMATS.md), loaded and checked.

    model/
      model.onnx               the graph, read by onnxruntime (runtime/session.py)
      config.json              model hyperparameters + the graph's input/output contract
      tokenizer.json           Hugging Face tokenizers, byte-level BPE
      generation_config.json   sampling and stopping defaults, the end-of-text token(s)
      chat_template.jinja      optional: how to render a conversation (Hugging Face's chat_template)
      manifest.json            provenance and the sha256 of every file: verified when present
      draft/                   optional: a smaller model's complete package, for speculative decoding;
                               listed (and its files hashed) in manifest.json's `draft` entry

Every field the runtime relies on is checked here, once, so a damaged or hand-edited package fails at
load with a message naming the file and the field, never later with a shape error inside onnxruntime.
Before anything is parsed, the files are checked against manifest.json's sha256s and model.onnx's
operator domains and external-data locations are checked (runtime/integrity.py): a package may come
from anywhere. Malformed JSON of any shape gives an EdgeGPTError, never another exception.
The config is parsed here rather than with `edgegpt.core.config` so the runtime stays independent of the
training code. Only files inside the package directory are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, MANIFEST, MODEL, TOKENIZER
from edgegpt.runtime.integrity import check_graph, verify_draft, verify_manifest
from edgegpt.runtime.sampling import check_sampling

REQUIRED_FILES = (MODEL, CONFIG, TOKENIZER, GENERATION_CONFIG)

PACKAGE_FORMAT = "edgegpt-package"
# Sizes the runtime allocates buffers from (the KV cache, the logits): far above any model this runtime
# is for (the `base` preset: context 2048, vocabulary 49152), so a larger one is a damaged file that
# would otherwise end in a MemoryError when the cache is allocated.
MAX_CONTEXT = 1 << 20
MAX_VOCAB = 1 << 24
# Cache dtypes the runtime can allocate an empty past for. int8: onnxruntime's quantized cache, which only
# the fused graph (GroupQueryAttention, kv_layout static) reads and writes.
CACHE_DTYPES = ("float32", "float16", "int8")
CACHE_ITEM_BYTES = {"float32": 4, "float16": 2, "int8": 1}
# Inputs besides the cache, by kv_layout (docs/FORMATS.md).
LAYOUT_INPUTS = {
    "concat": ("input_ids", "attention_mask"),
    "static": ("input_ids", "seqlens_k", "total_sequence_length"),
}


@dataclass(frozen=True)
class ModelSpec:
    """The model hyperparameters the runtime needs (a subset of the training `ModelConfig`)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_len: int  # context length: prompt + generated tokens never exceed it
    # config.json's head_dim: set where a family chooses the head width itself (Qwen3); null or absent means
    # dim // n_heads.
    explicit_head_dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads


@dataclass(frozen=True)
class GraphContract:
    """How to feed model.onnx: names of the inputs/outputs and the KV-cache layout.

    `concat` layout (the plain graph): past_key.{i} / past_value.{i} are [batch, n_kv_heads, past_len,
    head_dim], the graph returns present = past ++ new ([batch, n_kv_heads, past_len + seq, head_dim]),
    and attention_mask [batch, past_len + seq] covers both.
    `static` layout (the fused graph): past_key.{i} / past_value.{i} are [batch, n_kv_heads,
    max_length, head_dim] buffers bound as the present too; seqlens_k [batch] (int32, tokens after
    this step − 1) and total_sequence_length (int32 scalar) say which positions are valid.
    `dtype` is the cache's: float32, float16 (a CUDA package), or int8 (static only: the graph quantizes
    what it writes with its own scales, so the runtime only allocates and binds int8 buffers).
    `kv_cache`: config.json's block of that name (the dtype, and for int8 the quantization and its
    calibration); packages from before it existed get {"dtype": dtype}.
    """

    kv_layout: str
    dtype: str
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    kv_cache: Mapping[str, Any] = field(default_factory=dict)

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.past_key.format(layer=layer), self.past_value.format(layer=layer)

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.present_key.format(layer=layer), self.present_value.format(layer=layer)


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: used for every argument a caller leaves as None."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    eos_token_ids: tuple[int, ...]  # generation ends at any of these (an instruct model may have several)
    # Optional in the file (Hugging Face's names); absent means off.
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    bos_token_id: int | None = None  # the beginning-of-text token, when the model has one

    @property
    def eos_token_id(self) -> int:
        """The first end-of-text id: what an empty prompt starts from."""
        return self.eos_token_ids[0]


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    model: ModelSpec
    graph: GraphContract
    generation: GenerationDefaults
    tokenizer: Tokenizer
    chat_template: str | None = None  # chat_template.jinja's text; None: the model has no chat format
    # manifest.json's `draft` entry (docs/FORMATS.md: directory, checkpoint, parameters, max_len, acceptance,
    # acceptance_tokens, files), its files verified at load; None: the package has no draft.
    draft_info: Mapping[str, Any] | None = None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def draft_path(self) -> Path | None:
        """The draft model's package folder (load it with ModelPackage.load or Generator.load), or None when
        the manifest lists no draft."""
        if self.draft_info is None:
            return None
        path = self.path / self.draft_info["directory"]
        return path if path.is_dir() else None

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes one token adds to a sequence's KV cache: a key and a value per layer and KV head
        (an int8 cache: a quarter of float32's; its scales are per layer, not per token)."""
        spec = self.model
        return 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * CACHE_ITEM_BYTES[self.graph.dtype]

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer | None = None) -> "ModelPackage":
        """Validate the directory and parse everything except model.onnx (the session loads that).
        tokenizer: one already parsed from a byte-identical tokenizer.json (a draft shares its target's),
        used instead of parsing it again (a large vocabulary takes a noticeable part of a load to parse)."""
        path = Path(path)
        if not path.is_dir():
            raise EdgeGPTError(f"no model package at {path}; run `edgegpt train` and `edgegpt export` first")
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise EdgeGPTError(
                    f"{path} is not a complete model package: {name} is missing; re-run `edgegpt export`"
                )
        listed = draft = None  # no manifest (a hand-built package): nothing to verify the files against
        if (path / MANIFEST).is_file():
            manifest = _read_object(path / MANIFEST)
            listed = verify_manifest(path, manifest, REQUIRED_FILES)
            draft = verify_draft(path, manifest, REQUIRED_FILES)
        check_graph(path / MODEL, listed)
        model, graph = parse_config(_read_object(path / CONFIG), str(path / CONFIG))
        tokenizer = tokenizer or _load_tokenizer(path / TOKENIZER)
        generation = parse_generation(_read_object(path / GENERATION_CONFIG), str(path / GENERATION_CONFIG))
        if tokenizer.get_vocab_size() > model.vocab_size:
            raise EdgeGPTError(
                f"{path}: tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model only "
                f"{model.vocab_size}; the package mixes files from different exports"
            )
        special = [("eos_token_id", i) for i in generation.eos_token_ids]
        special += [] if generation.bos_token_id is None else [("bos_token_id", generation.bos_token_id)]
        for key, token in special:
            if token >= tokenizer.get_vocab_size():
                raise EdgeGPTError(f"{path / GENERATION_CONFIG}: {key} {token} is not a token of tokenizer.json")
        chat_template = _read_chat_template(path, listed)
        return cls(path=path, model=model, graph=graph, generation=generation, tokenizer=tokenizer,
                   chat_template=chat_template, draft_info=draft)


def parse_config(config: Any, source: str) -> tuple[ModelSpec, GraphContract]:
    """config.json's parsed content -> (model, graph contract); any other shape raises EdgeGPTError."""
    if not isinstance(config, dict):
        raise EdgeGPTError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != PACKAGE_FORMAT:
        raise EdgeGPTError(f"{source}: format must be {PACKAGE_FORMAT!r}, got {config.get('format')!r:.80}")
    model = _parse_model(_field(config, "model", dict, source), source)
    graph = _parse_graph(_field(config, "graph", dict, source), model, source)
    return model, graph


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise EdgeGPTError(f"{path} is not valid JSON ({detail}); re-run `edgegpt export`") from None
    except RecursionError:
        raise EdgeGPTError(f"{path} is not valid JSON (nested too deeply); re-run `edgegpt export`") from None
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    """data[key], checked to be of `kind` (a bool is not accepted as a number)."""
    if key not in data:
        raise EdgeGPTError(f"{source}: missing key {key!r}")
    value = data[key]
    numeric = kind in (int, float) or (isinstance(kind, tuple) and int in kind)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        expected = {dict: "an object", str: "a string", int: "an integer", (int, float): "a number"}.get(kind, kind)
        raise EdgeGPTError(f"{source}: {key} must be {expected}, got {value!r:.80}")
    return value


def _number(data: Mapping[str, Any], key: str, source: str) -> float:
    value = _field(data, key, (int, float), source)
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        raise EdgeGPTError(f"{source}: {key} is out of range, got {value!r:.80}") from None


def _positive_int(data: Mapping[str, Any], key: str, source: str) -> int:
    value = _field(data, key, int, source)
    if value <= 0:
        raise EdgeGPTError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _parse_model(data: Mapping[str, Any], source: str) -> ModelSpec:
    source = f"{source} (model)"
    names = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_len")
    explicit_head_dim = None if data.get("head_dim") is None else _positive_int(data, "head_dim", source)
    spec = ModelSpec(**{name: _positive_int(data, name, source) for name in names},
                     explicit_head_dim=explicit_head_dim)
    for name, limit in (("max_len", MAX_CONTEXT), ("vocab_size", MAX_VOCAB)):
        if getattr(spec, name) > limit:
            raise EdgeGPTError(f"{source}: {name} {getattr(spec, name)} is beyond this runtime's limit of {limit}")
    if (explicit_head_dim is None and spec.dim % spec.n_heads) or spec.n_heads % spec.n_kv_heads:
        raise EdgeGPTError(
            f"{source}: dim {spec.dim}, n_heads {spec.n_heads} and n_kv_heads {spec.n_kv_heads} are inconsistent"
        )
    return spec


def _parse_graph(data: Mapping[str, Any], model: ModelSpec, source: str) -> GraphContract:
    source = f"{source} (graph)"
    kv_layout = _field(data, "kv_layout", str, source)
    if kv_layout not in LAYOUT_INPUTS:
        raise EdgeGPTError(
            f"{source}: kv_layout {kv_layout!r} is not supported by this runtime "
            f"(it reads {' and '.join(map(repr, LAYOUT_INPUTS))}); upgrade edgegpt"
        )
    dtype = _field(data, "dtype", str, source)
    if dtype not in CACHE_DTYPES:
        raise EdgeGPTError(f"{source}: dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    if dtype == "int8" and kv_layout != "static":
        raise EdgeGPTError(f"{source}: an int8 cache needs kv_layout 'static' (the fused graph), got {kv_layout!r}")
    kv_cache = _field(data, "kv_cache", dict, source) if "kv_cache" in data else {"dtype": dtype}
    if kv_cache.get("dtype") != dtype:
        raise EdgeGPTError(f"{source}: kv_cache.dtype {kv_cache.get('dtype')!r:.40} contradicts dtype {dtype!r}")
    templates = {}
    for key in ("past_key", "past_value", "present_key", "present_value"):
        templates[key] = _field(data, key, str, source)
        # Exactly one kind of placeholder: any other brace would make str.format fail, or (a width like
        # "{layer:>999999999}") allocate without bound.
        if "{layer}" not in templates[key] or set("{}") & set(templates[key].replace("{layer}", "")):
            raise EdgeGPTError(
                f"{source}: {key} must contain '{{layer}}' and no other braces, got {templates[key]!r:.80}"
            )
    graph = GraphContract(
        kv_layout=kv_layout,
        dtype=dtype,
        inputs=_field(data, "inputs", dict, source),
        outputs=_field(data, "outputs", dict, source),
        kv_cache=kv_cache,
        **templates,
    )
    for kind, declared in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        # Checked before the loop below, whose length a damaged n_layers would otherwise set.
        if len(declared) < 2 * model.n_layers:
            raise EdgeGPTError(
                f"{source}: {kind} declares {len(declared)} names, fewer than the cache of "
                f"{model.n_layers} layers needs"
            )
    needed_inputs = list(LAYOUT_INPUTS[kv_layout])
    needed_outputs = ["logits"]
    for layer in range(model.n_layers):
        needed_inputs += graph.past_names(layer)
        needed_outputs += graph.present_names(layer)
    for kind, needed, declared in (("input", needed_inputs, graph.inputs), ("output", needed_outputs, graph.outputs)):
        missing = [name for name in needed if name not in declared]
        if missing:
            raise EdgeGPTError(f"{source}: {kind} {missing[0]!r} is not declared ({model.n_layers} layers expected)")
    # A fixed dimension in the declared cache shape must agree with the model hyperparameters, or the
    # empty past we build for prefill would be rejected by onnxruntime with a cryptic message.
    declared = graph.inputs[graph.past_names(0)[0]]
    declared_dtype = declared.get("dtype") if isinstance(declared, dict) else None
    if declared_dtype is not None and declared_dtype != dtype:
        raise EdgeGPTError(f"{source}: {graph.past_names(0)[0]} is declared {declared_dtype!r:.40} but the cache "
                           f"dtype is {dtype!r}")
    shape = declared.get("shape") if isinstance(declared, dict) else None
    if isinstance(shape, list) and len(shape) == 4:
        for axis, expected in ((1, model.n_kv_heads), (3, model.head_dim)):
            if isinstance(shape[axis], int) and shape[axis] != expected:
                raise EdgeGPTError(
                    f"{source}: {graph.past_names(0)[0]} has shape {shape} but the model implies "
                    f"[batch, {model.n_kv_heads}, length, {model.head_dim}]"
                )
    return graph


def parse_generation(data: Any, source: str) -> GenerationDefaults:
    """generation_config.json's parsed content -> the defaults; any other shape raises EdgeGPTError."""
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{source}: expected a JSON object, got {type(data).__name__}")
    max_new_tokens = _field(data, "max_new_tokens", int, source)
    temperature = _number(data, "temperature", source)
    top_k = _field(data, "top_k", int, source)
    top_p = _number(data, "top_p", source)
    eos_token_ids = _token_ids(data, "eos_token_id", source)
    bos_token_id = None if data.get("bos_token_id") is None else _field(data, "bos_token_id", int, source)
    if bos_token_id is not None and bos_token_id < 0:
        raise EdgeGPTError(f"{source}: bos_token_id must be >= 0, got {bos_token_id}")
    min_p = _number(data, "min_p", source) if "min_p" in data else 0.0
    penalty = _number(data, "repetition_penalty", source) if "repetition_penalty" in data else 1.0
    if max_new_tokens < 0:
        raise EdgeGPTError(f"{source}: max_new_tokens must be >= 0, got {max_new_tokens}")
    try:
        check_sampling(temperature, top_k, top_p, min_p, penalty)
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{source}: {e}") from None
    return GenerationDefaults(max_new_tokens, temperature, top_k, top_p, eos_token_ids, min_p, penalty, bos_token_id)


def _token_ids(data: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    """A token id or a non-empty list of them (Hugging Face writes either), each >= 0."""
    if key not in data:
        raise EdgeGPTError(f"{source}: missing key {key!r}")
    value = data[key]
    ids = value if isinstance(value, list) else [value]
    if not ids or len(ids) > 64 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise EdgeGPTError(
            f"{source}: {key} must be an integer >= 0 (a token id) or a non-empty list of them, got {value!r:.80}"
        )
    return tuple(ids)


# A template is a few kilobytes; a larger file is not one.
MAX_CHAT_TEMPLATE_BYTES = 1 << 20


def _read_chat_template(path: Path, listed: frozenset[str] | None) -> str | None:
    """chat_template.jinja's text, or None when the package has none. With a manifest it must be listed
    (and so verified): an unlisted template would be code nobody checked."""
    file = path / CHAT_TEMPLATE
    if not file.is_file():
        return None
    if listed is not None and CHAT_TEMPLATE not in listed:
        raise EdgeGPTError(f"{file} is not listed in manifest.json, so it cannot be verified; re-run `edgegpt export`")
    if file.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
        raise EdgeGPTError(f"{file} is over {MAX_CHAT_TEMPLATE_BYTES:,} bytes; it is not a chat template")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeGPTError(f"{file} is not UTF-8 text; re-run `edgegpt export`") from None


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for anything malformed
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise EdgeGPTError(f"{path} is not a valid tokenizer.json ({first_line}); re-run `edgegpt export`") from None
