"""Checkpoint ↔ Hugging Face `LlamaForCausalLM` directory, lossless both ways.

edgegpt's model is Llama's architecture with other parameter names, so conversion is renaming:

    embed.weight                      ↔ model.embed_tokens.weight
    layers.{i}.attn_norm.weight       ↔ model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj    ↔ model.layers.{i}.self_attn.{q,k,v,o}_proj
    layers.{i}.mlp_norm.weight        ↔ model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj ↔ model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                       ↔ model.norm.weight
    lm_head.weight (untied only)      ↔ lm_head.weight

Reading a Hugging Face directory needs only safetensors and JSON (no transformers): users can start
from a small Llama-family model they already have, e.g. SmolLM2-135M from their local cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgegpt.checkpoint import load_checkpoint, save_checkpoint
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, GENERATION_CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json, staged_directory, write_bytes_atomic, write_json_atomic
from edgegpt.model import GPT
from edgegpt.tokenizer import END_OF_TEXT, load_tokenizer

# (edgegpt name, Hugging Face name); {i} is a layer index, {p} a projection name.
_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.{p}_proj.weight", "model.layers.{i}.self_attn.{p}_proj.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.{p}_proj.weight", "model.layers.{i}.mlp.{p}_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)"))


def _translate(name: str, to_hf: bool) -> str:
    for ours, theirs in _NAMES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        match = _pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    raise KeyError(name)


def hf_config(cfg: ModelConfig, eos_token_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_from_hf(data: dict[str, Any], source: Path) -> ModelConfig:
    """A ModelConfig for a Hugging Face Llama config, refusing what the model cannot represent."""
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("model_type") != "llama":
        raise EdgeGPTError(f"{source}: model_type is {data.get('model_type')!r}; only 'llama' converts losslessly")
    for key, fine in (("attention_bias", False), ("mlp_bias", False), ("rope_scaling", None), ("hidden_act", "silu")):
        if data.get(key, fine) != fine:
            raise EdgeGPTError(f"{source}: {key}={data[key]!r} is not supported (edgegpt needs {fine!r})")
    # Checked before any arithmetic: a string or a float here is a TypeError (or a silent truncation) below.
    for key in _REQUIRED_SIZES:
        if key not in data:
            raise EdgeGPTError(f"{source}: missing key {key}")
    for key in (*_REQUIRED_SIZES, *_OPTIONAL_SIZES):
        if key in data and not _positive_int(data[key]):
            raise EdgeGPTError(f"{source}: {key} must be a positive integer, got {data[key]!r}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = data.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise EdgeGPTError(f"{source}: {key} must be a positive number, got {value!r}")
    if not isinstance(data.get("tie_word_embeddings", False), bool):
        raise EdgeGPTError(f"{source}: tie_word_embeddings must be true or false, got {data['tie_word_embeddings']!r}")
    heads = data["num_attention_heads"]
    if data.get("head_dim", data["hidden_size"] // heads) * heads != data["hidden_size"]:
        raise EdgeGPTError(f"{source}: head_dim × heads must equal hidden_size")
    return ModelConfig(
        vocab_size=data["vocab_size"], dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
        n_heads=heads, n_kv_heads=data.get("num_key_value_heads", heads), ffn_dim=data["intermediate_size"],
        max_len=data.get("max_position_embeddings", 2048), rope_theta=float(data.get("rope_theta", 10000.0)),
        norm_eps=float(data.get("rms_norm_eps", 1e-5)), tie_embeddings=data.get("tie_word_embeddings", False),
    )


def to_huggingface(checkpoint: Path, out: Path) -> Path:
    """Write `checkpoint` as a Hugging Face LlamaForCausalLM directory (safetensors, config, tokenizer)."""
    model, tokenizer = load_checkpoint(checkpoint)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    weights = {_translate(k, to_hf=True): v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    with staged_directory(Path(out)) as stage:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(stage / WEIGHTS),
                  metadata={"format": "pt"})
        write_json_atomic(stage / CONFIG, hf_config(model.cfg, eos))
        write_json_atomic(stage / GENERATION_CONFIG, {"bos_token_id": eos, "eos_token_id": eos})
        write_bytes_atomic(stage / TOKENIZER, tokenizer.to_str().encode())
        special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
        special = special if eos is not None else {}
        write_json_atomic(stage / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_len,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **special,
        })
        write_json_atomic(stage / "special_tokens_map.json", special)
    return Path(out)


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else [WEIGHTS]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise EdgeGPTError(f"{directory}: {name} is missing (only safetensors weights are read, never pickle)")
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise EdgeGPTError(f"{path} is not a readable safetensors file ({e})") from None
    return weights


def from_huggingface(directory: Path, out: Path) -> Path:
    """Write a local Hugging Face Llama directory as an edgegpt checkpoint (float32)."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise EdgeGPTError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    if not (directory / TOKENIZER).is_file():
        raise EdgeGPTError(f"{directory}: tokenizer.json is missing (a fast tokenizer file is required)")
    cfg = config_from_hf(read_json(directory / CONFIG), directory / CONFIG)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    hf = _read_hf_weights(directory)
    ours = {}
    for name, tensor in hf.items():
        if "rotary_emb" in name:
            continue  # recomputed from rope_theta
        try:
            ours[_translate(name, to_hf=False)] = tensor.float()
        except KeyError:
            raise EdgeGPTError(f"{directory}: unexpected weight {name}; not a plain Llama model") from None
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if ours.keys() != expected.keys():
        missing = sorted(expected.keys() - ours.keys())[:3]
        raise EdgeGPTError(f"{directory}: weights do not match config.json (missing {missing})")
    for name, tensor in ours.items():
        if tensor.shape != expected[name]:
            raise EdgeGPTError(
                f"{directory}: {name} is {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
            )
    model.load_state_dict(ours, strict=not cfg.tie_embeddings)
    # Built beside `out` and swapped in whole: a failure (a full disk) leaves no half-written checkpoint.
    with staged_directory(Path(out)) as stage:
        save_checkpoint(stage, model.eval(), tokenizer)
    return Path(out)


# Everything to_huggingface writes: a directory holding only these (with a Llama config.json) is a
# previous conversion, which a new one may replace.
HF_FILES = frozenset({WEIGHTS, CONFIG, GENERATION_CONFIG, TOKENIZER,
                      "tokenizer_config.json", "special_tokens_map.json"})


def _config(directory: Path) -> Any:
    """config.json's content; None where there is none or it is not JSON (a destination is only looked at)."""
    try:
        return read_json(directory / CONFIG) if (directory / CONFIG).is_file() else None
    except EdgeGPTError:
        return None


def _is_checkpoint(directory: Path, config: Any) -> bool:
    """An edgegpt checkpoint: weights, tokenizer and a config.json that is not a Hugging Face one."""
    has_files = all((directory / name).is_file() for name in (WEIGHTS, CONFIG, TOKENIZER))
    return has_files and not (isinstance(config, dict) and "model_type" in config)


def _is_hf_model(config: Any) -> bool:
    return isinstance(config, dict) and "model_type" in config


def check_destination(source: Path, out: Path, to_hf: bool) -> None:
    """Refuse to replace anything but a previous output of the same kind: the staged swap deletes what was there.

    export's check_destination rule: never the source or a folder holding it; an empty or new directory
    is fine; an existing edgegpt checkpoint (converting to a checkpoint), or a Hugging Face directory
    holding nothing but the files a conversion writes (converting to Hugging Face), may be replaced;
    anything else is refused."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise EdgeGPTError(f"convert destination {out} would overwrite the source {source}; "
                           "choose another output directory")
    if out.exists() and not out.is_dir():
        raise EdgeGPTError(f"convert destination {out} is a file; choose a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    config = _config(out)
    if to_hf:
        previous = _is_hf_model(config) and all(p.name in HF_FILES and p.is_file() for p in out.iterdir())
    else:
        previous = _is_checkpoint(out, config)
    if not previous:
        raise EdgeGPTError(f"convert destination {out} already exists and is not empty; choose a new directory")


def convert(source: Path, out: Path) -> tuple[str, Path]:
    """Either direction, told apart by what `source` holds. Returns (direction, out).

    Before anything is written, the destination is checked (check_destination): never the source or a
    folder holding it, never an existing directory holding anything but a previous output of that kind."""
    source, out = Path(source), Path(out)
    config = read_json(source / CONFIG) if (source / CONFIG).is_file() else None  # corrupt JSON: say so
    if _is_checkpoint(source, config):
        check_destination(source, out, to_hf=True)
        return "checkpoint → huggingface", to_huggingface(source, out)
    if _is_hf_model(config):
        check_destination(source, out, to_hf=False)
        return "huggingface → checkpoint", from_huggingface(source, out)
    raise EdgeGPTError(f"{source} is neither an edgegpt checkpoint nor a Hugging Face model directory")
