"""The compact GPT: a Llama-compatible decoder in plain PyTorch.

    tokens ─► embed ─► N × [ RMSNorm ─► GQA attention with rotary ─► + ;  RMSNorm ─► SwiGLU MLP ─► + ]
                                                                       ─► RMSNorm ─► LM head (tied) ─► logits

No biases, except on the Q/K/V projections when cfg.qkv_bias is set (an imported Qwen2-family model).
Each other family difference is one config field, off by default (Llama): cfg.head_dim wider or narrower
than dim / n_heads, cfg.qk_norm (Qwen3: RMSNorm of each query and key head before the rotary), and
cfg.rope_scaling (Llama 3.x: slower rotary frequencies for long wavelengths, llama3_inverse_frequencies).
Gemma 3 turns on the rest: cfg.post_norms (a norm on each branch's output before its residual add),
cfg.activation "gelu_tanh", cfg.embed_scale (embeddings × √dim), cfg.query_pre_attn_scalar (the attention
scale), sliding-window layers (cfg.sliding_window, cfg.layer_types) with a rotary of their own
(cfg.rope_local_theta), and soft-capping (cfg.attn_softcap, cfg.final_softcap) where a config has it.
Gemma's (1 + w) norm weights are stored as that sum, so RMSNorm is the same module for every family.
For fine-tuning, GPT.forward also takes rows packed with several examples (documents: none attends to
another) and can recompute activations in the backward pass (gradient_checkpointing).

Every convention matches Hugging Face's `LlamaForCausalLM` (rotate-half rotary, KV head h // group
serving query head h, RMSNorm computed in fp32 and scaled after casting back), so weights convert
losslessly. This file is also the reference the ONNX graphs are tested against.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from edgegpt.core.config import ModelConfig, RopeScaling

# One layer's cache: (key, value), each [batch, n_kv_heads, past_len, head_dim], rotary already applied.
LayerCache = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics even under bf16 autocast: the mean of squares overflows/underflows otherwise.
        dtype = x.dtype
        x = x.float() if torch.finfo(dtype).bits < 32 else x  # (float64 stays float64: gradient checks)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> Tensor:
    """The rotary's angular speed per channel pair, [head_dim / 2] fp32: theta^(-2j / head_dim), then
    Llama 3's scaling when cfg.rope_scaling says so. local: the sliding layers' own rotary
    (cfg.rope_local_theta, never scaled)."""
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    if cfg.rope_scaling is not None and not local:
        inv_freq = llama3_inverse_frequencies(inv_freq, cfg.rope_scaling)
    return inv_freq


def llama3_inverse_frequencies(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.x's frequencies (`rope_type: llama3`), as Hugging Face computes them.

    A pair whose wavelength 2π / inv_freq fits original_max_len / high_freq_factor times into the original
    context turns fast enough to be left alone; one whose wavelength is longer than original_max_len /
    low_freq_factor never completed a turn in training, so it is slowed `factor` times to stretch over the
    longer context. In between, the two are blended linearly in original_max_len / wavelength.
    """
    wavelength = 2 * math.pi / inv_freq
    turns = scaling.original_max_len / wavelength  # full turns over the original context
    # 0 at low_freq_factor turns or fewer (fully slowed), 1 at high_freq_factor or more (kept)
    keep = ((turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - keep) * inv_freq / scaling.factor + keep * inv_freq


class Rotary(nn.Module):
    """cos/sin for rotary position embedding, computed from positions (not a table) in fp32."""

    def __init__(self, cfg: ModelConfig, local: bool = False) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(cfg, local), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, S] -> cos, sin [B, 1, S, head_dim], broadcast over heads."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Gemma scales the scores by query_pre_attn_scalar^-1/2; everyone else by head_dim^-1/2 (SDPA's default).
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_softcap
        # Q/K/V biases only for an imported Qwen2-family model (cfg.qkv_bias); o_proj never has one.
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Qwen3 (cfg.qk_norm): each head's query and key RMS-normed over head_dim, one weight shared by heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: LayerCache | None
    ) -> tuple[Tensor, LayerCache]:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # cos/sin are computed in fp32; cast like Hugging Face does, or bf16 q/k would silently become fp32.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # query head h reads KV head h // group, as in Hugging Face's repeat_kv
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            # Training (no mask, no cache) takes SDPA's fused causal path; with a cache the mask is explicit.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1)), present


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                         cap: float) -> Tensor:
    """Attention whose scores are squashed to (-cap, cap) by cap · tanh(scores / cap) before the mask and
    softmax (Gemma 2's form), spelled out because SDPA has no soft-capping."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = causal_mask(q.shape[2], q.device, scores.dtype)
    scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def causal_mask(length: int, device: torch.device, dtype: torch.dtype, window: int | None = None) -> Tensor:
    """An additive [1, 1, T, T] mask: 0 where query i may see key j (j <= i, and i - j < window when the layer
    slides), the dtype's lowest value elsewhere."""
    query, key = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def packed_masks(documents: Tensor, dtype: torch.dtype, window: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """For rows of packed examples (GPT.forward's documents [B, T]): each token's position within its example,
    and the additive [B, 1, T, T] masks of the full and (window given) sliding layers, where query i sees key j
    when both are in the same example and j <= i (and i - j < window)."""
    B, T = documents.shape
    index = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    query, key = index[:, :, None], index[:, None, :]
    # Same label and no new example started between key and query: a repeated label later in the row is another example.
    allowed = (key <= query) & (positions[:, :, None] - positions[:, None, :] == query - key)

    def additive(allowed: Tensor) -> Tensor:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=documents.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    sliding = None if window is None else additive(allowed & (query - key < window))
    return positions, additive(allowed), sliding


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # SwiGLU (silu) for Llama and Qwen; GeGLU with GELU's tanh approximation for Gemma.
        self.act = F.silu if cfg.activation == "silu" else partial(F.gelu, approximate="tanh")
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # Gemma's norms of each branch's output, before its residual add.
        self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.post_norms else nn.Identity()
        self.post_mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.post_norms else nn.Identity()
        # Dropout on the residual branches only: attention-probability dropout cost 35% of CPU
        # throughput for no gain at this size.
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: LayerCache | None
    ) -> tuple[Tensor, LayerCache]:
        a, present = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + self.dropout(self.post_attn_norm(a))
        x = x + self.dropout(self.post_mlp_norm(self.mlp(self.mlp_norm(x))))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_dropout = nn.Dropout(dropout)
        self.rotary = Rotary(cfg)
        # Gemma 3's sliding layers turn at a base of their own (cfg.rope_local_theta).
        self.rotary_local = Rotary(cfg, local=True) if cfg.local_rotary else None
        self.layers = nn.ModuleList(Block(cfg, dropout) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Keep only each layer's input during the forward pass and recompute the rest in the backward pass:
        # activation memory for one layer instead of all, for about a third more compute (long sequences).
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds variance, so shrink the projections into it.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @classmethod
    def holding(cls, cfg: ModelConfig, weights: dict[str, Tensor], dropout: float = 0.0) -> "GPT":
        """A model whose parameters are `weights` themselves (as state_dict_for_saving names them, shapes
        checked by the caller): no random initialization and no second copy of the largest thing a loader
        holds. Built on the meta device; the rotary frequencies, which no checkpoint stores, are made after."""
        with torch.device("meta"):
            model = cls(cfg, dropout)
        model.load_state_dict(weights, strict=not cfg.tie_embeddings, assign=True)
        if cfg.tie_embeddings:  # assign replaced the embedding's parameter; the head shares it again
            model.lm_head.weight = model.embed.weight
        model.rotary = Rotary(cfg)
        model.rotary_local = Rotary(cfg, local=True) if cfg.local_rotary else None
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)  # nn.Linear's default is uniform noise, not a neutral start

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        if self.cfg.embed_scale:
            # √dim as a float32 scalar cast to the weights' dtype, as Gemma's reference rounds it (bf16: 25.25).
            x = x * torch.tensor(self.cfg.dim ** 0.5, dtype=torch.float32).to(x.dtype)
        return x

    def rotaries(self, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """cos, sin for each layer: the sliding layers' own when they have one."""
        full = self.rotary(positions)
        local = self.rotary_local(positions) if self.rotary_local is not None else full
        return [local if self.cfg.is_sliding(i) else full for i in range(self.cfg.n_layers)]

    def logits(self, x: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(x))
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def forward(self, input_ids: Tensor, documents: Tensor | None = None) -> Tensor:
        """Training and scoring: input_ids [B, T] -> logits [B, T, vocab], causal, no cache (documents: as
        hidden_states)."""
        return self.logits(self.hidden_states(input_ids, documents))

    def hidden_states(self, input_ids: Tensor, documents: Tensor | None = None) -> Tensor:
        """The last layer's output [B, T, dim], before the final norm and the LM head (self.logits), which a
        caller may run on some positions only.

        documents [B, T] (packed training rows, edgegpt.train.examples): which example each token belongs to,
        as a label that changes where the next example starts (padding is one more label). A token then
        attends only within its own example, and positions restart at each example's first token, so a
        packed row computes exactly what each example alone would."""
        B, T = input_ids.shape
        x = self.embed_dropout(self.embed_tokens(input_ids))
        if documents is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            # Full layers pass no mask (SDPA's causal path); a sliding layer needs its window spelled out.
            full, window = None, None
            if self.cfg.sliding_layers:
                window = causal_mask(T, input_ids.device, x.dtype, self.cfg.sliding_window)
        else:
            positions, full, window = packed_masks(documents, x.dtype, self.cfg.sliding_window
                                                   if self.cfg.sliding_layers else None)
        rotaries = self.rotaries(positions)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            mask = window if self.cfg.is_sliding(i) else full
            if checkpointed:  # activations recomputed in the backward pass (dropout's random state is replayed)
                # The whole layer is recomputed, its forward hooks too (early stop would end the recomputation
                # at its last saved tensor): LoRA's shared dropout masks are let go by such a hook.
                with set_checkpoint_early_stop(False):
                    x, _ = checkpoint(layer, x, *rotaries[i], mask, None, use_reentrant=False)
            else:
                x, _ = layer(x, *rotaries[i], mask, None)
        return x

    def forward_cached(
        self,
        input_ids: Tensor,
        past: list[LayerCache] | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[LayerCache]]:
        """Inference with an explicit KV cache.

        input_ids [B, S]; past: one (key, value) per layer, each [B, n_kv_heads, P, head_dim] (P may
        be 0); attention_mask [B, P + S] with 1 for real tokens and 0 for left padding (None: all 1).
        Returns logits [B, S, vocab] and the present cache, each [B, n_kv_heads, P + S, head_dim].
        Positions count real tokens only, so a left-padded row sees the same positions as unpadded.
        """
        B, S = input_ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, P + S, dtype=torch.long, device=input_ids.device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        rotaries = self.rotaries(positions)
        # Query i (absolute P + i) sees key j when j <= P + i and key j is not padding. A padded query
        # row would see nothing and softmax to NaN; a large negative (not -inf) keeps it finite.
        query_pos = torch.arange(P, P + S, device=input_ids.device)[:, None]
        key_pos = torch.arange(P + S, device=input_ids.device)[None, :]
        allowed = (key_pos <= query_pos)[None] & attention_mask.bool()[:, None, :]
        x = self.embed_tokens(input_ids)

        def additive(allowed: Tensor) -> Tensor:
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            return mask.masked_fill(~allowed, torch.finfo(x.dtype).min)[:, None]

        mask = additive(allowed)
        if self.cfg.sliding_layers:
            # Left padding shifts a row's indices and positions alike, so the window can be measured in indices.
            window = additive(allowed & (query_pos - key_pos < self.cfg.sliding_window)[None])
        present = []
        for i, layer in enumerate(self.layers):
            layer_mask = window if self.cfg.is_sliding(i) else mask
            x, layer_present = layer(x, *rotaries[i], layer_mask, None if past is None else past[i])
            present.append(layer_present)
        return self.logits(x), present

    def empty_cache(self, batch: int = 1) -> list[LayerCache]:
        shape = (batch, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        p = self.embed.weight
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def state_dict_for_saving(model: GPT) -> dict[str, Tensor]:
    """Weights to write: the tied LM head is the embedding, so it is stored once."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd
