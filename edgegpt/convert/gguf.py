"""GGUF (llama.cpp's file format) → checkpoint, for the Llama architecture.

    FILE.gguf ─► metadata: llama.* hyperparameters ─► ModelConfig (checked against the tensors' shapes)
             │            tokenizer.* ─────────────► tokenizer.json, generation_config.json,
             │                                       chat_template.jinja (gguf_tokenizer.py)
             ├► rope_freqs.weight (Llama 3.x) ──────► ModelConfig.rope_scaling
             └► tensors: dequantized to float32 (gguf.quants.dequantize), Q/K rows put back in
                         Hugging Face's order, renamed ─► model.safetensors

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

from edgegpt.checkpoint import save_checkpoint
from edgegpt.convert.gguf_tokenizer import chat_template_from_gguf, generation_from_gguf, tokenizer_from_gguf
from edgegpt.convert.weights import TensorProgress, expected_shapes, model_holding
from edgegpt.core.config import ModelConfig, RopeScaling
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.io import staged_directory
from edgegpt.model import llama3_inverse_frequencies

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "llama"
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
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
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
        raise EdgeGPTError(f"{source}: metadata {key} is missing; not a complete {ARCHITECTURE} GGUF file")
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise EdgeGPTError(f"{source}: {key} differs between layers ({value[:4]}…); edgegpt needs one value")
        value = value[0]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise EdgeGPTError(f"{source}: {key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of a llama GGUF file, refusing what edgegpt's model cannot represent."""
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise EdgeGPTError(f"{source}: the GGUF architecture is {arch!r}; edgegpt converts {ARCHITECTURE!r} GGUF files "
                           "(Llama, SmolLM, Mistral); for other families convert their Hugging Face folder")
    p = f"{ARCHITECTURE}."
    if meta.get(f"{p}expert_count", 0):
        raise EdgeGPTError(f"{source}: a mixture of experts ({meta[f'{p}expert_count']} experts) is not supported; "
                           "edgegpt converts dense Llama models")
    scaling = meta.get(f"{p}rope.scaling.type")
    if scaling not in (None, "none"):
        raise EdgeGPTError(f"{source}: rotary scaling ({scaling}) is not supported; edgegpt reads plain rotary "
                           "embeddings and Llama 3's scaling (rope_freqs.weight)")
    dim = _number(meta, f"{p}embedding_length", source)
    heads = _number(meta, f"{p}attention.head_count", source)
    n_layers = _number(meta, f"{p}block_count", source)
    _check_metadata_against_tensors(meta, tensors, dim, n_layers, source)
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
    )
    try:
        cfg = ModelConfig(**cfg_args)
        if "rope_freqs.weight" in tensors:
            cfg = dataclasses.replace(cfg, rope_scaling=_llama3_scaling(meta, tensors["rope_freqs.weight"], cfg))
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{source}: {str(e).removeprefix('config: ')}") from None
    # Rotary over part of a head, or heads wider than dim / n_heads: shapes edgegpt's attention has no room for.
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = meta.get(p + key)
        if value is not None and value != cfg.head_dim:
            raise EdgeGPTError(f"{source}: {p}{key} is {value}, but edgegpt needs it to equal "
                               f"embedding_length / head_count = {cfg.head_dim}")
    return cfg


def _llama3_scaling(meta: dict[str, Any], tensor: Any, cfg: ModelConfig) -> RopeScaling | None:
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
    original = meta.get(f"{ARCHITECTURE}.rope.scaling.original_context_length", original)
    scaling = RopeScaling(factor=float(str(np.float32(factors.max()))), low_freq_factor=low, high_freq_factor=high,
                          original_max_len=original)
    inverse = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if not torch.allclose(llama3_inverse_frequencies(inverse, scaling), inverse / factors, rtol=1e-5, atol=0):
        raise EdgeGPTError("rotary scaling: rope_freqs.weight is not Llama 3's scaling (factor "
                           f"{scaling.factor:g}, low_freq_factor {low:g}, high_freq_factor {high:g}, original context "
                           f"{original}); edgegpt reads only that one")
    return scaling


def _check_metadata_against_tensors(meta: dict[str, Any], tensors: dict[str, Any], dim: int, n_layers: int,
                                    source: str) -> None:
    """The hyperparameters that the tensors themselves state, compared before any shape is derived from them:
    a file whose metadata contradicts its tensors was written wrongly, and which side is right is unknowable."""
    p = f"{ARCHITECTURE}."
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise EdgeGPTError(f"{source}: tensor token_embd.weight is missing; not a complete {ARCHITECTURE} GGUF file")
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


def _check_tensors(tensors: dict[str, Any], cfg: ModelConfig, expected: dict[str, torch.Size],
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
            raise EdgeGPTError(f"{source}: unexpected tensor {name}; not a plain {ARCHITECTURE} model "
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


def _dequantize(tensor: Any, gguf: Any) -> torch.Tensor:
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:  # an older gguf release than the one the [convert] extra asks for
        raise EdgeGPTError(f"the installed gguf package cannot dequantize {tensor.tensor_type.name} tensors; "
                           "upgrade it: pip install --upgrade gguf") from None
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))


def load_gguf_weights(tensors: dict[str, Any], names: dict[str, str], cfg: ModelConfig, source: str,
                      progress: TensorProgress | None = None) -> dict[str, torch.Tensor]:
    """Every tensor as float32 under its edgegpt name, Q/K rows (and biases) back in Hugging Face's order;
    progress(done, total) after each."""
    gguf = _import_gguf()
    weights = {}
    for name, ours in names.items():
        try:
            w = _dequantize(tensors[name], gguf)
        except (ValueError, IndexError) as e:  # a tensor's bytes cut short: the file is truncated
            raise EdgeGPTError(f"{source}: tensor {name} cannot be read ({str(e)[:100]}); the file is truncated "
                               "or corrupt") from None
        if ".attn.q_proj." in ours:
            w = unpermute_from_gguf(w, cfg.n_heads)
        elif ".attn.k_proj." in ours:
            w = unpermute_from_gguf(w, cfg.n_kv_heads)
        if not torch.isfinite(w).all():
            raise EdgeGPTError(f"{source}: tensor {name} holds NaN or infinite values; the file is corrupt")
        weights[ours] = w
        if progress:
            progress(len(weights), len(names))
    return weights


def from_gguf(path: Path, out: Path, progress: TensorProgress | None = None) -> Path:
    """Write a llama-architecture GGUF file as an edgegpt checkpoint (float32 weights, its tokenizer,
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
    names = _check_tensors(tensors, cfg, expected_shapes(cfg), source)
    # The dequantized tensors become the model's parameters: one float32 copy (convert/weights.py).
    model = model_holding(cfg, load_gguf_weights(tensors, names, cfg, source, progress))
    # Built beside `out` and swapped in whole: a failure leaves no half-written checkpoint.
    with staged_directory(Path(out)) as stage:
        save_checkpoint(stage, model, tokenizer, generation=generation, chat_template=template)
    return Path(out)
