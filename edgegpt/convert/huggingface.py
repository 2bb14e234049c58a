"""Checkpoint ↔ Hugging Face directory: Llama family (Llama, SmolLM, Mistral and its sliding window; Llama
3.x's rotary scaling), Qwen2 family (Llama plus Q/K/V biases), Qwen3 (Llama plus per-head q/k RMSNorm and
its own head_dim) and Gemma 3 text models (edgegpt.model's Gemma switches), lossless both ways.

edgegpt's model is Llama's architecture with other parameter names, so conversion is renaming:

    embed.weight                      ↔ model.embed_tokens.weight
    layers.{i}.attn_norm.weight       ↔ model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj    ↔ model.layers.{i}.self_attn.{q,k,v,o}_proj   (.weight; .bias for q,k,v: Qwen2)
    layers.{i}.attn.{q,k}_norm.weight ↔ model.layers.{i}.self_attn.{q,k}_norm.weight  (Qwen3)
    layers.{i}.mlp_norm.weight        ↔ model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj ↔ model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                       ↔ model.norm.weight
    lm_head.weight (untied only)      ↔ lm_head.weight

Gemma 3 names its four norms per layer differently (_GEMMA_NORMS) and stores each norm's weight as w in
(1 + w): edgegpt stores 1 + w (edgegpt.model), so every norm weight gains one on the way in and loses it on
the way out (exact in float32 for the weights' magnitudes: the sum is what both sides compute with).

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

from edgegpt.checkpoint import (
    expected_shapes,
    load_checkpoint,
    read_chat_template,
    read_generation_config,
    save_checkpoint,
)
from edgegpt.convert.generation import clean_generation_config, eos_ids
from edgegpt.convert.weights import TensorProgress
from edgegpt.core.config import ModelConfig, RopeScaling
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json, staged_directory, write_bytes_atomic, write_json_atomic
from edgegpt.model import GPT
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

# Gemma 3's per-layer norms (edgegpt name, Hugging Face name): its post_attention_layernorm is the norm of the
# attention's output, where Llama's is the MLP's input norm.
_GEMMA_NORMS = [
    ("layers.{i}.post_attn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.post_mlp_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
]
_GEMMA_NAMES = [pair for pair in _NAMES if "mlp_norm" not in pair[0]] + _GEMMA_NORMS

# model_type → what it is called in messages. Each is Llama's block; qwen2 adds Q/K/V biases, qwen3 q/k norms,
# gemma3_text the Gemma switches of edgegpt.model.
SUPPORTED = {"llama": "Llama, SmolLM", "mistral": "Mistral", "qwen2": "Qwen2, Qwen2.5", "qwen3": "Qwen3",
             "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 text models"}
GEMMA = "gemma3_text"
# Gemma 2 is Gemma 3 without q/k norms and with one rotary, soft-capping its attention scores and logits.
GEMMA_TYPES = ("gemma2", GEMMA)
# Qwen2 and Qwen3 declare a sliding window but use it only when use_sliding_window is true.
_WINDOW_SWITCHED = ("qwen2", "qwen3")
# Hugging Face's rope_scaling keys of `rope_type: llama3` ↔ RopeScaling's fields.
_LLAMA3_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                "original_max_position_embeddings": "original_max_len"}
SUPPORTED_TEXT = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED.items())


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)"))


def _translate(name: str, to_hf: bool, gemma: bool = False) -> str:
    for ours, theirs in _GEMMA_NAMES if gemma else _NAMES:
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
    if is_gemma(cfg):
        return gemma_hf_config(cfg, common)
    sliding = cfg.sliding_window is not None
    window = {"use_sliding_window": sliding, "sliding_window": cfg.sliding_window, "max_window_layers": cfg.n_layers}
    if sliding:
        window["layer_types"] = ["sliding_attention" if cfg.is_sliding(i) else "full_attention"
                                 for i in range(cfg.n_layers)]
        qwen = cfg.qkv_bias or cfg.qk_norm  # Qwen's classes take layer_types; Mistral's slides in every layer
        if cfg.rope_local_theta is not None or not qwen and len(cfg.sliding_layers) < cfg.n_layers:
            raise EdgeGPTError("no Hugging Face class has this model's mix of sliding and full layers")
    if cfg.qk_norm:
        if cfg.qkv_bias:  # Qwen3's attention_bias would put one on o_proj too
            raise EdgeGPTError("no Hugging Face class has q/k norms and Q/K/V biases without an o_proj bias")
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **common, **window,
                "attention_bias": False}
    if cfg.qkv_bias:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common, **window}
    if sliding:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common,
                "sliding_window": cfg.sliding_window}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "attention_bias": False,
            "mlp_bias": False}


def is_gemma(cfg: ModelConfig) -> bool:
    """Whether `cfg` is Gemma 2's or 3's shape (post_norms, embed_scale, GELU; Gemma 3 with q/k norms); a mix of
    Gemma's and Llama's features has no Hugging Face class."""
    if cfg.post_norms or cfg.embed_scale:
        gemma3 = cfg.qk_norm and cfg.attn_softcap is None
        gemma2 = not cfg.qk_norm and cfg.rope_local_theta is None
        if not (cfg.post_norms and cfg.embed_scale and cfg.activation == "gelu_tanh" and not cfg.qkv_bias
                and (gemma2 or gemma3)):
            raise EdgeGPTError("no Hugging Face class has this mix of Gemma's and Llama's features")
        return True
    if cfg.activation != "silu" or cfg.attn_softcap is not None or cfg.final_softcap is not None:
        raise EdgeGPTError("no Hugging Face class has a GELU MLP or soft-capping without Gemma's norms")
    return False


def gemma_hf_config(cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    layer_types = ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)]
    if not cfg.qk_norm:
        return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                **{k: v for k, v in common.items() if k != "hidden_act"}, "hidden_activation": "gelu_pytorch_tanh",
                "attention_bias": False, "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
                "sliding_window": cfg.sliding_window or cfg.max_len, "layer_types": layer_types,
                "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap}
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": GEMMA,
        **{k: v for k, v in common.items() if k != "hidden_act"},
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
        "sliding_window": cfg.sliding_window or cfg.max_len, "layer_types": layer_types,
        "rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta,
        "final_logit_softcapping": cfg.final_softcap, "use_bidirectional_attention": False,
    }


_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _sliding_from_hf(data: dict[str, Any], source: Path) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of a Hugging Face config: Mistral slides in every layer; Qwen2/3 only with
    use_sliding_window, in the layers layer_types (or max_window_layers) names; Gemma 3 in those layer_types
    (or its older sliding_window_pattern: every pattern-th layer full) names. A window as long as the context
    is no window."""
    model_type, layers = data["model_type"], data["num_hidden_layers"]
    window = data.get("sliding_window")
    if model_type in _WINDOW_SWITCHED and not data.get("use_sliding_window", False) or window is None:
        return None, None
    if not _positive_int(window):
        raise EdgeGPTError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    layer_types = data.get("layer_types")
    if layer_types is None and model_type in GEMMA_TYPES:
        pattern = data.get("sliding_window_pattern", 6 if model_type == GEMMA else 2)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    elif layer_types is None and model_type in _WINDOW_SWITCHED:
        first = data.get("max_window_layers", layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != layers):
        raise EdgeGPTError(f"{source}: layer_types must list one type for each of the {layers} layers")
    context = data.get("max_position_embeddings")
    if _positive_int(context) and window >= context or layer_types is not None and (
            "sliding_attention" not in layer_types):
        return None, None
    return window, None if layer_types is None or set(layer_types) == {"sliding_attention"} else tuple(layer_types)


def _gemma_fields(data: dict[str, Any], source: Path) -> dict[str, Any]:
    """ModelConfig's Gemma switches from a gemma2 or gemma3_text config, refusing what the model cannot represent.

    Gemma 3's reference (transformers' Gemma3Attention, llama.cpp) never soft-caps the attention scores, whatever
    attn_logit_softcapping says, so neither does the converted model; Gemma 2's does."""
    gemma3 = data["model_type"] == GEMMA
    if data.get("use_bidirectional_attention"):
        raise EdgeGPTError(f"{source}: use_bidirectional_attention (an embedding model) is not supported: "
                           "edgegpt generates text, causally")
    activation = data.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise EdgeGPTError(f"{source}: hidden_activation={activation!r} is not supported (edgegpt needs "
                           "'gelu_pytorch_tanh')")
    fields: dict[str, Any] = {"post_norms": True, "embed_scale": True, "qk_norm": gemma3, "activation": "gelu_tanh"}
    renames = [("query_pre_attn_scalar", "query_pre_attn_scalar"), ("final_logit_softcapping", "final_softcap")]
    own = ("rope_local_base_freq", "rope_local_theta") if gemma3 else ("attn_logit_softcapping", "attn_softcap")
    renames.append(own)
    for theirs, ours in renames:
        value = data.get(theirs)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise EdgeGPTError(f"{source}: {theirs} must be a positive number, got {value!r}")
            fields[ours] = float(value)
    if gemma3 and "rope_local_theta" not in fields:
        fields["rope_local_theta"] = 10000.0  # Gemma3TextConfig's default
    return fields


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
    gemma = model_type in GEMMA_TYPES
    # Llama's attention_bias puts a bias on o_proj too, which the model has no place for; Qwen2's Q/K/V
    # biases are implied by its model_type. (Gemma's activation is hidden_activation: _gemma_fields.)
    for key, fine in (("attention_bias", False), ("mlp_bias", False), *(() if gemma else (("hidden_act", "silu"),))):
        if data.get(key, fine) != fine:
            raise EdgeGPTError(f"{source}: {key}={data[key]!r} is not supported (edgegpt needs {fine!r})")
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
    window, layer_types = _sliding_from_hf(data, source)
    family = (_gemma_fields(data, source) if gemma
              else {"qkv_bias": model_type == "qwen2", "qk_norm": model_type == "qwen3"})
    heads = data["num_attention_heads"]
    # Qwen3 (and Gemma) choose head_dim on their own; without one, it is hidden_size / heads.
    if not data.get("head_dim") and data["hidden_size"] % heads:
        raise EdgeGPTError(f"{source}: hidden_size {data['hidden_size']} is not divisible by "
                           f"num_attention_heads {heads} and there is no head_dim")
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"], dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
            n_heads=heads, n_kv_heads=data.get("num_key_value_heads") or heads, ffn_dim=data["intermediate_size"],
            max_len=data.get("max_position_embeddings") or 2048, rope_theta=float(data.get("rope_theta", 10000.0)),
            norm_eps=float(data.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            tie_embeddings=data.get("tie_word_embeddings", gemma), head_dim=data.get("head_dim") or None,
            rope_scaling=rope_scaling, sliding_window=window, layer_types=layer_types, **family,
        )
    except EdgeGPTError as e:
        raise EdgeGPTError(f"{source}: {str(e).removeprefix('config: ')}") from None


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
    gemma = is_gemma(model.cfg)
    weights = {_translate(k, to_hf=True, gemma=gemma): v - 1.0 if gemma and k.endswith("norm.weight") else v
               for k, v in model.state_dict().items()}
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
    gemma = config["model_type"] in GEMMA_TYPES
    ours = {}
    for done, (name, tensor) in enumerate(hf.items(), 1):
        if progress:
            progress(done, len(hf))
        if "rotary_emb" in name:
            continue  # recomputed from rope_theta
        try:
            ours[_translate(name, to_hf=False, gemma=gemma)] = tensor.float()
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
    if gemma:
        for name in ours:
            if name.endswith("norm.weight"):
                ours[name] += 1.0  # Gemma's (1 + w): edgegpt stores the sum (module doc)
    # The tensors read (safetensors maps float32 ones without copying) become the parameters: one float32
    # copy of the weights, not two (convert/weights.py).
    model = GPT.holding(cfg, ours)
    # Built beside `out` and swapped in whole: a failure (a full disk) leaves no half-written checkpoint.
    with staged_directory(Path(out)) as stage:
        save_checkpoint(stage, model, tokenizer, generation=generation, chat_template=template)
    return Path(out)


# Everything to_huggingface writes: a directory holding only these (with a config.json naming a model type)
# is a previous conversion, which a new one may replace.
HF_FILES = frozenset({WEIGHTS, CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                      CHAT_TEMPLATE})
