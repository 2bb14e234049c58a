"""GGUF (llama.cpp's file format) → checkpoint, for the architectures `llama` (Llama, SmolLM, Mistral),
`qwen2` (Qwen2, Qwen2.5), `qwen3`, `gemma3` (Gemma 3 text models) and `gemma2`.

    FILE.gguf ─► metadata: {arch}.* hyperparameters ─► ModelConfig (checked against the tensors' shapes)
             │            tokenizer.* ─────────────► tokenizer.json, generation_config.json,
             │                                       chat_template.jinja (gguf_tokenizer.py)
             ├► rope_freqs.weight (Llama 3.x) ──────► ModelConfig.rope_scaling
             └► tensors: dequantized to float32 (gguf.quants.dequantize), renamed ─► model.safetensors;
                         a llama file's Q/K rows put back in Hugging Face's order

Each architecture's metadata means what llama.cpp makes of it (src/models/<arch>.cpp), which is also what
transformers' GGUF loader makes of it where both read a key:
- llama: llama.cpp's converter interleaves each Q/K head's rotary halves (unpermute_from_gguf undoes it);
  the others' rotary already pairs the halves, so their rows are Hugging Face's as they are.
- qwen2: Q/K/V biases (attn_{q,k,v}.bias); qwen3: per-head q/k RMSNorm (attn_{q,k}_norm) and a head width of
  its own (attention.key_length). Neither slides its attention, whatever sliding_window a file holds.
- gemma3 / gemma2: the norms are stored as 1 + w, llama.cpp's converter having added the one that Gemma's
  RMSNorm adds; edgegpt stores the same sum, so they are read as they are. What the metadata leaves out is
  llama.cpp's fixed choice for the architecture (_gemma_fields): which layers slide, the sliding layers'
  rotary base, the attention scale, the soft-capping.

Quantized weights come out as the float32 values they stand for: the checkpoint is exactly the model
llama.cpp runs, and `edgegpt export --quantize` quantizes it again in its own formats.

The `gguf` package (the [convert] extra) reads the file. Everything is checked before anything is
written: the architecture, every tensor's type, name and shape, the hyperparameters (a file whose metadata
contradicts its tensors is refused, not guessed at) and the tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgegpt.checkpoint import expected_shapes, save_checkpoint
from edgegpt.convert.gguf_tokenizer import chat_template_from_gguf, generation_from_gguf, tokenizer_from_gguf
from edgegpt.convert.weights import TensorProgress
from edgegpt.core.config import ModelConfig, RopeScaling
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.io import staged_directory
from edgegpt.model import GPT, llama3_inverse_frequencies

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
# GGUF architecture → the models it holds (for messages).
ARCHITECTURES = {"llama": "Llama, SmolLM, Mistral", "qwen2": "Qwen2, Qwen2.5", "qwen3": "Qwen3",
                 "gemma3": "Gemma 3 text models", "gemma2": "Gemma 2"}
GEMMA_ARCHITECTURES = ("gemma3", "gemma2")
ARCHITECTURES_TEXT = ", ".join(f"{arch!r} ({models})" for arch, models in ARCHITECTURES.items())
# llama.cpp's fixed Gemma choices, where a file's metadata says nothing (src/models/gemma{2,3}.cpp):
# every n-th layer attends to the whole context, the others slide (Gemma 3: 6, Gemma 2: 2);
GEMMA_FULL_EVERY = {"gemma3": 6, "gemma2": 2}
# Gemma 3's sliding layers turn with a rotary base of their own; Gemma 2's with the global one;
GEMMA3_LOCAL_ROPE_BASE = 10000.0
# Gemma 2 soft-caps attention scores and logits at these unless the file says otherwise;
GEMMA2_SOFTCAPS = (50.0, 30.0)
# and the 27B models (known to llama.cpp by their layer count) scale queries by (dim / heads)^-1/2, every
# other size by head_dim^-1/2.
GEMMA_27B_LAYERS = {"gemma3": 62, "gemma2": 46}
# The tensor types read: float, and every quantization llama.cpp's `llama-quantize` writes for the common
# file types (Q2_K … Q8_0, IQ4_NL, IQ4_XS) that gguf.quants can dequantize; each is tested against it. The
# other IQ* and TQ* types are left out: they come from importance-matrix or ternary runs, never checked here.
# Llama 3.x's rotary scaling bands (low_freq_factor, high_freq_factor, original context length): the values
# Meta's models use and llama.cpp's converter assumes when a config does not say.
LLAMA3_BANDS = (1.0, 4.0, 8192)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K", "IQ4_NL", "IQ4_XS")
INSTALL = "pip install 'edgegpt[convert]'"

# GGUF tensor name → edgegpt parameter name; {i} is a layer index.
_TENSORS = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    # the MLP's input norm (Gemma's pre_feedforward_layernorm)
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


def _import_gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError as e:
        if (e.name or "gguf").partition(".")[0] != "gguf":
            raise
        raise EdgeGPTError("edgegpt convert of a .gguf file needs the gguf package, which is not installed; it "
                           f"comes with the [convert] extra: {INSTALL}") from None
    return gguf


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# -- Q/K row order ---------------------------------------------------------------------------------------


def unpermute_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order → Hugging Face's (and edgegpt's).

    Per head, Hugging Face's rotate-half rotary pairs row j with row j + D/2; llama.cpp's rotary pairs
    adjacent rows (2j, 2j + 1), so its converter interleaves the two halves, [H, 2, D/2, ...] → [H, D/2,
    2, ...]; this undoes it. Works on a weight [H·D, in] and on a bias [H·D]."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# -- reading ---------------------------------------------------------------------------------------------


def _field_value(field: Any, gguf: Any) -> Any:
    """A metadata field as a Python value (str, int, float, bool or a list of them), read from the reader's
    raw parts (`ReaderField.contents()` only exists in newer gguf releases)."""
    kinds = field.types
    if not kinds:
        return None

    def scalar(part: np.ndarray, kind: Any) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if kind == gguf.GGUFValueType.FLOAT32:
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06): the same number
            # to the float32 model, and what the source model's config said.
            return float(str(part[0]))
        return part.tolist()[0]

    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(kinds) > 2:
            return [None]  # an array of arrays: nothing edgegpt reads has one
        return [scalar(field.parts[i], kinds[-1]) for i in field.data] if len(kinds) > 1 else []
    return scalar(field.parts[field.data[0]], kinds[0])


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors by name) of a GGUF file; a file gguf cannot parse is one EdgeGPTError."""
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {name: _field_value(field, gguf) for name, field in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    # gguf parses with numpy views over a memory map: a truncated or corrupt file surfaces as whichever of
    # these the first bad offset or byte produces.
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError, MemoryError) as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise EdgeGPTError(f"{path} is not a readable GGUF file ({detail}); it is truncated or corrupt, "
                           "download it again") from None
    return meta, tensors


def _number(meta: dict[str, Any], key: str, source: str, default: Any = None, integer: bool = True) -> Any:
    value = meta.get(key, default)
    if value is None:
        arch = key.partition(".")[0]
        raise EdgeGPTError(f"{source}: metadata {key} is missing; not a complete {arch} GGUF file")
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise EdgeGPTError(f"{source}: {key} differs between layers ({value[:4]}…); edgegpt needs one value")
        value = value[0]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise EdgeGPTError(f"{source}: {key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def _optional_number(meta: dict[str, Any], key: str, source: str) -> float | None:
    """A positive number the file may leave out (None then; 0 means "none" too, as llama.cpp reads it)."""
    if not meta.get(key):
        return None
    return float(_number(meta, key, source, integer=False))


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of a GGUF file of a supported architecture, refusing what edgegpt's model cannot
    represent: the same config as that of the Hugging Face folder holding the same model."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise EdgeGPTError(f"{source}: the GGUF architecture is {arch!r}; edgegpt converts {ARCHITECTURES_TEXT} GGUF "
                           "files; for other families convert their Hugging Face folder")
    p = f"{arch}."
    if meta.get(f"{p}expert_count", 0):
        raise EdgeGPTError(f"{source}: a mixture of experts ({meta[f'{p}expert_count']} experts) is not supported; "
                           "edgegpt converts dense models")
    scaling = meta.get(f"{p}rope.scaling.type")
    if scaling not in (None, "none"):
        raise EdgeGPTError(f"{source}: rotary scaling ({scaling}) is not supported; edgegpt reads plain rotary "
                           "embeddings and Llama 3's scaling (rope_freqs.weight)")
    dim = _number(meta, f"{p}embedding_length", source)
    heads = _number(meta, f"{p}attention.head_count", source)
    n_layers = _number(meta, f"{p}block_count", source)
    _check_metadata_against_tensors(meta, tensors, arch, dim, n_layers, source)
    # A head's width: attention.key_length where the file says (Qwen3 and Gemma choose it on their own),
    # else dim / heads; the values' heads must be as wide (edgegpt's attention has one width).
    head_dim = meta.get(f"{p}attention.key_length")
    head_dim = None if head_dim is None else _number(meta, f"{p}attention.key_length", source)
    value_length = meta.get(f"{p}attention.value_length")
    if value_length is not None and value_length != (head_dim or dim // heads):
        raise EdgeGPTError(f"{source}: {p}attention.value_length is {value_length}, but edgegpt needs it to equal the "
                           f"keys' width {head_dim or dim // heads}")
    cfg_args = dict(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are innermost first: [dim, vocab]
        dim=dim, n_layers=n_layers, n_heads=heads,
        n_kv_heads=_number(meta, f"{p}attention.head_count_kv", source, default=heads),
        ffn_dim=_number(meta, f"{p}feed_forward_length", source),
        max_len=_number(meta, f"{p}context_length", source),
        rope_theta=float(_number(meta, f"{p}rope.freq_base", source, default=10000.0, integer=False)),
        norm_eps=float(_number(meta, f"{p}attention.layer_norm_rms_epsilon", source, integer=False)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        head_dim=head_dim,
        qk_norm=arch == "qwen3" or arch == "gemma3",
    )
    if arch in GEMMA_ARCHITECTURES:
        cfg_args.update(_gemma_fields(meta, arch, cfg_args, source))
    try:
        cfg = ModelConfig(**cfg_args)
        if "rope_freqs.weight" in tensors:
            cfg = dataclasses.replace(cfg, rope_scaling=_llama3_scaling(meta, arch, tensors["rope_freqs.weight"], cfg))
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{source}: {str(e).removeprefix('config: ')}") from None
    # Rotary over part of a head: a shape edgegpt's attention has no room for.
    rotary = meta.get(f"{p}rope.dimension_count")
    if rotary is not None and rotary != cfg.head_dim:
        raise EdgeGPTError(f"{source}: {p}rope.dimension_count is {rotary}, but edgegpt turns whole heads: it needs "
                           f"it to equal the head width {cfg.head_dim}")
    return cfg


def _gemma_fields(meta: dict[str, Any], arch: str, sizes: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig's Gemma switches for a gemma3 or gemma2 file: what its metadata says, else llama.cpp's
    fixed choice (the constants above). Gemma 3 never soft-caps attention scores; Gemma 2 always does."""
    p = f"{arch}."
    n_layers, context = sizes["n_layers"], sizes["max_len"]
    head_dim = sizes["head_dim"] or sizes["dim"] // sizes["n_heads"]
    scale_width = sizes["dim"] // sizes["n_heads"] if n_layers == GEMMA_27B_LAYERS[arch] else head_dim
    fields: dict[str, Any] = {"post_norms": True, "embed_scale": True, "activation": "gelu_tanh",
                              "query_pre_attn_scalar": float(scale_width),
                              "final_softcap": _optional_number(meta, f"{p}final_logit_softcapping", source)}
    swa_base = _optional_number(meta, f"{p}rope.freq_base_swa", source)
    if arch == "gemma3":
        fields["rope_local_theta"] = swa_base or GEMMA3_LOCAL_ROPE_BASE
    else:
        if swa_base is not None and swa_base != sizes["rope_theta"]:
            raise EdgeGPTError(f"{source}: {p}rope.freq_base_swa is {swa_base:g} beside rope.freq_base "
                               f"{sizes['rope_theta']:g}; Gemma 2 turns every layer with one rotary base")
        attn_cap, final_cap = GEMMA2_SOFTCAPS
        fields["attn_softcap"] = _optional_number(meta, f"{p}attn_logit_softcapping", source) or attn_cap
        if f"{p}final_logit_softcapping" not in meta:
            fields["final_softcap"] = final_cap
    # Gemma 3 slides only where the file names a window (llama.cpp); Gemma 2 always, by 4,096 positions if not.
    window = meta.get(f"{p}attention.sliding_window", None if arch == "gemma3" else 4096)
    if not window:
        return fields
    window = _number(meta, f"{p}attention.sliding_window", source, default=window)
    if window > context:
        raise EdgeGPTError(f"{source}: {p}attention.sliding_window {window} is larger than the context "
                           f"{p}context_length {context}; the file contradicts itself")
    sliding = _sliding_layers(meta, arch, n_layers, source)
    if window == context or not any(sliding):  # a window as long as the context slides nowhere
        return fields
    fields["sliding_window"] = window
    if not all(sliding):
        fields["layer_types"] = tuple("sliding_attention" if s else "full_attention" for s in sliding)
    return fields


def _sliding_layers(meta: dict[str, Any], arch: str, n_layers: int, source: str) -> list[bool]:
    """Whether each layer slides: attention.sliding_window_pattern as a list (one flag per layer) or a number
    n (every n-th layer full; 0: every layer slides), else every GEMMA_FULL_EVERY-th layer full, as llama.cpp
    reads it."""
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = meta.get(key, GEMMA_FULL_EVERY[arch])
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(flag, bool) for flag in pattern):
            raise EdgeGPTError(f"{source}: {key} must hold one true/false flag for each of the {n_layers} layers")
        return pattern
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise EdgeGPTError(f"{source}: {key} must be a layer count or a list of flags, got {pattern!r}")
    return [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]


def _llama3_scaling(meta: dict[str, Any], arch: str, tensor: Any, cfg: ModelConfig) -> RopeScaling | None:
    """Llama 3.x's rotary scaling, from the factor each rotary frequency is divided by (rope_freqs.weight).

    llama.cpp's converter keeps only these factors, not the parameters they came from. Meta's Llama 3.1 and
    3.2 all use low_freq_factor 1, high_freq_factor 4 and an original context of 8,192 (LLAMA3_BANDS), and the
    slowest frequencies are divided by `factor` itself: those parameters are taken, and accepted only if they
    give back every factor in the file. None when every factor is 1 (no scaling)."""
    if tuple(int(d) for d in tensor.shape) != (cfg.head_dim // 2,) or tensor.tensor_type.name != "F32":
        raise EdgeGPTError(f"tensor rope_freqs.weight is {tensor.tensor_type.name} {[int(d) for d in tensor.shape]}; "
                           f"Llama 3's rotary factors are F32 [{cfg.head_dim // 2}]")
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float64).reshape(-1))
    if not torch.isfinite(factors).all() or not (factors > 0).all():
        raise EdgeGPTError("tensor rope_freqs.weight holds factors that are not positive numbers; the file is corrupt")
    if (factors == 1).all():
        return None
    low, high, original = LLAMA3_BANDS
    original = meta.get(f"{arch}.rope.scaling.original_context_length", original)
    scaling = RopeScaling(factor=float(str(np.float32(factors.max()))), low_freq_factor=low, high_freq_factor=high,
                          original_max_len=original)
    inverse = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if not torch.allclose(llama3_inverse_frequencies(inverse, scaling), inverse / factors, rtol=1e-5, atol=0):
        raise EdgeGPTError("rotary scaling: rope_freqs.weight is not Llama 3's scaling (factor "
                           f"{scaling.factor:g}, low_freq_factor {low:g}, high_freq_factor {high:g}, original context "
                           f"{original}); edgegpt reads only that one")
    return scaling


def _check_metadata_against_tensors(meta: dict[str, Any], tensors: dict[str, Any], arch: str, dim: int,
                                    n_layers: int, source: str) -> None:
    """The hyperparameters that the tensors themselves state, compared before any shape is derived from them:
    a file whose metadata contradicts its tensors was written wrongly, and which side is right is unknowable."""
    p = f"{arch}."
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise EdgeGPTError(f"{source}: tensor token_embd.weight is missing; not a complete {arch} GGUF file")
    if len(embedding.shape) != 2:
        raise EdgeGPTError(f"{source}: tensor token_embd.weight has {len(embedding.shape)} dimensions, not 2; "
                           "the file is corrupt")
    width, rows = (int(d) for d in embedding.shape)  # innermost first: [dim, vocab]
    if width != dim:
        raise EdgeGPTError(f"{source}: metadata {p}embedding_length is {dim}, but token_embd.weight holds vectors of "
                           f"{width}; the file contradicts itself")
    vocab = meta.get(f"{p}vocab_size")
    if vocab is not None and vocab != rows:
        raise EdgeGPTError(f"{source}: metadata {p}vocab_size is {vocab!r}, but token_embd.weight has {rows} rows; "
                           "the file contradicts itself")
    blocks = sorted({int(name.split(".")[1]) for name in tensors
                     if name.startswith("blk.") and name.split(".")[1].isdigit()})
    if blocks != list(range(n_layers)):
        held = f"blocks {blocks[0]}–{blocks[-1]} ({len(blocks)} in all)" if blocks else "no blk.N tensors"
        raise EdgeGPTError(f"{source}: metadata {p}block_count is {n_layers}, but the file holds {held}; the file "
                           "contradicts itself")


def _name_map(n_layers: int) -> dict[str, str]:
    """Every GGUF tensor name a model of n_layers may hold → its edgegpt name."""
    names = {}
    for theirs, ours in _TENSORS.items():
        for i in range(n_layers) if "{i}" in theirs else [0]:
            names[theirs.format(i=i)] = ours.format(i=i)
    return names


def _check_tensors(tensors: dict[str, Any], cfg: ModelConfig, expected: dict[str, torch.Size], arch: str,
                   source: str) -> dict[str, str]:
    """GGUF name → edgegpt name for every tensor, after checking types, names and shapes."""
    known = _name_map(cfg.n_layers)
    names = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":  # read into the config's rope_scaling (_llama3_scaling)
            continue
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise EdgeGPTError(f"{source}: tensor {name} is of type {kind}, which edgegpt does not read; supported: "
                               f"{', '.join(SUPPORTED_TYPES)} (re-quantize the model with llama-quantize, or "
                               "convert its Hugging Face folder)")
        ours = known.get(name)
        if ours not in expected:
            raise EdgeGPTError(f"{source}: unexpected tensor {name}; not a plain {arch} model "
                               "(edgegpt has no place for it)")
        shape = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists the innermost dimension first
        if shape != tuple(expected[ours]):
            raise EdgeGPTError(f"{source}: tensor {name} is {list(shape)}, the metadata implies {list(expected[ours])}")
        names[name] = ours
    missing = [theirs for theirs, ours in known.items() if ours in expected and theirs not in names]
    if missing:
        raise EdgeGPTError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all); "
                           "the file is incomplete")
    return names


# Rows dequantized at a time: gguf.quants builds a tensor's values in many small pieces before joining them,
# and the allocator keeps the memory of small pieces once freed; in slices of this many values, what it keeps
# is one slice, not a second copy of the largest tensor (the embedding).
DEQUANTIZE_SLICE_VALUES = 1 << 22


def _dequantize(tensor: Any, gguf: Any) -> tuple[torch.Tensor, bool]:
    """The tensor's float32 values, in an array of its own (not a view of the file's memory map), and whether
    every one is finite (checked slice by slice: torch.isfinite on the whole would hold a copy of it)."""
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    out = np.empty(shape, dtype=np.float32)
    rows = out.reshape(-1, shape[-1])
    stored = np.asarray(tensor.data).reshape(len(rows), -1)  # each row's floats or quantized blocks
    step = max(1, DEQUANTIZE_SLICE_VALUES // shape[-1])
    finite = True
    try:
        for first in range(0, len(rows), step):
            values = gguf.quants.dequantize(stored[first:first + step], tensor.tensor_type)
            rows[first:first + step] = values.reshape(-1, shape[-1])
            finite = finite and bool(np.isfinite(rows[first:first + step]).all())
    except NotImplementedError:  # an older gguf release than the one the [convert] extra asks for
        raise EdgeGPTError(f"the installed gguf package cannot dequantize {tensor.tensor_type.name} tensors; "
                           "upgrade it: pip install --upgrade gguf") from None
    return torch.from_numpy(out), finite


def load_gguf_weights(tensors: dict[str, Any], names: dict[str, str], cfg: ModelConfig, source: str,
                      progress: TensorProgress | None = None, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Every tensor as float32 under its edgegpt name, a llama file's Q/K rows (and biases) back in Hugging
    Face's order; progress(done, total) after each."""
    gguf = _import_gguf()
    weights = {}
    for name, ours in names.items():
        try:
            w, finite = _dequantize(tensors[name], gguf)
        except (ValueError, IndexError) as e:  # a tensor's bytes cut short: the file is truncated
            raise EdgeGPTError(f"{source}: tensor {name} cannot be read ({str(e)[:100]}); the file is truncated "
                               "or corrupt") from None
        if arch != "llama":
            pass  # only llama.cpp's llama converter interleaves the rotary halves (module doc)
        elif ".attn.q_proj." in ours:
            w = unpermute_from_gguf(w, cfg.n_heads)
        elif ".attn.k_proj." in ours:
            w = unpermute_from_gguf(w, cfg.n_kv_heads)
        if not finite:
            raise EdgeGPTError(f"{source}: tensor {name} holds NaN or infinite values; the file is corrupt")
        weights[ours] = w
        if progress:
            progress(len(weights), len(names))
    return weights


def from_gguf(path: Path, out: Path, progress: TensorProgress | None = None) -> Path:
    """Write a GGUF file of a supported architecture as an edgegpt checkpoint (float32 weights, its tokenizer,
    generation config and chat template); progress(done, total) after each tensor is dequantized."""
    path = Path(path)
    source = str(path)
    meta, tensors = read_gguf(path)
    cfg = config_from_gguf(meta, tensors, source)
    tokenizer = tokenizer_from_gguf(meta, source)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise EdgeGPTError(f"{source}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the embedding only "
                           f"{cfg.vocab_size} rows")
    generation = generation_from_gguf(meta, tokenizer.get_vocab_size(), source)
    template = chat_template_from_gguf(meta, source)
    arch = meta["general.architecture"]
    names = _check_tensors(tensors, cfg, expected_shapes(cfg), arch, source)
    # The dequantized tensors become the model's parameters: one float32 copy (convert/weights.py).
    model = GPT.holding(cfg, load_gguf_weights(tensors, names, cfg, source, progress, arch))
    # Built beside `out` and swapped in whole: a failure leaves no half-written checkpoint.
    with staged_directory(Path(out)) as stage:
        save_checkpoint(stage, model, tokenizer, generation=generation, chat_template=template)
    return Path(out)
