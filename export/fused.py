"""The fused graph, emitted directly from the weights with onnx.helper (kv_layout "static").

    input_ids ─► /embed/Gather ─► /layers.0/attn_norm/SimplifiedLayerNormalization
      ─► per layer i:  attention (GroupQueryAttention, cache in place)  ─► SkipSimplifiedLayerNormalization
                       SwiGLU MLP                                        ─► SkipSimplifiedLayerNormalization
      ─► /norm/SkipSimplifiedLayerNormalization ─► /lm_head/FusedMatMul (x · Wᵀ) ─► logits

Why emitted rather than rewritten from the torch.onnx graph (../shared/ONNX-NOTES.md): onnxscript's
rewriter only fuses GroupQueryAttention for old Hugging Face idioms, drops the mask and grows the cache;
emitting is exact, short and the fastest measured. The plain torch.onnx graph stays the oracle: the tests
hold this graph to it (tests/test_fused.py).

Each residual add is folded into the next norm: SkipSimplifiedLayerNormalization returns the normed sum
(output 0) and the sum itself (output 3), which is the residual stream the layer after it adds to.

The cache is float32 (float16 in an fp16 graph), or int8 with onnxruntime's quantized cache when
build_fused_graph is given CacheScales (`--kv-cache int8`; calibrated in export/cache_precision.py).

Gemma's switches (edgegpt.model) add nodes, never change the ones above: /embed/Mul (× √dim) after the Gather;
a SimplifiedLayerNormalization on each branch's output before its skip norm (post_norms); Gelu(tanh) for the
MLP's Sigmoid·Mul; /lm_head/Div → Tanh → Mul (final soft-capping). The attention scale, soft-capping and
sliding window are GroupQueryAttention's own attributes (scale, softcap, local_window_size), and sliding layers
turn by rotary_local.{cos,sin}_cache when they have a rotary base of their own.

Node names are module paths (`/layers.3/attn/GroupQueryAttention`); initializers are named after the
PyTorch parameters (`layers.3.attn.q_proj.weight`), with MatMul weights stored as [in, out], the
transpose of nn.Linear's [out, in], because MatMul multiplies x @ W; the float32 LM head multiplies by the
transpose of its [vocab, dim] weight instead (lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.external_data import WeightSpool, move_initializers
from edgegpt.export.onnx_export import KV_NAMES, MAX_IR_VERSION, OPSET, check_self_contained
from edgegpt.model import GPT

PRECISIONS = {"fp32": ("float32", np.float32, TensorProto.FLOAT), "fp16": ("float16", np.float16, TensorProto.FLOAT16)}
# com.microsoft opset 1 holds GroupQueryAttention and SkipSimplifiedLayerNormalization.
MS_DOMAIN = "com.microsoft"

# Q, K and V as one packed [dim, (H + 2·Hkv)·D] MatMul feeding GroupQueryAttention's packed-QKV form
# rather than three MatMuls: one pass over the normed activations and one kernel launch instead of three.
# Packed decodes a little faster than three MatMuls on a 2-core CPU (`small`, batch 1, Generator.decode_step),
# so it is the default.
PACK_QKV = True

# What GroupQueryAttention may keep past keys and values as (`edgegpt export --kv-cache`): the graph's
# own float type, or int8 (onnxruntime's quantized cache, CPU, float32 graphs only: CacheScales).
KV_CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
KV_CACHE_BITS = 8  # kv_cache_bit_width: onnxruntime 1.32 also has 4 (two values per uint8), not offered
QUANT_TYPES = ("PER_TENSOR", "PER_CHANNEL")


@dataclass(frozen=True)
class CacheScales:
    """The int8 cache's scales: GroupQueryAttention's k_scale / v_scale (inputs 12 and 13) for each layer.

    onnxruntime 1.32's contract (contrib_ops/cpu/bert/gqa_attention_base.h, mlas qkv_quant.cpp): a scale is
    the *dequantization* step, x ≈ q · scale with q = clamp(rint(x / scale), -128, 127), symmetric, no zero
    point, saturating. K is quantized after the op's rotary (what attention reads), V as projected. The CPU
    kernel needs k_quant_type == v_quant_type. Shapes (float32, broadcastable to the cache):
        PER_TENSOR   [1]                        one step for every head and channel of the layer
        PER_CHANNEL  [1, n_kv_heads, 1, head_dim]  one step per KV head and channel, shared by all positions
    `calibration` says where the steps came from (export/cache_precision.py) and goes into config.json.
    """

    quant_type: str  # "PER_TENSOR" or "PER_CHANNEL"
    k: tuple[np.ndarray, ...]  # one per layer
    v: tuple[np.ndarray, ...]
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise EdgeGPTError(f"an int8 cache is quantized {' or '.join(QUANT_TYPES)}, got {self.quant_type!r}")


def fused_graph_contract(cfg: ModelConfig, precision: str = "fp32", scales: CacheScales | None = None
                         ) -> dict[str, Any]:
    """The fused graph's inputs and outputs (the `graph` block of config.json, docs/FORMATS.md).

    `dtype` is the cache's (docs/FORMATS.md): the graph's float type, or int8 when `scales` are given;
    the `kv_cache` block says the same and, for int8, how the cache is quantized and calibrated.
    """
    float_dtype = _precision(precision)[0]
    if scales is not None and float_dtype != "float32":
        raise EdgeGPTError("an int8 cache needs a float32 graph (onnxruntime quantizes it on the CPU only)")
    dtype = "int8" if scales is not None else float_dtype
    kv = {"dtype": dtype, "shape": ["batch", cfg.n_kv_heads, "max_length", cfg.head_dim]}
    inputs: dict[str, Any] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
        "seqlens_k": {"dtype": "int32", "shape": ["batch"]},
        "total_sequence_length": {"dtype": "int32", "shape": []},
    }
    outputs: dict[str, Any] = {"logits": {"dtype": "float32", "shape": ["batch", "sequence", cfg.vocab_size]}}
    for i in range(cfg.n_layers):
        inputs[f"past_key.{i}"] = inputs[f"past_value.{i}"] = dict(kv)
        outputs[f"present_key.{i}"] = outputs[f"present_value.{i}"] = dict(kv)
    kv_cache: dict[str, Any] = {"dtype": dtype}
    if cfg.sliding_layers:
        # Sliding layers' buffers may be window-sized (GroupQueryAttention's sliding_window_cache): the runtime
        # sizes them from these (runtime/kv_cache.py).
        kv_cache.update(sliding_window=cfg.sliding_window, sliding_layers=list(cfg.sliding_layers))
    if scales is not None:
        kv_cache.update(quantization=scales.quant_type, bit_width=KV_CACHE_BITS,
                        scales={"k": SCALE_NAMES["k"], "v": SCALE_NAMES["v"]}, calibration=dict(scales.calibration))
    return {"kv_layout": "static", "dtype": dtype, "kv_cache": kv_cache, "inputs": inputs, "outputs": outputs,
            **KV_NAMES}


# The int8 cache's scale initializers, per layer (CacheScales).
SCALE_NAMES = {"k": "layers.{layer}.attn.k_scale", "v": "layers.{layer}.attn.v_scale"}


def build_fused_graph(model: GPT, path: Path, precision: str = "fp32", *, pack_qkv: bool = PACK_QKV,
                      scales: CacheScales | None = None) -> None:
    """Write the fused graph of `model` to `path` (per fused_graph_contract; its weights in a data file beside
    it above the external-data threshold: export/external_data.py).

    precision "fp32", or "fp16" for CUDA: weights, activations and cache in float16 (the contrib ops
    accumulate norms and softmax in float32), logits cast to float32 for the sampler.
    scales (float32 only): an int8 cache quantized with these steps (CacheScales); None: a float cache.
    The rotary tables cover cfg.max_len positions, so a runtime cache may be at most that long.
    The file is checked by loading it in onnxruntime (check_loads), not with onnx.checker.
    """
    cfg = model.cfg
    _, np_dtype, elem = _precision(precision)
    weights = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    g = _Graph(np_dtype, WeightSpool(Path(path)))  # weights go to disk as they are made (export/external_data.py)
    contract = fused_graph_contract(cfg, precision, scales)
    if scales is not None:
        check_scales(cfg, scales)
    g.weight("embed.weight", weights["embed.weight"])
    for prefix, rotary in (("rotary", model.rotary), ("rotary_local", model.rotary_local)):
        if rotary is not None:
            cos, sin = rotary_caches(rotary, cfg.max_len)
            g.weight(f"{prefix}.cos_cache", cos)
            g.weight(f"{prefix}.sin_cache", sin)

    residual = g.op("Gather", "/embed/Gather", ["embed.weight", "input_ids"])[0]
    if cfg.embed_scale:
        # √dim rounded to the graph's float type first, as edgegpt.model.GPT.embed_tokens does
        scale = g.weight("embed.scale", np.array(np.float32(cfg.dim ** 0.5)))
        residual = g.op("Mul", "/embed/Mul", [residual, scale])[0]
    normed = first_norm(g, cfg, weights, residual)
    for i in range(cfg.n_layers):
        attn = attention(g, cfg, weights, i, normed, pack_qkv, scales)
        if cfg.post_norms:
            attn = plain_norm(g, cfg, weights, f"layers.{i}.post_attn_norm", attn)
        normed, residual = skip_norm(g, cfg, weights, f"layers.{i}.mlp_norm", attn, residual)
        mlp_out = mlp(g, cfg, weights, i, normed)
        if cfg.post_norms:
            mlp_out = plain_norm(g, cfg, weights, f"layers.{i}.post_mlp_norm", mlp_out)
        next_norm = f"layers.{i + 1}.attn_norm" if i + 1 < cfg.n_layers else "norm"
        normed, residual = skip_norm(g, cfg, weights, next_norm, mlp_out, residual)
    lm_head(g, cfg, weights, normed, cast_to_float32=elem != TensorProto.FLOAT)

    def value(name: str, spec: dict[str, Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _ELEM[spec["dtype"]], spec["shape"])

    graph = helper.make_graph(
        g.nodes, "edgegpt_fused",
        [value(n, s) for n, s in contract["inputs"].items()],
        [value(n, s) for n, s in contract["outputs"].items()],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgegpt", ir_version=MAX_IR_VERSION,
    )
    del graph
    move_initializers(g.initializers, proto.graph)
    check_graph_contract(proto, contract)
    path = Path(path)
    g.spool.save(proto)  # a large graph keeps its weights in model.onnx.data, a small one is one file
    del proto  # before onnxruntime loads its own copy
    check_self_contained(path)
    check_loads(path)


def first_norm(g: "_Graph", cfg: ModelConfig, weights: dict, x: str) -> str:
    """Layer 0's attention norm: the one RMSNorm with no residual add before it.

        /embed/Gather [B, S, dim] ─► SimplifiedLayerNormalization(scale = layers.0.attn_norm.weight) ─► [B, S, dim]

    stash_type=1 computes the statistics in float32 whatever the input type, as edgegpt.model.RMSNorm does.
    """
    return plain_norm(g, cfg, weights, "layers.0.attn_norm", x)


def plain_norm(g: "_Graph", cfg: ModelConfig, weights: dict, norm: str, x: str) -> str:
    """RMSNorm with no residual add: layer 0's input norm, and Gemma's norms of each branch's output
    (post_attn_norm, post_mlp_norm), whose result is what the skip norm after them adds to the residual."""
    layer, _, name = norm.rpartition(".")
    scope = f"/{layer}/{name}" if layer else f"/{name}"  # /layers.0/attn_norm
    scale = g.weight(f"{norm}.weight", weights[f"{norm}.weight"])
    return g.op(
        "SimplifiedLayerNormalization", f"{scope}/SimplifiedLayerNormalization", [x, scale],
        epsilon=cfg.norm_eps, axis=-1, stash_type=1,
    )[0]


def attention(g: "_Graph", cfg: ModelConfig, weights: dict, layer: int, x: str, pack_qkv: bool,
              scales: CacheScales | None = None) -> str:
    """Layer `layer`'s attention; returns its output [B, S, dim] before the residual add.

        x [B, S, dim] ─┬─► q_proj/MatMul ─► [B, S, H·D]   ─┐
                       ├─► k_proj/MatMul ─► [B, S, Hkv·D] ─┼─► GroupQueryAttention ─► [B, S, H·D] ─► o_proj/MatMul
                       └─► v_proj/MatMul ─► [B, S, Hkv·D] ─┘   (rotary, causal mask, GQA, softmax inside)
        packed:   x ─► qkv_proj/MatMul ─► [B, S, (H + 2·Hkv)·D] ─► GroupQueryAttention(query only)
        cfg.qkv_bias (Qwen2): each MatMul above is followed by {q,k,v,qkv}_proj/Add(bias), before the rotary
        cfg.qk_norm (Qwen3): query and key each RMS-normed per head before GroupQueryAttention (head_norm);
        packed, qkv_proj/Split first hands GroupQueryAttention three inputs

        GroupQueryAttention's other inputs: past_key.{i} / past_value.{i} [B, Hkv, max_length, D] (the
        runtime binds the same buffers as present_key.{i} / present_value.{i}), seqlens_k [B],
        total_sequence_length [], rotary.cos_cache / rotary.sin_cache [max_len, D/2].
        int8 cache (scales): past/present int8, inputs 12-13 layers.{i}.attn.k_scale / v_scale (float32,
        CacheScales), attributes k_quant_type = v_quant_type = scales.quant_type, kv_cache_bit_width 8;
        inputs 9-11 (position_ids, attention_bias, head_sink) stay empty. The op quantizes the new K
        (after its rotary) and V as it writes them and reads the cache through the scales.
    """
    prefix, scope = f"layers.{layer}.attn", f"/layers.{layer}/attn"
    q, k, v = (weights[f"{prefix}.{p}_proj.weight"].T for p in "qkv")
    biases = [weights[f"{prefix}.{p}_proj.bias"] for p in "qkv"] if cfg.qkv_bias else None

    def project(name: str, w: np.ndarray, bias: np.ndarray | None) -> str:
        out = g.op("MatMul", f"{scope}/{name}/MatMul", [x, g.weight(f"{prefix}.{name}.weight", w)])[0]
        if bias is None:
            return out
        # A separate Add (not a Gemm or a bias input): GroupQueryAttention takes none, and the quantizers
        # find the MatMul and its initializer exactly as in a model without biases.
        return g.op("Add", f"{scope}/{name}/Add", [out, g.weight(f"{prefix}.{name}.bias", bias)])[0]

    if pack_qkv:
        packed_bias = None if biases is None else np.concatenate(biases)
        projected = [project("qkv_proj", np.concatenate([q, k, v], axis=1), packed_bias), "", ""]
        if cfg.qk_norm:
            widths = g.constant("qkv_split", np.array([q.shape[1], k.shape[1], v.shape[1]], np.int64))
            outputs = [f"{scope}/qkv_proj/Split_output_{n}" for n in range(3)]
            projected = g.op("Split", f"{scope}/qkv_proj/Split", [projected[0], widths], outputs=outputs, axis=-1)
    else:
        projected = [project(name, w, b) for name, w, b in zip(("q_proj", "k_proj", "v_proj"), (q, k, v),
                                                                biases or (None, None, None))]
    if cfg.qk_norm:
        projected[0] = head_norm(g, cfg, weights, f"{prefix}.q_norm", projected[0])
        projected[1] = head_norm(g, cfg, weights, f"{prefix}.k_norm", projected[1])
    past = [KV_NAMES["past_key"].format(layer=layer), KV_NAMES["past_value"].format(layer=layer)]
    present = [KV_NAMES["present_key"].format(layer=layer), KV_NAMES["present_value"].format(layer=layer)]
    sliding = cfg.is_sliding(layer)
    rotary = "rotary_local" if sliding and cfg.local_rotary else "rotary"
    inputs = [*projected, *past, "seqlens_k", "total_sequence_length", f"{rotary}.cos_cache", f"{rotary}.sin_cache"]
    # Gemma's score scale and soft-cap, and a sliding layer's window, are the op's attributes. local_window_size
    # is the number of keys a query sees, its own included, as cfg.sliding_window (measured: one less hides the
    # oldest key of the window, tests/test_families.py); sliding_window_cache lets a sliding layer's buffer be
    # window-sized (the op evicts what falls out of the window itself: runtime/kv_cache.py).
    options: dict[str, Any] = {}
    if cfg.query_pre_attn_scalar is not None:
        options["scale"] = float(cfg.query_pre_attn_scalar ** -0.5)
    if cfg.attn_softcap is not None:
        options["softcap"] = float(cfg.attn_softcap)
    if sliding:
        options.update(local_window_size=cfg.sliding_window, sliding_window_cache=1)
    quantized: dict[str, Any] = {}
    if scales is not None:
        k_scale, v_scale = (g.float32(SCALE_NAMES[kind].format(layer=layer), getattr(scales, kind)[layer])
                            for kind in "kv")
        inputs += ["", "", "", k_scale, v_scale]
        quantized = dict(k_quant_type=scales.quant_type, v_quant_type=scales.quant_type,
                         kv_cache_bit_width=KV_CACHE_BITS)
    out = g.op(
        "GroupQueryAttention", f"{scope}/GroupQueryAttention", inputs,
        outputs=[f"{scope}/GroupQueryAttention_output_0", *present], domain=MS_DOMAIN,
        num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, do_rotary=1, rotary_interleaved=0, **options,
        **quantized,
    )[0]
    o = g.weight(f"{prefix}.o_proj.weight", weights[f"{prefix}.o_proj.weight"].T)
    return g.op("MatMul", f"{scope}/o_proj/MatMul", [out, o])[0]


def head_norm(g: "_Graph", cfg: ModelConfig, weights: dict, norm: str, x: str) -> str:
    """Qwen3's per-head RMSNorm of the queries or keys, one weight [D] shared by every head.

        x [B, S, heads·D] ─► Reshape [B, S, heads, D] ─► SimplifiedLayerNormalization(scale = {norm}.weight, axis -1)
                          ─► Reshape [B, S, heads·D] ─► GroupQueryAttention (which applies the rotary after it)

    Spelled out rather than given to GroupQueryAttention's q_norm_weight / k_norm_weight inputs: onnxruntime
    1.32 honours those on CUDA and WebGPU only, and its CPU kernel rejects them (the op's schema says so).
    The schema names this Reshape → SimplifiedLayerNormalization → Reshape stack as the Qwen3 form that its
    graph fusion folds into those inputs where they are honoured.
    """
    scope = "/" + norm.replace(".attn.", "/attn/")
    heads = g.op("Reshape", f"{scope}/Reshape", [x, g.constant("head_shape", np.array([0, 0, -1, cfg.head_dim]))])[0]
    normed = g.op(
        "SimplifiedLayerNormalization", f"{scope}/SimplifiedLayerNormalization",
        [heads, g.weight(f"{norm}.weight", weights[f"{norm}.weight"])], epsilon=cfg.norm_eps, axis=-1, stash_type=1,
    )[0]
    return g.op("Reshape", f"{scope}/Reshape_1", [normed, g.constant("flat_heads_shape", np.array([0, 0, -1]))])[0]


def skip_norm(g: "_Graph", cfg: ModelConfig, weights: dict, norm: str, x: str, residual: str) -> tuple[str, str]:
    """residual + x, then RMSNorm: returns (normed, the new residual).

        x ────────┐
                  ├─► SkipSimplifiedLayerNormalization(gamma = {norm}.weight) ─► output 0: RMSNorm(residual + x)
        residual ─┘                                                           └─► output 3: residual + x
    """
    scope = "/" + norm.replace(".attn_norm", "/attn_norm").replace(".mlp_norm", "/mlp_norm")
    gamma = g.weight(f"{norm}.weight", weights[f"{norm}.weight"])
    name = f"{scope}/SkipSimplifiedLayerNormalization"
    outputs = [f"{name}_output_0", "", "", f"{name}_output_3"]
    normed, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization", name, [x, residual, gamma], outputs=outputs, domain=MS_DOMAIN,
        epsilon=cfg.norm_eps,
    )
    return normed, total


def mlp(g: "_Graph", cfg: ModelConfig, weights: dict, layer: int, x: str) -> str:
    """SwiGLU: down(silu(gate(x)) · up(x)), silu(a) = a · sigmoid(a).

        x ─┬─► gate_proj/MatMul ─► a ─► act/Sigmoid ─► act/Mul(a, ·) ─┐
           └─► up_proj/MatMul ──────────────────────────────────────── Mul ─► down_proj/MatMul

    Plain Sigmoid·Mul rather than a contrib op: opset 20 has no Swish, and onnxruntime fuses this pair
    into QuickGelu(alpha=1) = a·sigmoid(a) itself when it loads the graph (seen in its optimized graph),
    so emitting the portable form costs nothing. Gemma's GELU (tanh form) is ONNX's own Gelu (opset 20),
    act/Gelu(approximate="tanh"), in place of the pair.
    """
    prefix, scope = f"layers.{layer}.mlp", f"/layers.{layer}/mlp"

    def proj(name: str, inp: str) -> str:
        w = g.weight(f"{prefix}.{name}.weight", weights[f"{prefix}.{name}.weight"].T)
        return g.op("MatMul", f"{scope}/{name}/MatMul", [inp, w])[0]

    gate = proj("gate_proj", x)
    if cfg.activation == "gelu_tanh":
        activated = g.op("Gelu", f"{scope}/act/Gelu", [gate], approximate="tanh")[0]
    else:
        activated = g.op("Mul", f"{scope}/act/Mul", [gate, g.op("Sigmoid", f"{scope}/act/Sigmoid", [gate])[0]])[0]
    gated = g.op("Mul", f"{scope}/Mul", [activated, proj("up_proj", x)])[0]
    return proj("down_proj", gated)


def lm_head(g: "_Graph", cfg: ModelConfig, weights: dict, x: str, cast_to_float32: bool) -> None:
    """The LM head on the [vocab, dim] weight as PyTorch holds it, x times its transpose:

        float32: x [B, S, dim] ─► /lm_head/FusedMatMul(W [vocab, dim], transB=1) ─► logits [B, S, vocab]
                 W is embed.weight itself when the embedding is tied (the Gather's table), else lm_head.weight
        float16: x ─► /lm_head/MatMul(lm_head.weight [dim, vocab], a transposed copy) ─► /lm_head/Cast ─► float32

    A float32 graph stores a tied table once: no transposed copy in the file, none to write at export or to
    read back when the head is quantized (MatMulNBits wants [vocab, dim] anyway), and the export's float32
    check holds the weights once (a 262k vocabulary's table is 671 MB at Gemma's width). FusedMatMul is
    onnxruntime's CPU contrib op (float32 fused packages run on the CPU); its kernel packs the transposed
    weight at load as MatMul's does. float16 graphs, for CUDA, keep ONNX's own MatMul on a stored copy.
    """
    head = weights.get("lm_head.weight", weights["embed.weight"])
    softcap = cfg.final_softcap
    last = not cast_to_float32 and softcap is None  # the product is the graph's logits
    outputs = ["logits"] if last else None
    if cast_to_float32:
        w = g.weight("lm_head.weight", np.ascontiguousarray(head.T))
        logits = g.op("MatMul", "/lm_head/MatMul", [x, w], outputs=outputs)[0]
    else:
        w = "embed.weight" if cfg.tie_embeddings else g.weight("lm_head.weight", head)
        logits = g.op("FusedMatMul", "/lm_head/FusedMatMul", [x, w], outputs=outputs, domain=MS_DOMAIN, transB=1)[0]
    if softcap is not None:  # cap · tanh(logits / cap), as edgegpt.model.GPT.logits
        cap = g.weight("lm_head.softcap", np.array(softcap, np.float32))
        squashed = g.op("Tanh", "/lm_head/Tanh", [g.op("Div", "/lm_head/Div", [logits, cap])[0]])[0]
        logits = g.op("Mul", "/lm_head/Mul", [squashed, cap], outputs=None if cast_to_float32 else ["logits"])[0]
    if cast_to_float32:
        g.op("Cast", "/lm_head/Cast", [logits], outputs=["logits"], to=TensorProto.FLOAT)


def rotary_caches(rotary: torch.nn.Module, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, head_dim / 2] for every position, computed as edgegpt.model.Rotary does (fp32).

    GroupQueryAttention's rotate-half rotary (rotary_interleaved=0) takes half the angles: Rotary
    duplicates them with cat((freqs, freqs)), the op pairs dimension j with j + D/2 itself.
    """
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def scale_shape(cfg: ModelConfig, quant_type: str) -> tuple[int, ...]:
    """k_scale / v_scale's shape for `quant_type` (CacheScales)."""
    return (1,) if quant_type == "PER_TENSOR" else (1, cfg.n_kv_heads, 1, cfg.head_dim)


def check_scales(cfg: ModelConfig, scales: CacheScales) -> None:
    """Raise unless every layer has a finite, positive k and v step of the quant type's shape (a zero step
    would make onnxruntime quantize with 1.0 and dequantize to 0)."""
    shape = scale_shape(cfg, scales.quant_type)
    for kind in "kv":
        steps = getattr(scales, kind)
        if len(steps) != cfg.n_layers:
            raise ValueError(f"{kind} scales for {len(steps)} layers, the model has {cfg.n_layers}")
        for layer, step in enumerate(steps):
            step = np.asarray(step)
            if step.shape != shape or not np.all(np.isfinite(step)) or not np.all(step > 0):
                raise ValueError(f"layer {layer}'s {kind}_scale must be positive and finite, shaped {list(shape)}")


def check_graph_contract(proto: onnx.ModelProto, contract: dict[str, Any]) -> None:
    """Raise if the graph's inputs/outputs differ from the contract in name, order, dtype or shape
    (onnx_export.check_contract's check, for a graph whose cache may also be int8)."""
    for kind, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        found = {}
        for value in values:
            tensor = value.type.tensor_type
            found[value.name] = {"dtype": helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                                 "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}
        if found != contract[kind] or list(found) != list(contract[kind]):
            raise RuntimeError(f"the fused graph's {kind} do not match the package contract: {found}")


def check_loads(path: Path) -> None:
    """onnx.checker rejects SimplifiedLayerNormalization (onnxruntime registers it in the default domain,
    ONNX does not define it), so the check is that onnxruntime builds a session from the file."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the load is checked
    # No repacked copy of every weight beside the model the graph was built from: the session is thrown away.
    options.add_session_config_entry("session.disable_prepacking", "1")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Graph:
    """Nodes and initializers being collected; every weight is stored in the graph's precision."""

    def __init__(self, dtype: type, spool: WeightSpool | None = None) -> None:
        self.dtype = dtype
        self.spool = spool  # where the weights' bytes go (None: kept in the TensorProtos)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.float32(name, array, self.dtype)

    def constant(self, name: str, values: np.ndarray) -> str:
        """An int64 initializer (a shape, split widths) that every layer shares: stored the first time only."""
        if name not in {t.name for t in self.initializers}:
            self.float32(name, values, np.int64)
        return name

    def float32(self, name: str, array: np.ndarray, dtype: type = np.float32) -> str:
        """An initializer in `dtype` whatever the graph's precision (the int8 cache's scales are float32)."""
        array = np.ascontiguousarray(array, dtype=dtype)
        self.initializers.append(self.spool.tensor(array, name) if self.spool else numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, name: str, inputs: list[str], outputs: list[str] | None = None,
           domain: str = "", **attrs: Any) -> list[str]:
        outputs = outputs or [f"{name}_output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


_ELEM = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT,
         "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}


def _precision(precision: str) -> tuple[str, type, int]:
    if precision not in PRECISIONS:
        raise EdgeGPTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]
