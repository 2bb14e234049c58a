"""Checkpoint ↔ Hugging Face directory: Llama family (Llama, SmolLM, Mistral without a sliding window; Llama
3.x's rotary scaling), Qwen2 family (Llama plus Q/K/V biases) and Qwen3 (Llama plus per-head q/k RMSNorm and
its own head_dim), lossless both ways.

edgegpt's model is Llama's architecture with other parameter names, so conversion is renaming:

    embed.weight                      ↔ model.embed_tokens.weight
    layers.{i}.attn_norm.weight       ↔ model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj    ↔ model.layers.{i}.self_attn.{q,k,v,o}_proj   (.weight; .bias for q,k,v: Qwen2)
    layers.{i}.attn.{q,k}_norm.weight ↔ model.layers.{i}.self_attn.{q,k}_norm.weight  (Qwen3)
    layers.{i}.mlp_norm.weight        ↔ model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj ↔ model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                       ↔ model.norm.weight
    lm_head.weight (untied only)      ↔ lm_head.weight

Beside the weights, the folder's generation settings (generation_config.json: eos ids, bos id, sampling
defaults) and chat template (chat_template.jinja, or tokenizer_config.json's "chat_template") go into the
checkpoint, and come back out the other way.

Reading a Hugging Face directory needs only safetensors and JSON (no transformers): users can start
from a small model they already have, e.g. SmolLM2-135M from their local cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from edgegpt.checkpoint import load_checkpoint, read_chat_template, read_generation_config, save_checkpoint
from edgegpt.convert.generation import clean_generation_config, eos_ids
from edgegpt.convert.weights import TensorProgress, expected_shapes, model_holding
from edgegpt.core.config import ModelConfig, RopeScaling
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json, staged_directory, write_bytes_atomic, write_json_atomic
from edgegpt.tokenizer import END_OF_TEXT, load_tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# (edgegpt name, Hugging Face name); {i} is a layer index, {p} a projection name.
_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.{p}_proj.weight", "model.layers.{i}.self_attn.{p}_proj.weight"),
    ("layers.{i}.attn.{p}_proj.bias", "model.layers.{i}.self_attn.{p}_proj.bias"),
    ("layers.{i}.attn.{p}_norm.weight", "model.layers.{i}.self_attn.{p}_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.{p}_proj.weight", "model.layers.{i}.mlp.{p}_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

# model_type → what it is called in messages. Each is Llama's block; qwen2 adds Q/K/V biases, qwen3 q/k norms.
SUPPORTED = {"llama": "Llama, SmolLM", "mistral": "Mistral without a sliding window", "qwen2": "Qwen2, Qwen2.5",
             "qwen3": "Qwen3"}
# Qwen2 and Qwen3 declare a sliding window but use it only when use_sliding_window is true.
_WINDOW_SWITCHED = ("qwen2", "qwen3")
# Hugging Face's rope_scaling keys of `rope_type: llama3` ↔ RopeScaling's fields.
_LLAMA3_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                "original_max_position_embeddings": "original_max_len"}
SUPPORTED_TEXT = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED.items())


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)"))


def _translate(name: str, to_hf: bool) -> str:
    for ours, theirs in _NAMES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        match = _pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    raise KeyError(name)


def hf_config(cfg: ModelConfig, generation: dict[str, Any]) -> dict[str, Any]:
    """config.json for `cfg`: a LlamaForCausalLM, a Qwen2ForCausalLM when it has Q/K/V biases (Llama's
    `attention_bias` would put one on o_proj too), a Qwen3ForCausalLM when it has q/k norms."""
    eos = generation.get("eos_token_id")
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": cfg.rope_scaling.rope_type,
                        **{theirs: getattr(cfg.rope_scaling, ours) for theirs, ours in _LLAMA3_KEYS.items()}}
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": generation.get("bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    if cfg.qk_norm:
        if cfg.qkv_bias:  # Qwen3's attention_bias would put one on o_proj too
            raise EdgeGPTError("no Hugging Face class has q/k norms and Q/K/V biases without an o_proj bias")
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **common, **window,
                "attention_bias": False}
    if cfg.qkv_bias:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common, **window}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "attention_bias": False,
            "mlp_bias": False}


_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_no_sliding_window(data: dict[str, Any], source: Path) -> None:
    """Refuse a sliding window shorter than the context: edgegpt's attention always sees the whole past."""
    model_type, context = data["model_type"], data.get("max_position_embeddings")
    window = data.get("sliding_window")
    if model_type in _WINDOW_SWITCHED and not data.get("use_sliding_window", False):
        window = None
    layer_types = data.get("layer_types") or []
    sliding = "sliding_attention" in layer_types or (
        window is not None and not (_positive_int(context) and _positive_int(window) and window >= context))
    if sliding:
        raise EdgeGPTError(f"{source}: sliding_window={window!r} (shorter than the {context!r}-token context) is "
                           "not supported: edgegpt attends to the whole context; supported: "
                           f"{SUPPORTED_TEXT}")


def config_from_hf(data: dict[str, Any], source: Path) -> ModelConfig:
    """A ModelConfig for a Hugging Face config of a supported family, refusing what the model cannot represent."""
    if not isinstance(data, dict):
        raise EdgeGPTError(f"{source}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in SUPPORTED:
        raise EdgeGPTError(f"{source}: model_type is {model_type!r}; edgegpt converts {SUPPORTED_TEXT}")
    rope_scaling = _rope_scaling_from_hf(data.get("rope_scaling"), source)
    if data.get("partial_rotary_factor", 1.0) != 1.0:
        raise EdgeGPTError(f"{source}: partial_rotary_factor={data['partial_rotary_factor']!r} is not supported "
                           "(edgegpt turns every channel of a head)")
    # Llama's attention_bias puts a bias on o_proj too, which the model has no place for; Qwen2's Q/K/V
    # biases are implied by its model_type.
    for key, fine in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if data.get(key, fine) != fine:
            raise EdgeGPTError(f"{source}: {key}={data[key]!r} is not supported (edgegpt needs {fine!r})")
    _check_no_sliding_window(data, source)
    # Checked before any arithmetic: a string or a float here is a TypeError (or a silent truncation) below.
    for key in _REQUIRED_SIZES:
        if key not in data:
            raise EdgeGPTError(f"{source}: missing key {key}")
    # An optional size may be null: transformers saves MistralConfig's unset head_dim that way.
    for key in (*_REQUIRED_SIZES, *_OPTIONAL_SIZES):
        if key in data and not (key in _OPTIONAL_SIZES and data[key] is None) and not _positive_int(data[key]):
            raise EdgeGPTError(f"{source}: {key} must be a positive integer, got {data[key]!r}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = data.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise EdgeGPTError(f"{source}: {key} must be a positive number, got {value!r}")
    if not isinstance(data.get("tie_word_embeddings", False), bool):
        raise EdgeGPTError(f"{source}: tie_word_embeddings must be true or false, got {data['tie_word_embeddings']!r}")
    heads = data["num_attention_heads"]
    # Qwen3 (and Gemma) choose head_dim on their own; without one, it is hidden_size / heads.
    if not data.get("head_dim") and data["hidden_size"] % heads:
        raise EdgeGPTError(f"{source}: hidden_size {data['hidden_size']} is not divisible by "
                           f"num_attention_heads {heads} and there is no head_dim")
    return ModelConfig(
        vocab_size=data["vocab_size"], dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
        n_heads=heads, n_kv_heads=data.get("num_key_value_heads") or heads, ffn_dim=data["intermediate_size"],
        max_len=data.get("max_position_embeddings") or 2048, rope_theta=float(data.get("rope_theta", 10000.0)),
        norm_eps=float(data.get("rms_norm_eps", 1e-5)), tie_embeddings=data.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2", head_dim=data.get("head_dim") or None, qk_norm=model_type == "qwen3",
        rope_scaling=rope_scaling,
    )


def _rope_scaling_from_hf(data: Any, source: Path) -> RopeScaling | None:
    """Hugging Face's rope_scaling: None or `default` (plain rotary), `llama3` (Llama 3.x); anything else is
    refused, since a rotary computed differently from training gives a model that answers wrongly."""
    if data is None:
        return None
    kind = data.get("rope_type", data.get("type")) if isinstance(data, dict) else None
    if kind == "default":
        return None
    if kind != "llama3":
        raise EdgeGPTError(f"{source}: rope_scaling={data!r:.120} is not supported (edgegpt reads none, "
                           "'default' and 'llama3')")
    missing = [key for key in _LLAMA3_KEYS if key not in data]
    if missing:
        raise EdgeGPTError(f"{source}: rope_scaling of type llama3 has no {', '.join(missing)}")
    try:
        return RopeScaling(**{ours: data[theirs] for theirs, ours in _LLAMA3_KEYS.items()})
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{source}: {str(e).removeprefix('config: ')}") from None


def _adds(tokenizer: Tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether the tokenizer's post-processor puts `bos` before / `eos` after every encoding (an empty text
    encodes to exactly what it adds)."""
    ids = tokenizer.encode("").ids
    add_bos = bos is not None and ids[:1] == [bos]
    return add_bos, eos is not None and len(ids) > add_bos and ids[-1] == eos


def to_huggingface(checkpoint: Path, out: Path) -> Path:
    """Write `checkpoint` as a Hugging Face directory (safetensors, config, tokenizer, generation config and
    chat template when the checkpoint has them)."""
    checkpoint = Path(checkpoint)
    model, tokenizer = load_checkpoint(checkpoint)
    imported = read_generation_config(checkpoint)
    template = read_chat_template(checkpoint)
    if imported is not None:
        generation = clean_generation_config(imported, tokenizer.get_vocab_size(), str(checkpoint / GENERATION_CONFIG))
        name = tokenizer.id_to_token
        special = {"eos_token": name(eos_ids(generation)[0])} if eos_ids(generation) else {}
        for key in ("bos", "pad"):
            if generation.get(f"{key}_token_id") is not None:
                special[f"{key}_token"] = name(generation[f"{key}_token_id"])
    else:  # a model edgegpt trained: its end-of-text token is all three
        eos = tokenizer.token_to_id(END_OF_TEXT)
        generation = {"bos_token_id": eos, "eos_token_id": eos}
        special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
        special = special if eos is not None else {}
    weights = {_translate(k, to_hf=True): v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    # What transformers' PreTrainedTokenizerFast would otherwise re-derive (and may get wrong): the
    # post-processor in tokenizer.json already adds a BOS or not.
    add_bos, add_eos = _adds(tokenizer, generation.get("bos_token_id"), (eos_ids(generation) or [None])[0])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_len,
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False, **special,
    }
    if template is not None:
        tokenizer_config["chat_template"] = template  # for transformers before chat_template.jinja existed
    with staged_directory(Path(out)) as stage:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(stage / WEIGHTS),
                  metadata={"format": "pt"})
        write_json_atomic(stage / CONFIG, hf_config(model.cfg, generation))
        write_json_atomic(stage / GENERATION_CONFIG, generation)
        write_bytes_atomic(stage / TOKENIZER, tokenizer.to_str().encode())
        write_json_atomic(stage / TOKENIZER_CONFIG, tokenizer_config)
        write_json_atomic(stage / SPECIAL_TOKENS_MAP, special)
        if template is not None:
            write_bytes_atomic(stage / CHAT_TEMPLATE, template.encode())
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


def read_hf_chat_template(directory: Path) -> str | None:
    """The folder's chat template: chat_template.jinja (where transformers writes it now, and which wins
    when both exist, as in transformers), else tokenizer_config.json's "chat_template" (a string, or a list
    of named templates of which the "default" one is the chat template)."""
    file = directory / CHAT_TEMPLATE
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgeGPTError(f"{file} is not UTF-8 text; it is not a chat template") from None
    if not (directory / TOKENIZER_CONFIG).is_file():
        return None
    data = read_json(directory / TOKENIZER_CONFIG)
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise EdgeGPTError(f"{directory / TOKENIZER_CONFIG}: chat_template must be text, got {type(template).__name__}")
    return template


def read_hf_generation(directory: Path, config: dict[str, Any], vocab_size: int) -> dict[str, Any] | None:
    """generation_config.json's settings, its token ids falling back on config.json's (as transformers
    does); None when neither says anything (export then takes the tokenizer's end-of-text token)."""
    ids = {key: config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation = clean_generation_config(ids, vocab_size, str(directory / CONFIG))
    path = directory / GENERATION_CONFIG
    if path.is_file():
        generation.update(clean_generation_config(read_json(path), vocab_size, str(path)))
    return generation or None


def from_huggingface(directory: Path, out: Path, progress: TensorProgress | None = None) -> Path:
    """Write a local Hugging Face directory of a supported family as an edgegpt checkpoint (float32);
    progress(done, total) as each tensor is read."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise EdgeGPTError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    if not (directory / TOKENIZER).is_file():
        raise EdgeGPTError(f"{directory}: tokenizer.json is missing (a fast tokenizer file is required)")
    config = read_json(directory / CONFIG)
    cfg = config_from_hf(config, directory / CONFIG)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    generation = read_hf_generation(directory, config, tokenizer.get_vocab_size())
    template = read_hf_chat_template(directory)
    hf = _read_hf_weights(directory)
    ours = {}
    for done, (name, tensor) in enumerate(hf.items(), 1):
        if progress:
            progress(done, len(hf))
        if "rotary_emb" in name:
            continue  # recomputed from rope_theta
        try:
            ours[_translate(name, to_hf=False)] = tensor.float()
        except KeyError:
            raise EdgeGPTError(f"{directory}: unexpected weight {name}; not a plain {config['model_type']} "
                               "model") from None
    del hf  # a bf16 or f16 source's own tensors: only their float32 copies are kept
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    expected = expected_shapes(cfg)
    if ours.keys() != expected.keys():
        missing = sorted(expected.keys() - ours.keys())[:3]
        unexpected = sorted(ours.keys() - expected.keys())[:3]
        detail = f"missing {missing}" if missing else f"unexpected {unexpected}"
        raise EdgeGPTError(f"{directory}: weights do not match config.json ({detail})")
    for name, tensor in ours.items():
        if tensor.shape != expected[name]:
            raise EdgeGPTError(
                f"{directory}: {name} is {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
            )
    # The tensors read (safetensors maps float32 ones without copying) become the parameters: one float32
    # copy of the weights, not two (convert/weights.py).
    model = model_holding(cfg, ours)
    # Built beside `out` and swapped in whole: a failure (a full disk) leaves no half-written checkpoint.
    with staged_directory(Path(out)) as stage:
        save_checkpoint(stage, model, tokenizer, generation=generation, chat_template=template)
    return Path(out)


# Everything to_huggingface writes: a directory holding only these (with a config.json naming a model type)
# is a previous conversion, which a new one may replace.
HF_FILES = frozenset({WEIGHTS, CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                      CHAT_TEMPLATE})
