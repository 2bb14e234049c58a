"""The fused graph, emitted directly from the weights with onnx.helper (kv_layout "static").

    input_ids ─► /embed/Gather ─► /layers.0/attn_norm/SimplifiedLayerNormalization
      ─► per layer i:  attention (GroupQueryAttention, cache in place)  ─► SkipSimplifiedLayerNormalization
                       SwiGLU MLP                                        ─► SkipSimplifiedLayerNormalization
      ─► /norm/SkipSimplifiedLayerNormalization ─► /lm_head/MatMul ─► logits

Why emitted rather than rewritten from the torch.onnx graph (../shared/ONNX-NOTES.md): onnxscript's
rewriter only fuses GroupQueryAttention for old Hugging Face idioms, drops the mask and grows the cache;
emitting is exact, short and the fastest measured. The plain torch.onnx graph stays the oracle: the tests
hold this graph to it (tests/test_fused.py).

Each residual add is folded into the next norm: SkipSimplifiedLayerNormalization returns the normed sum
(output 0) and the sum itself (output 3), which is the residual stream the layer after it adds to.

Node names are module paths (`/layers.3/attn/GroupQueryAttention`); initializers are named after the
PyTorch parameters (`layers.3.attn.q_proj.weight`), with MatMul weights stored as [in, out], the
transpose of nn.Linear's [out, in], because MatMul multiplies x @ W.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.export.onnx_export import KV_NAMES, MAX_IR_VERSION, OPSET, check_contract, check_self_contained
from edgegpt.model import GPT

PRECISIONS = {"fp32": ("float32", np.float32, TensorProto.FLOAT), "fp16": ("float16", np.float16, TensorProto.FLOAT16)}
# com.microsoft opset 1 holds GroupQueryAttention and SkipSimplifiedLayerNormalization.
MS_DOMAIN = "com.microsoft"

# Q, K and V as one packed [dim, (H + 2·Hkv)·D] MatMul feeding GroupQueryAttention's packed-QKV form
# rather than three MatMuls: one pass over the normed activations and one kernel launch instead of three.
# Measured 2026-11-28 on this 2-core machine (shared, so medians of interleaved runs), `small` with
# random weights, batch 1, past 100, 2 threads, Generator.decode_step: packed 3.27 / 3.39 ms per step,
# separate 3.58 / 3.60 ms (two runs) -- packed ~7% faster, so it is the default.
PACK_QKV = True


def fused_graph_contract(cfg: ModelConfig, precision: str = "fp32") -> dict[str, Any]:
    """The fused graph's inputs and outputs (the `graph` block of config.json, docs/FORMATS.md)."""
    dtype = _precision(precision)[0]
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
    return {"kv_layout": "static", "dtype": dtype, "inputs": inputs, "outputs": outputs, **KV_NAMES}


def build_fused_graph(model: GPT, path: Path, precision: str = "fp32", *, pack_qkv: bool = PACK_QKV) -> None:
    """Write the fused graph of `model` to `path` (one self-contained file, per fused_graph_contract).

    precision "fp32", or "fp16" for CUDA: weights, activations and cache in float16 (the contrib ops
    accumulate norms and softmax in float32), logits cast to float32 for the sampler.
    The rotary tables cover cfg.max_len positions, so a runtime cache may be at most that long.
    The file is checked by loading it in onnxruntime (check_loads), not with onnx.checker.
    """
    cfg = model.cfg
    _, np_dtype, elem = _precision(precision)
    weights = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    g = _Graph(np_dtype)
    contract = fused_graph_contract(cfg, precision)
    g.weight("embed.weight", weights["embed.weight"])
    cos, sin = rotary_caches(model)
    g.weight("rotary.cos_cache", cos)
    g.weight("rotary.sin_cache", sin)

    residual = g.op("Gather", "/embed/Gather", ["embed.weight", "input_ids"])[0]
    normed = first_norm(g, cfg, weights, residual)
    for i in range(cfg.n_layers):
        attn = attention(g, cfg, weights, i, normed, pack_qkv)
        normed, residual = skip_norm(g, cfg, weights, f"layers.{i}.mlp_norm", attn, residual)
        mlp_out = mlp(g, weights, i, normed)
        next_norm = f"layers.{i + 1}.attn_norm" if i + 1 < cfg.n_layers else "norm"
        normed, residual = skip_norm(g, cfg, weights, next_norm, mlp_out, residual)
    lm_head(g, weights, normed, cast_to_float32=elem != TensorProto.FLOAT)

    def value(name: str, spec: dict[str, Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _ELEM[spec["dtype"]], spec["shape"])

    graph = helper.make_graph(
        g.nodes, "edgegpt_fused",
        [value(n, s) for n, s in contract["inputs"].items()],
        [value(n, s) for n, s in contract["outputs"].items()],
        initializer=g.initializers,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgegpt", ir_version=MAX_IR_VERSION,
    )
    check_contract(proto, contract)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    check_self_contained(path)
    check_loads(path)


def first_norm(g: "_Graph", cfg: ModelConfig, weights: dict, x: str) -> str:
    """Layer 0's attention norm: the one RMSNorm with no residual add before it.

        /embed/Gather [B, S, dim] ─► SimplifiedLayerNormalization(scale = layers.0.attn_norm.weight) ─► [B, S, dim]

    stash_type=1 computes the statistics in float32 whatever the input type, as edgegpt.model.RMSNorm does.
    """
    scale = g.weight("layers.0.attn_norm.weight", weights["layers.0.attn_norm.weight"])
    return g.op(
        "SimplifiedLayerNormalization", "/layers.0/attn_norm/SimplifiedLayerNormalization", [x, scale],
        epsilon=cfg.norm_eps, axis=-1, stash_type=1,
    )[0]


def attention(g: "_Graph", cfg: ModelConfig, weights: dict, layer: int, x: str, pack_qkv: bool) -> str:
    """Layer `layer`'s attention; returns its output [B, S, dim] before the residual add.

        x [B, S, dim] ─┬─► q_proj/MatMul ─► [B, S, H·D]   ─┐
                       ├─► k_proj/MatMul ─► [B, S, Hkv·D] ─┼─► GroupQueryAttention ─► [B, S, H·D] ─► o_proj/MatMul
                       └─► v_proj/MatMul ─► [B, S, Hkv·D] ─┘   (rotary, causal mask, GQA, softmax inside)
        packed:   x ─► qkv_proj/MatMul ─► [B, S, (H + 2·Hkv)·D] ─► GroupQueryAttention(query only)
        cfg.qkv_bias (Qwen2): each MatMul above is followed by {q,k,v,qkv}_proj/Add(bias), before the rotary

        GroupQueryAttention's other inputs: past_key.{i} / past_value.{i} [B, Hkv, max_length, D] (the
        runtime binds the same buffers as present_key.{i} / present_value.{i}), seqlens_k [B],
        total_sequence_length [], rotary.cos_cache / rotary.sin_cache [max_len, D/2].
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
    else:
        projected = [project(name, w, b) for name, w, b in zip(("q_proj", "k_proj", "v_proj"), (q, k, v),
                                                                biases or (None, None, None))]
    past = [KV_NAMES["past_key"].format(layer=layer), KV_NAMES["past_value"].format(layer=layer)]
    present = [KV_NAMES["present_key"].format(layer=layer), KV_NAMES["present_value"].format(layer=layer)]
    out = g.op(
        "GroupQueryAttention", f"{scope}/GroupQueryAttention",
        [*projected, *past, "seqlens_k", "total_sequence_length", "rotary.cos_cache", "rotary.sin_cache"],
        outputs=[f"{scope}/GroupQueryAttention_output_0", *present], domain=MS_DOMAIN,
        num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, do_rotary=1, rotary_interleaved=0,
    )[0]
    o = g.weight(f"{prefix}.o_proj.weight", weights[f"{prefix}.o_proj.weight"].T)
    return g.op("MatMul", f"{scope}/o_proj/MatMul", [out, o])[0]


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


def mlp(g: "_Graph", weights: dict, layer: int, x: str) -> str:
    """SwiGLU: down(silu(gate(x)) · up(x)), silu(a) = a · sigmoid(a).

        x ─┬─► gate_proj/MatMul ─► a ─► act/Sigmoid ─► act/Mul(a, ·) ─┐
           └─► up_proj/MatMul ──────────────────────────────────────── Mul ─► down_proj/MatMul

    Plain Sigmoid·Mul rather than a contrib op: opset 20 has no Swish, and onnxruntime fuses this pair
    into QuickGelu(alpha=1) = a·sigmoid(a) itself when it loads the graph (seen in its optimized graph),
    so emitting the portable form costs nothing.
    """
    prefix, scope = f"layers.{layer}.mlp", f"/layers.{layer}/mlp"

    def proj(name: str, inp: str) -> str:
        w = g.weight(f"{prefix}.{name}.weight", weights[f"{prefix}.{name}.weight"].T)
        return g.op("MatMul", f"{scope}/{name}/MatMul", [inp, w])[0]

    gate = proj("gate_proj", x)
    silu = g.op("Mul", f"{scope}/act/Mul", [gate, g.op("Sigmoid", f"{scope}/act/Sigmoid", [gate])[0]])[0]
    gated = g.op("Mul", f"{scope}/Mul", [silu, proj("up_proj", x)])[0]
    return proj("down_proj", gated)


def lm_head(g: "_Graph", weights: dict, x: str, cast_to_float32: bool) -> None:
    """The LM head as its own MatMul on a [dim, vocab] initializer named lm_head.weight.

        x [B, S, dim] ─► /lm_head/MatMul(lm_head.weight [dim, vocab]) ─► logits [B, S, vocab]
                                                              (fp16: ─► /lm_head/Cast ─► float32 logits)

    With tied embeddings the file stores the [vocab, dim] embedding for the Gather AND this transposed
    copy, rather than MatMul(x, Transpose(embed.weight)):
    - the quantizers (quantize_dynamic, MatMulNBitsQuantizer) only touch a MatMul whose weight is an
      initializer; with a stored copy every quantizer reaches the head with no pre-pass to remember;
    - running costs nothing more: onnxruntime constant-folds Transpose(embed.weight) into exactly such
      a [dim, vocab] initializer when it loads the graph (seen in its optimized graph), so the session
      holds both either way and the two forms run the same graph;
    - the price is file size only, vocab·dim·4 bytes: +14% on `small`'s fp32 file, +8% on `nano`'s.
      A quantized package pays nothing extra (it needs the float embedding and the quantized head).
    """
    head = weights.get("lm_head.weight", weights["embed.weight"])
    w = g.weight("lm_head.weight", np.ascontiguousarray(head.T))
    if cast_to_float32:
        logits = g.op("MatMul", "/lm_head/MatMul", [x, w])[0]
        g.op("Cast", "/lm_head/Cast", [logits], outputs=["logits"], to=TensorProto.FLOAT)
    else:
        g.op("MatMul", "/lm_head/MatMul", [x, w], outputs=["logits"])


def rotary_caches(model: GPT) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, head_dim / 2] for every position, computed as edgegpt.model.Rotary does (fp32).

    GroupQueryAttention's rotate-half rotary (rotary_interleaved=0) takes half the angles: Rotary
    duplicates them with cat((freqs, freqs)), the op pairs dimension j with j + D/2 itself.
    """
    positions = torch.arange(model.cfg.max_len, dtype=torch.float32)
    freqs = positions[:, None] * model.rotary.inv_freq.float()[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def check_loads(path: Path) -> None:
    """onnx.checker rejects SimplifiedLayerNormalization (onnxruntime registers it in the default domain,
    ONNX does not define it), so the check is that onnxruntime builds a session from the file."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the load is checked
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Graph:
    """Nodes and initializers being collected; every weight is stored in the graph's precision."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=self.dtype), name))
        return name

    def op(self, op_type: str, name: str, inputs: list[str], outputs: list[str] | None = None,
           domain: str = "", **attrs: Any) -> list[str]:
        outputs = outputs or [f"{name}_output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


_ELEM = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT,
         "float16": TensorProto.FLOAT16}


def _precision(precision: str) -> tuple[str, type, int]:
    if precision not in PRECISIONS:
        raise EdgeGPTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]
