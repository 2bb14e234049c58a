"""`edgegpt convert FILE.gguf`: tiny GGUF files written here with gguf's own writer, in every tensor type
edgegpt reads, convert to checkpoints whose weights and logits equal the reference; the tokenizer rebuilt
from the metadata encodes as the original; every bad file is one line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from typer.testing import CliRunner

from edgegpt.checkpoint import load_checkpoint
from edgegpt.cli.app import app
from edgegpt.convert import convert
from edgegpt.convert.gguf import unpermute_from_gguf
from edgegpt.convert.gguf_tokenizer import GPT2_PATTERN, LLAMA3_PATTERN
from edgegpt.core.config import ModelConfig, RopeScaling
from edgegpt.core.errors import EdgeGPTError
from edgegpt.model import GPT

gguf = pytest.importorskip("gguf", reason="gguf is in the [convert] and [dev] extras")
Q = gguf.GGMLQuantizationType
runner = CliRunner()

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # control tokens, ids 0-2
USER_DEFINED = "<think>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEST_STRINGS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right; they'll see we've done it.",
    "In 2024, 12345 people paid $1,000.50 each (3.14159%).",
    "def square(x):\n    return x ** 2  # fast\n\n\tindented\r\nwindows",
    "café naïve Straße 日本語のテキスト emoji 🎉🚀 ½ ² ٣",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>4</think><|im_end|>",
    "text<|endoftext|>more text",
    "",
]


# -- writing GGUF files the way llama.cpp's converter does ---------------------------------------------------

# llama.cpp's GGUF names for edgegpt's parameters (what its converter writes for a Llama model).
GGUF_NAMES = {
    "embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "attn_norm.weight": "attn_norm.weight", "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "attn.q_proj.bias": "attn_q.bias", "attn.k_proj.bias": "attn_k.bias", "attn.v_proj.bias": "attn_v.bias",
    "mlp_norm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[name]


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def encode_q4_k(x: np.ndarray, bits: int = 4) -> np.ndarray:
    """K-quant blocks (Q4_K, or Q5_K with bits=5) for rows of 256 values; gguf 0.19 can only dequantize these.

    Per block: fp16 d and dmin, 8 sub-blocks of 32 with a 6-bit scale and min each, value = d·sc·q - dmin·m.
    Scales are rounded up so every sub-block's range fits (no clipping): simpler than llama.cpp's search
    and within one step of the values."""
    n, levels = x.shape[0], (1 << bits) - 1
    sub = x.reshape(n, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(-1), 0)
    dmin = _f16((-low).max(-1, keepdims=True) / 63 + 1e-12).astype(np.float32)
    m = np.clip(np.ceil(-low / dmin), 0, 63)
    need = (sub.max(-1) + dmin * m) / levels
    d = _f16(need.max(-1, keepdims=True) / 63 * 1.001 + 1e-12).astype(np.float32)
    sc = np.clip(np.ceil(need / d), 1, 63)
    q = np.clip(np.round((sub + (dmin * m)[..., None]) / (d * sc)[..., None]), 0, levels).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    low4 = (q & 15).reshape(n, 4, 2, 32)
    qs = (low4[:, :, 0] | (low4[:, :, 1] << 4)).reshape(n, 128)
    head = [_f16(d).view(np.uint8), _f16(dmin).view(np.uint8), scales]
    if bits == 5:
        high = ((q >> 4) & 1).astype(np.uint8)  # [n, 8 sub-blocks, 32]: bit j of qh[i] is sub-block j's
        qh = np.zeros((n, 32), np.uint8)
        for j in range(8):
            qh |= high[:, j] << j
        head.append(qh)
    return np.concatenate([*head, qs], axis=1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks for rows of 256 values: 16 sub-blocks of 16 with an int8 scale, value = d·scale·(q - 32)."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16).astype(np.float32)
    step = np.abs(sub).max(-1) / 31 + 1e-12
    d = _f16(step.max(-1, keepdims=True) / 127 * 1.001 + 1e-12).astype(np.float32)
    scale = np.clip(np.ceil(step / d), 1, 127)
    q = (np.clip(np.round(sub / (d * scale)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    low = (q & 15).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, scale.astype(np.int8).view(np.uint8), _f16(d).view(np.uint8)], axis=1)


IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def encode_iq4_nl(x: np.ndarray) -> np.ndarray:
    """IQ4_NL blocks for rows of 32 values: an fp16 scale and a 4-bit index per value into a fixed non-uniform
    table, value = d·table[q]; low nibbles hold values 0-15, high nibbles 16-31. The nearest level, with the
    scale that maps the largest magnitude onto the table's end (no search, as llama.cpp does)."""
    n = x.shape[0]
    blocks = x.reshape(n, 32).astype(np.float32)
    peak = blocks[np.arange(n), np.abs(blocks).argmax(-1)]
    d = _f16(peak / -127 + 1e-12).astype(np.float32)[:, None]  # the peak lands on -127, the widest level
    q = np.abs(blocks[..., None] - d[..., None] * IQ4_LEVELS).argmin(-1).astype(np.uint8)
    return np.concatenate([_f16(d).view(np.uint8), q[:, :16] | (q[:, 16:] << 4)], axis=1)


# Types gguf 0.19 can only dequantize and whose encoders would be long (Q2_K, Q3_K, IQ4_XS): the blocks are
# random bytes, except the fp16 scale fields (byte offsets in a block), which are set so that the weights
# have the spread of the originals. The property tested is the same: the checkpoint holds gguf's reading
# of the file's bytes.
RANDOM_BLOCK_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_XS: (0,)}


def random_blocks(x: np.ndarray, qtype: Q) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(zlib.crc32(x.tobytes()))  # the same weights give the same bytes
    blocks = rng.integers(0, 256, (x.size // block_size, type_size), dtype=np.uint8)
    for scale in (np.float16(1.0), None):
        if scale is None:  # every value is linear in the scale fields: rescale to the originals' spread
            spread = gguf.quants.dequantize(blocks, qtype).std()
            scale = np.float16(x.std() / spread)
        for offset in RANDOM_BLOCK_SCALES[qtype]:
            blocks[:, offset:offset + 2] = np.full((len(blocks), 1), scale, np.float16).view(np.uint8)
    return blocks.reshape(x.shape[0], -1)


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """x [rows, cols] as the bytes (or floats) of a tensor of type qtype; every row on its own."""
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype in RANDOM_BLOCK_SCALES:
        return random_blocks(x, qtype)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL):
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        rows = x.reshape(-1, block_size)
        encode = {Q.Q6_K: encode_q6_k, Q.IQ4_NL: encode_iq4_nl, Q.Q4_K: encode_q4_k,
                  Q.Q5_K: lambda r: encode_q4_k(r, 5)}[qtype]
        return encode(rows).reshape(x.shape[0], -1)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """What convert_hf_to_gguf.py writes as rope_freqs.weight for `rope_type: llama3`: per rotary frequency,
    the factor it is divided by (written out again here, not taken from edgegpt or the converter)."""
    s = cfg.rope_scaling
    factors = []
    for freq in 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim):
        wavelength = 2 * math.pi / freq
        if wavelength < s.original_max_len / s.high_freq_factor:
            factors.append(1.0)
        elif wavelength > s.original_max_len / s.low_freq_factor:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(factors, np.float32)


def write_gguf(path: Path, model: GPT, tokenizer_meta: dict, qtype: Q = Q.F32, *, arch: str = "llama",
               skip: tuple[str, ...] = (), extra: dict | None = None, hyper: dict | None = None,
               rope_factors: np.ndarray | None = None) -> Path:
    """`model` as llama.cpp's converter writes it: Q/K rows permuted, 2-D weights in `qtype`, norms (and
    biases) in F32, the tied head left out, Llama 3's rotary factors as rope_freqs.weight (or `rope_factors`).
    `hyper` replaces hyperparameters (GGUFWriter.add_<key>) with values that may contradict the tensors."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    values = {"context_length": cfg.max_len, "embedding_length": cfg.dim, "block_count": cfg.n_layers,
              "feed_forward_length": cfg.ffn_dim, "head_count": cfg.n_heads, "head_count_kv": cfg.n_kv_heads,
              "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.norm_eps,
              "rope_dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size, **(hyper or {})}
    for key, value in values.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w, tokenizer_meta)
    for key, value in (extra or {}).items():
        {str: w.add_string, int: w.add_uint32, float: w.add_float32, bool: w.add_bool}[type(value)](key, value)
    for name, tensor in model.state_dict().items():
        if (cfg.tie_embeddings and name == "lm_head.weight") or gguf_name(name) in skip:
            continue
        t = tensor.detach().float()
        # Rows are quantized independently, so quantizing before permuting writes the bytes llama.cpp's
        # converter writes (which permutes first), and the test's reference can quantize in Hugging Face's order.
        data = torch.from_numpy(t.numpy() if t.dim() == 1 else quantize(t.numpy(), qtype))
        if ".q_proj." in name:
            data = permute_like_llama_cpp(data, cfg.n_heads)
        elif ".k_proj." in name:
            data = permute_like_llama_cpp(data, cfg.n_kv_heads)
        if t.dim() == 1:
            w.add_tensor(gguf_name(name), data.numpy())
        else:
            w.add_tensor(gguf_name(name), data.numpy(), raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    if rope_factors is None and cfg.rope_scaling is not None:
        rope_factors = llama3_rope_factors(cfg)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def permute_like_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out again here so the test does not take the
    converter's own code as its reference."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(w, meta: dict) -> None:
    w.add_tokenizer_model(meta.get("model", "gpt2"))
    if meta.get("pre") is not None:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    if meta.get("merges") is not None:
        w.add_token_merges(meta["merges"])
    if meta.get("scores") is not None:  # SentencePiece-style files
        w.add_token_scores(meta["scores"])
    if meta.get("add_space_prefix") is not None:
        w.add_add_space_prefix(meta["add_space_prefix"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("eot", w.add_eot_token_id),
                     ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        if meta.get(key) is not None:
            add(meta[key])
    if meta.get("add_bos", False) is not None:  # None: the file does not say
        w.add_add_bos_token(meta.get("add_bos", False))
    if meta.get("chat_template"):
        w.add_chat_template(meta["chat_template"])


def tokenizer_meta(tokenizer: Tokenizer, pre: str | None, **fields) -> dict:
    """What llama.cpp's converter stores for a Hugging Face tokenizer: tokens by id, "a b" merges, types."""
    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = {a["content"]: a["special"] for a in data["added_tokens"]}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, **fields}


# -- tokenizers to rebuild -----------------------------------------------------------------------------------


def byte_level(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer each kind's Hugging Face tokenizer.json holds (GPT-2, SmolLM2, Llama 3)."""
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_original(pre: str, corpus: str, vocab_size: int = 320, add_bos: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tokenizer.pre_tokenizer = byte_level(pre)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus], trainer)
    tokenizer.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|im_start|>:0 $A:0", pair="<|im_start|>:0 $A:0 <|im_start|>:1 $B:1",
            special_tokens=[("<|im_start|>", 1)])
    return tokenizer


@pytest.fixture(scope="module")
def corpus(corpus_text) -> str:
    return corpus_text[:60_000] + " 2024 12345 3.14159 café naïve 日本語 🎉 ½"


@pytest.fixture(scope="module")
def gpt2_tokenizer(corpus) -> Tokenizer:
    return train_original("gpt2", corpus)


def tiny_model(vocab_size: int, *, tied: bool = True, qkv_bias: bool = False, seed: int = 0, **fields) -> GPT:
    """dim 256 and ffn 512: every projection's rows are whole 256-value K-quant blocks. Weights large
    enough that the logits are not flat, so a misplaced row shows."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                                max_len=64, rope_theta=50000.0, norm_eps=1e-6, tie_embeddings=tied,
                                qkv_bias=qkv_bias), **fields})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


# -- Q/K permutation ---------------------------------------------------------------------------------------


def test_permutation_is_llama_cpp_interleave_and_round_trips():
    # Per head of 4 rows, llama.cpp's converter writes rows 0, 2, 1, 3 (halves interleaved).
    rows = torch.arange(8.0)  # 2 heads × head_dim 4
    assert permute_like_llama_cpp(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert unpermute_from_gguf(torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7]), 2).tolist() == rows.tolist()
    w = torch.randn(3 * 64, 40)
    assert torch.equal(unpermute_from_gguf(permute_like_llama_cpp(w, 3), 3), w)
    assert not torch.equal(permute_like_llama_cpp(w, 3), w)


# -- tensor types --------------------------------------------------------------------------------------------

# The largest relative error (Frobenius norm, per tensor) of each type's weights against the float
# originals, measured on these weights: F16 2.1e-4, BF16 1.7e-3, Q8_0 5.4e-3, Q6_K 2.0e-2, Q5_1 3.8e-2,
# Q5_K 4.0e-2, Q5_0 4.3e-2, Q4_1 7.9e-2, IQ4_NL 8.0e-2, Q4_K 8.1e-2 (the simple encoders above), Q4_0 8.6e-2;
# limits with headroom. A row out of place or a block read wrongly is an error of order 1. None: random
# blocks, which stand for no original. The logits are compared with the dequantized reference, exactly:
# on random weights a 4-bit model's logits differ from the float ones by whole units anyway.
TYPES = {Q.F32: 0.0, Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 8e-3, Q.Q4_0: 0.12, Q.Q4_1: 0.1, Q.Q5_0: 0.06,
         Q.Q5_1: 0.06, Q.Q2_K: None, Q.Q3_K: None, Q.Q4_K: 0.12, Q.Q5_K: 0.06, Q.Q6_K: 0.03, Q.IQ4_NL: 0.12,
         Q.IQ4_XS: None}


def test_every_supported_type_is_tested_and_dequantizable():
    from edgegpt.convert.gguf import SUPPORTED_TYPES

    assert sorted(SUPPORTED_TYPES) == sorted(t.name for t in TYPES)
    for name in SUPPORTED_TYPES:  # what the file's reader will be asked to do
        block_size, type_size = gguf.GGML_QUANT_SIZES[Q[name]]
        assert gguf.quants.dequantize(np.zeros((2, type_size), np.uint8), Q[name]).shape == (2, block_size)


def dequantized_reference(model: GPT, qtype: Q) -> GPT:
    """`model` with each 2-D weight replaced by what its qtype stores: the reference a converted file must
    equal. Rows are quantized independently, so this is computed in Hugging Face's row order directly."""
    reference = GPT(model.cfg).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().float().numpy()
        if t.ndim == 2 and qtype != Q.F32:
            t = gguf.quants.dequantize(quantize(t, qtype), qtype).reshape(t.shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("qtype", list(TYPES), ids=[t.name for t in TYPES])
def test_each_tensor_type_converts_to_its_dequantized_weights(tmp_path, gpt2_tokenizer, qtype):
    model = tiny_model(gpt2_tokenizer.get_vocab_size() + 4, tied=qtype != Q.Q8_0)  # and one untied head
    path = write_gguf(tmp_path / f"tiny.{qtype.name}.gguf", model, tokenizer_meta(gpt2_tokenizer, "gpt2", eos=0),
                      qtype)
    direction, ckpt = convert(path, tmp_path / "ckpt")
    assert direction == "gguf → checkpoint"
    ours, _ = load_checkpoint(ckpt)
    assert ours.cfg == model.cfg
    reference = dequantized_reference(model, qtype)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
        original = model.state_dict()[name]
        error = ((tensor - original).norm() / original.norm()).item()
        if TYPES[qtype] is not None:
            assert error <= TYPES[qtype], f"{name}: relative error {error:.2e} for {qtype.name}"
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        converted, expected, original = ours(ids), reference(ids), model(ids)
    assert (converted - expected).abs().max().item() <= 1e-5
    scale = expected.abs().max().item()
    assert scale > 1.0, "flat logits would hide a misplaced row"
    if qtype == Q.F32:
        assert (converted - original).abs().max().item() <= 1e-5


def test_transformers_reads_the_same_tiny_file_the_same_way(tmp_path, gpt2_tokenizer):
    """An independent reader of GGUF: transformers' own loader (its Q/K inverse permutation, its reading of
    the hyperparameters) gives the logits of the converted checkpoint."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model(gpt2_tokenizer.get_vocab_size(), tied=False)
    path = write_gguf(tmp_path / "tiny.gguf", model, tokenizer_meta(gpt2_tokenizer, "gpt2", eos=0, bos=0))
    _, ckpt = convert(path, tmp_path / "ckpt")
    ours, _ = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_qkv_biases_in_a_llama_file_are_read_and_unpermuted(tmp_path, gpt2_tokenizer):
    model = tiny_model(gpt2_tokenizer.get_vocab_size(), qkv_bias=True)
    path = write_gguf(tmp_path / "bias.gguf", model, tokenizer_meta(gpt2_tokenizer, "gpt2", eos=0))
    _, ckpt = convert(path, tmp_path / "ckpt")
    ours, _ = load_checkpoint(ckpt)
    assert ours.cfg.qkv_bias
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)


def test_llama3_rotary_scaling_is_read_from_rope_freqs(tmp_path, gpt2_tokenizer):
    """Llama 3.x files keep their rotary scaling only as rope_freqs.weight; the checkpoint gets it back as
    rope_scaling, and its logits are the original model's (at positions far enough for the slow frequencies
    to matter)."""
    model = tiny_model(gpt2_tokenizer.get_vocab_size(), rope_theta=500000.0, max_len=4096,
                       rope_scaling=LLAMA32_SCALING)
    factors = llama3_rope_factors(model.cfg)
    assert (factors == 1).any() and (factors == 32).any() and ((factors > 1) & (factors < 32)).any()
    path = write_gguf(tmp_path / "llama3.gguf", model, tokenizer_meta(gpt2_tokenizer, "llama-bpe", eos=0))
    _, ckpt = convert(path, tmp_path / "ckpt")
    ours, _ = load_checkpoint(ckpt)
    assert ours.cfg == model.cfg and ours.cfg.rope_scaling == LLAMA32_SCALING
    plain = GPT(dataclasses.replace(model.cfg, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.cfg.vocab_size, (1, 4000), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        converted, original, unscaled = ours(ids)[:, -8:], model(ids)[:, -8:], plain(ids)[:, -8:]
    assert (converted - original).abs().max().item() <= 1e-4
    assert (unscaled - original).abs().max().item() > 1e-2, "the scaling does not show at these positions"


@pytest.mark.parametrize("change, words", [
    ("other bands", ["rope_freqs.weight is not Llama 3's scaling", "factor 32"]),
    ("wrong length", ["rope_freqs.weight is F32 [16]", "F32 [32]"]),
])
def test_rotary_factors_that_are_not_llama3s_are_one_line(tmp_path, gpt2_tokenizer, change, words):
    (tmp_path / "in").mkdir()
    model = tiny_model(gpt2_tokenizer.get_vocab_size(), rope_theta=500000.0, max_len=4096)
    other = dataclasses.replace(model.cfg, rope_scaling=dataclasses.replace(LLAMA32_SCALING, high_freq_factor=8.0))
    factors = llama3_rope_factors(other) if change == "other bands" else np.ones(16, np.float32)
    path = bad_file_of(tmp_path, model, gpt2_tokenizer, rope_factors=factors)
    line = run_cli(path, tmp_path / "out" / "ckpt")
    assert all(word in line for word in words), line


# -- the tokenizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre, add_bos", [("gpt2", False), ("smollm", False), ("llama-bpe", True)])
def test_rebuilt_tokenizer_encodes_exactly_as_the_original(tmp_path, corpus, pre, add_bos):
    original = train_original(pre, corpus, add_bos=add_bos)
    meta = tokenizer_meta(original, pre, bos=1, eos=2, add_bos=add_bos, chat_template=CHATML)
    model = tiny_model(original.get_vocab_size())
    _, ckpt = convert(write_gguf(tmp_path / "tok.gguf", model, meta), tmp_path / "ckpt")
    _, rebuilt = load_checkpoint(ckpt)
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)
    for text in TEST_STRINGS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, (pre, text)
        assert rebuilt.pre_tokenizer.pre_tokenize_str(text) == original.pre_tokenizer.pre_tokenize_str(text)
        ids = rebuilt.encode(text).ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == (("<|im_start|>" if add_bos else "") + text)
    # control tokens are special (left out of decoded text), user-defined ones are text
    ids = rebuilt.encode("<|im_end|><think>", add_special_tokens=False).ids
    assert ids == [2, original.token_to_id(USER_DEFINED)]
    assert rebuilt.decode(ids) == USER_DEFINED
    if add_bos:
        assert rebuilt.encode("hi").ids[0] == 1
    else:
        assert 1 not in rebuilt.encode("hi").ids


def test_pre_tokenizer_kinds_split_digits_as_llama_cpp_does(tmp_path, corpus):
    """The three kinds differ on numbers: GPT-2 keeps a run of digits whole, SmolLM2 splits every digit,
    Llama 3 cuts runs into threes."""
    from edgegpt.convert.gguf_tokenizer import tokenizer_from_gguf

    original = train_original("gpt2", corpus)
    words = {}
    for pre in ("gpt2", "smollm", "llama-bpe"):
        meta = {f"tokenizer.ggml.{k}": v for k, v in tokenizer_meta(original, pre).items()}
        meta["tokenizer.ggml.token_type"] = meta.pop("tokenizer.ggml.types")
        meta["tokenizer.ggml.model"] = "gpt2"
        tokenizer = tokenizer_from_gguf(meta, "test.gguf")
        words[pre] = [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str("in 1234567 steps")]
    assert words["gpt2"] == ["in", "Ġ1234567", "Ġsteps"]
    assert words["smollm"] == ["in", "Ġ", "1", "2", "3", "4", "5", "6", "7", "Ġsteps"]
    assert words["llama-bpe"] == ["in", "Ġ", "123", "456", "7", "Ġsteps"]
    assert GPT2_PATTERN.startswith("'s|'t")


def test_llama3_kind_takes_a_whole_word_from_the_vocabulary(tmp_path):
    """ignore_merges (Llama 3): a pre-token that is itself a token is one token, even when no merge builds it."""
    from edgegpt.convert.gguf_tokenizer import tokenizer_from_gguf

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*SPECIALS, *alphabet, "ab", "abc"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3)}
    for pre, expected in (("llama-bpe", ["abc"]), ("gpt2", ["ab", "c"])):
        tokenizer = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": pre}, "test.gguf")
        assert tokenizer.encode("abc").tokens == expected, pre


def test_generation_config_and_chat_template_come_from_the_metadata(tmp_path, gpt2_tokenizer):
    meta = tokenizer_meta(gpt2_tokenizer, "gpt2", bos=1, eos=2, eot=0, pad=2, chat_template=CHATML)
    model = tiny_model(gpt2_tokenizer.get_vocab_size())
    _, ckpt = convert(write_gguf(tmp_path / "chat.gguf", model, meta), tmp_path / "ckpt")
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2}
    assert (ckpt / "chat_template.jinja").read_text() == CHATML
    # and on to Hugging Face, where transformers renders the same template
    transformers = pytest.importorskip("transformers")
    convert(ckpt, tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert fast.eos_token == "<|im_end|>" and fast.bos_token == "<|im_start|>"
    rendered = fast.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == generation


# -- bad input: one line, exit code 2, nothing written ------------------------------------------------------


def run_cli(source: Path, out: Path) -> str:
    """`edgegpt convert SOURCE OUT` that must fail: returns its one error line, having checked that nothing
    was written beside OUT."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    result = runner.invoke(app, ["convert", str(source), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    if before is not None:
        assert sorted(p.name for p in out.parent.iterdir()) == before  # no staging directory left behind
    return lines[0]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory, gpt2_tokenizer) -> Path:
    model = tiny_model(gpt2_tokenizer.get_vocab_size())
    directory = tmp_path_factory.mktemp("good")
    return write_gguf(directory / "good.gguf", model, tokenizer_meta(gpt2_tokenizer, "gpt2", eos=0), Q.Q8_0)


def bad_file(tmp_path: Path, gpt2_tokenizer: Tokenizer, qtype: Q = Q.F32, meta: dict | None = None,
             **options) -> Path:
    return bad_file_of(tmp_path, tiny_model(gpt2_tokenizer.get_vocab_size()), gpt2_tokenizer, qtype, meta, **options)


def bad_file_of(tmp_path: Path, model: GPT, gpt2_tokenizer: Tokenizer, qtype: Q = Q.F32, meta: dict | None = None,
                **options) -> Path:
    fields = tokenizer_meta(gpt2_tokenizer, "gpt2", eos=0)
    return write_gguf(tmp_path / "in" / "bad.gguf", model, {**fields, **(meta or {})}, qtype, **options)


@pytest.mark.parametrize("case, words", [
    ("architecture", ["'mamba'", "'llama'", "'qwen3'", "'gemma3'"]),
    ("quantization", ["TQ2_0", "Q5_0", "Q2_K", "IQ4_XS"]),
    ("pre-tokenizer", ["'mystery-bpe'", "smollm", "llama-bpe"]),
    ("tokenizer model", ["'bert'", "'gpt2'", "'llama'"]),
    ("mixture of experts", ["mixture of experts"]),
    ("rope scaling", ["rotary scaling", "yarn"]),
    ("missing tensor", ["blk.1.ffn_down.weight", "missing"]),
])
def test_a_file_edgegpt_cannot_represent_is_one_line(tmp_path, gpt2_tokenizer, case, words):
    (tmp_path / "in").mkdir()
    build = {
        "architecture": lambda: bad_file(tmp_path, gpt2_tokenizer, arch="mamba"),
        "quantization": lambda: bad_file(tmp_path, gpt2_tokenizer, Q.TQ2_0),  # ternary: no type edgegpt reads
        "pre-tokenizer": lambda: bad_file(tmp_path, gpt2_tokenizer, meta={"pre": "mystery-bpe"}),
        "tokenizer model": lambda: bad_file(tmp_path, gpt2_tokenizer, meta={"model": "bert"}),
        "mixture of experts": lambda: bad_file(tmp_path, gpt2_tokenizer, extra={"llama.expert_count": 8}),
        "rope scaling": lambda: bad_file(tmp_path, gpt2_tokenizer, extra={"llama.rope.scaling.type": "yarn"}),
        "missing tensor": lambda: bad_file(tmp_path, gpt2_tokenizer, skip=("blk.1.ffn_down.weight",)),
    }[case]
    line = run_cli(build(), tmp_path / "out" / "ckpt")
    assert all(word in line for word in words), line


@pytest.mark.parametrize("hyper, words", [
    ({"embedding_length": 128}, ["llama.embedding_length is 128", "token_embd.weight", "256", "contradicts"]),
    ({"vocab_size": 999}, ["llama.vocab_size is 999", "contradicts"]),
    ({"block_count": 3}, ["llama.block_count is 3", "blocks 0–1 (2 in all)"]),
    ({"block_count": 1}, ["llama.block_count is 1", "blocks 0–1 (2 in all)"]),
    ({"head_count": 3}, ["dim 256 is not divisible by n_heads 3"]),
    ({"head_count_kv": 3}, ["n_heads 4 is not a multiple of n_kv_heads 3"]),
    ({"feed_forward_length": 384}, ["ffn_gate.weight is [512, 256]", "[384, 256]"]),
    ({"rope_dimension_count": 32}, ["rope.dimension_count is 32", "64"]),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_metadata_that_contradicts_the_tensors_is_one_line(tmp_path, gpt2_tokenizer, hyper, words):
    (tmp_path / "in").mkdir()
    line = run_cli(bad_file(tmp_path, gpt2_tokenizer, hyper=hyper), tmp_path / "out" / "ckpt")
    assert all(word in line for word in words), line


@pytest.mark.parametrize("cut", [10, 200, 5_000, -100])
def test_a_truncated_file_is_one_line(tmp_path, good_file, cut):
    data = good_file.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    line = run_cli(tmp_path / "cut.gguf", tmp_path / "ckpt")
    assert "cut.gguf" in line and ("truncated" in line or "corrupt" in line), line


def test_a_corrupt_or_missing_file_is_one_line(tmp_path, good_file):
    (tmp_path / "photo.gguf").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert "not a GGUF file" in run_cli(tmp_path / "photo.gguf", tmp_path / "ckpt")
    data = bytearray(good_file.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")  # a GGUF version no reader knows
    (tmp_path / "future.gguf").write_bytes(bytes(data))
    assert "future.gguf" in run_cli(tmp_path / "future.gguf", tmp_path / "ckpt")
    assert "does not exist" in run_cli(tmp_path / "no-such.gguf", tmp_path / "ckpt")


def test_the_folder_holding_the_file_is_not_a_destination(tmp_path, good_file):
    import shutil

    source = Path(shutil.copy(good_file, tmp_path / "model.gguf"))
    with pytest.raises(EdgeGPTError, match="would overwrite"):
        convert(source, tmp_path)
    assert source.is_file()
    with pytest.raises(EdgeGPTError, match="pass the file itself"):
        convert(tmp_path, tmp_path / "ckpt")


def test_without_the_gguf_package_the_pip_command_is_named(tmp_path, good_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails as when it is not installed
    line = run_cli(good_file, tmp_path / "ckpt")
    assert "gguf" in line and "pip install 'edgegpt[convert]'" in line, line
