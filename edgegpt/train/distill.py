"""Knowledge distillation: the student learns the labels and a teacher's softened next-token distribution.

    loss = α · CE(student, labels) + (1 − α) · T² · KL(teacher_T ‖ student_T)

where X_T is softmax(logits / T). Softening by T > 1 exposes how the teacher ranks the wrong tokens,
which is the knowledge labels do not carry; the T² factor keeps the KD term's gradients the same size
whatever T is (their magnitude falls as 1/T² otherwise; Hinton et al., 2015).

The teacher is an edgegpt checkpoint, a local Hugging Face causal-LM directory (anything
`AutoModelForCausalLM` loads, from safetensors only: nothing is downloaded, nothing is unpickled), or an
exported model package, which the runtime runs on onnxruntime (its first pass is no faster than PyTorch's on a
CPU; the cache below is what pays: `benchmarks/training.py teacher-speed`). The student takes the teacher's
tokenizer, so both predict over the same vocabulary.

Top k: a package teacher (and any teacher with --teacher-top-k) hands over only its k most likely next tokens
at each position, as log-probabilities at temperature 1 (TopK), and the KD term is taken over those k:

    KD = T² · Σ_k q_T · (log q_T − log p_T[ids]),   q_T = softmax over the k of (log q / T)

softmax(log q / T) over the k equals softmax(z / T) restricted to them and renormalised (log q = z − logsumexp z),
so any temperature applies to values stored at T = 1; p_T is the student's whole softened distribution, gathered
at the k ids. With k = the vocabulary it is the full KL above. With fewer, the mass the teacher puts outside its k
is left out, and the student is pulled to put none there. A package teacher's top k is cached on disk per window
(edgegpt.train.teacher_cache), and training always reads the values as stored (float16), computed just now or
read back, so a run from the cache trains exactly what the run that filled it did.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, MANIFEST, TOKENIZER, WEIGHTS, is_package
from edgegpt.core.io import read_json
from edgegpt.tokenizer import load_tokenizer
from edgegpt.train.teacher_cache import CacheShape, TopKCache, package_identity


class DistillLoss(NamedTuple):
    total: Tensor
    ce: Tensor  # cross-entropy against the labels, in nats/token
    kd: Tensor  # T²·KL(teacher_T ‖ student_T), in nats/token


class TopK(NamedTuple):
    """A teacher's k most likely next tokens at each position, most likely first."""

    log_probs: Tensor  # [..., k] log_softmax of its logits at temperature 1 (float16 as the cache keeps them)
    ids: Tensor  # int64 [..., k]


def distillation_loss(student_logits: Tensor, teacher: Tensor | TopK | None, labels: Tensor, alpha: float,
                      temperature: float, ignore_index: int = -100) -> DistillLoss:
    """The loss above, averaged over tokens; without a teacher it is plain cross-entropy. `teacher`: its logits
    (the full KL) or its TopK (the KL over its k). A position whose label is ignore_index (a prompt's token,
    padding) counts in neither term. The teacher's values are constants: no gradient reaches them."""
    student_logits = _at_least_float32(student_logits).flatten(0, -2)
    labels = labels.flatten()
    ce = F.cross_entropy(student_logits, labels, ignore_index=ignore_index)
    if teacher is None:
        return DistillLoss(ce, ce, torch.zeros_like(ce))
    counted = labels != ignore_index
    kd = (_top_k_kd if isinstance(teacher, TopK) else _full_kd)(student_logits, teacher, counted, temperature)
    return DistillLoss(alpha * ce + (1 - alpha) * kd, ce, kd)


def _full_kd(student_logits: Tensor, teacher_logits: Tensor, counted: Tensor, temperature: float) -> Tensor:
    teacher_logits = _at_least_float32(teacher_logits.detach()).flatten(0, -2)
    if teacher_logits.shape != student_logits.shape:
        raise EdgeGPTError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                           f"{tuple(student_logits.shape)}: the two vocabularies differ")
    if not counted.all():
        student_logits, teacher_logits = student_logits[counted], teacher_logits[counted]
    student_log_p = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _top_k_kd(student_logits: Tensor, teacher: TopK, counted: Tensor, temperature: float) -> Tensor:
    log_q = _at_least_float32(teacher.log_probs.detach()).flatten(0, -2)
    ids = teacher.ids.flatten(0, -2)
    if log_q.shape[0] != student_logits.shape[0] or ids.shape != log_q.shape:
        raise EdgeGPTError(f"the teacher's top k {tuple(log_q.shape)} does not match the student's positions "
                           f"{tuple(student_logits.shape[:1])}")
    if not counted.all():
        student_logits, log_q, ids = student_logits[counted], log_q[counted], ids[counted]
    teacher_log_p = F.log_softmax(log_q / temperature, dim=-1)
    student_log_p = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, ids)
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1).mean()
    return kl * temperature**2


def _at_least_float32(logits: Tensor) -> Tensor:
    # bf16/fp16 logits (autocast, a bf16 teacher) lose the small probabilities KL depends on.
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


# -- teachers ----------------------------------------------------------------------------------------

@dataclass
class Teacher:
    """A frozen causal LM: token ids in, float32 next-token logits out.

    `open_teacher` reads what it is from its config and tokenizer and refuses it if it cannot serve;
    only `load` reads the weights, so every refusal comes before the slow, memory-hungry part."""

    path: Path
    kind: str  # "edgegpt", "package" (an exported model package) or the Hugging Face model_type
    tokenizer: Tokenizer
    vocab_size: int  # width of its logits: the student's vocab_size
    max_len: int  # longest sequence it was trained on
    parameters: int
    edgegpt_config: ModelConfig | None  # what --init-from-teacher maps onto (None: not mappable)
    model: nn.Module | None = None
    generator: Any = None  # a package teacher's runtime Generator (edgegpt.runtime), once loaded

    def load(self, device: torch.device, log: Callable[[str], None] = lambda message: None) -> "Teacher":
        """Read the weights, frozen in eval mode: float32, or bfloat16 on CUDA (inference needs no fp32 master).
        A package opens in the runtime, on the provider its graph runs on (float32 and int8: the CPU, with the
        training's threads; float16: CUDA), without its draft."""
        log(f"loading the teacher {self.path} ({self.parameters / 1e6:.1f}M parameters)")
        if self.kind == "package":
            from edgegpt.runtime import Generator

            self.generator = Generator.load(self.path, provider="auto", threads=torch.get_num_threads(), draft=None)
            return self
        dtype = _teacher_dtype(device)
        if self.kind == "edgegpt":
            model, _ = load_checkpoint(self.path)
        else:
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, use_safetensors=True,
                                                             torch_dtype=dtype)
            except (OSError, ValueError, RuntimeError) as e:
                raise EdgeGPTError(f"could not load the teacher {self.path} ({str(e).splitlines()[0][:160]})") from None
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def logits(self, input_ids: Tensor) -> Tensor:
        """float32 [rows, T, vocab] (a PyTorch teacher; a package hands over its top k only: top_k)."""
        if self.kind == "edgegpt":
            return self.model(input_ids).float()
        return self.model(input_ids=input_ids, use_cache=False).logits.float()

    @torch.no_grad()
    def top_k(self, input_ids: Tensor, k: int) -> TopK:
        """Its k most likely next tokens at every position of input_ids [rows, T], float32 log-probabilities."""
        if self.kind != "package":
            return top_k_of(self.logits(input_ids), k)
        from edgegpt.quality import PackageScorer

        rows = input_ids.cpu().numpy()
        log_probs = torch.empty(*rows.shape, k)
        ids = torch.empty(*rows.shape, k, dtype=torch.int64)
        # A chunk of positions per pass, reduced to its top k at once: a window's logits whole would be T × vocab
        # floats (a 262k vocabulary: 1 GiB per 1,024 positions).
        start = 0
        for logits in PackageScorer(self.generator).logit_chunks(rows):
            end = start + logits.shape[1]
            # The runtime may hand over a read-only view of its output buffer; torch wants a writable array.
            log_probs[:, start:end], ids[:, start:end] = top_k_of(torch.from_numpy(np.require(logits, np.float32,
                                                                                               ["W"])), k)
            start = end
        return TopK(log_probs, ids)


def top_k_of(logits: Tensor, k: int) -> TopK:
    """The k largest of logits [..., vocab] as float32 log-probabilities (log_softmax at temperature 1) and ids."""
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)
    return TopK(values - logits.logsumexp(dim=-1, keepdim=True), ids)


def _teacher_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _is_edgegpt_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in (WEIGHTS, CONFIG, TOKENIZER)) and \
        "model_type" not in read_json(path / CONFIG)


def _is_huggingface_dir(path: Path) -> bool:
    if not (path / CONFIG).is_file():
        return False
    config = read_json(path / CONFIG)
    return isinstance(config, dict) and "model_type" in config


def available_memory(device: torch.device) -> int:
    """Bytes free for a model on `device`: the GPU's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_fits(path: Path, parameters: int, device: torch.device, copies: int,
                weight_bytes: int | None = None) -> None:
    """A teacher that does not fit would swap the machine to a halt or be OOM-killed mid-load. weight_bytes: a
    package's files (their own precision), else the parameters in the teacher's dtype on `device`."""
    dtype = _teacher_dtype(device)
    held = f"in {str(dtype).removeprefix('torch.')}" if weight_bytes is None else "as a package"
    bytes_needed = (parameters * torch.finfo(dtype).bits // 8 if weight_bytes is None else weight_bytes) * copies
    free = available_memory(device)
    # 1.2: activations and the student share the same memory; erring high is the safe side.
    if bytes_needed * 1.2 > free:
        where = "GPU" if device.type == "cuda" else "RAM"
        per = f" ({copies} processes on this machine)" if copies > 1 else ""
        raise EdgeGPTError(
            f"the teacher {path} has {parameters / 1e9:.2f}B parameters and needs about {bytes_needed / 2**30:.1f} GiB "
            f"{held}{per}, but only {free / 2**30:.1f} GiB of {where} is free; use a smaller teacher or a bigger "
            "device"
        )


def open_teacher(path: Path, device: torch.device, processes_per_device: int = 1) -> Teacher:
    """What the teacher at `path` is, from its config and tokenizer (weights not read yet)."""
    path = Path(path)
    if not path.exists():
        raise EdgeGPTError(f"--teacher {path} does not exist")
    if not path.is_dir():
        raise EdgeGPTError(f"--teacher {path} is not a directory (an edgegpt checkpoint, a Hugging Face model or a "
                           "model package)")
    copies = processes_per_device if device.type == "cpu" else 1
    if is_package(path):
        return _open_package(path, processes_per_device)
    if _is_edgegpt_checkpoint(path):
        cfg = ModelConfig.load(path / CONFIG)
        _check_fits(path, cfg.num_parameters(), device, copies)
        return Teacher(path, "edgegpt", load_tokenizer(path / TOKENIZER), cfg.vocab_size, cfg.max_len,
                       cfg.num_parameters(), cfg)
    if _is_huggingface_dir(path):
        return _open_huggingface(path, device, copies)
    raise EdgeGPTError(
        f"--teacher {path} is neither an edgegpt checkpoint (model.safetensors, config.json, tokenizer.json) "
        "nor a Hugging Face model directory (config.json with a model_type) nor a model package (model.onnx)"
    )


def load_teacher(path: Path, device: torch.device) -> Teacher:
    return open_teacher(path, device).load(device)


def _open_package(path: Path, processes_per_machine: int) -> Teacher:
    """A model package: its shape from config.json (checked as the runtime checks it), its tokenizer; the graph
    and weights are read by load."""
    from edgegpt.runtime.package import parse_config

    config = read_json(path / CONFIG)
    spec, graph = parse_config(config, str(path / CONFIG))
    try:
        parameters = ModelConfig.from_dict(config["model"], source=str(path / CONFIG)).num_parameters()
    except (EdgeGPTError, TypeError, ValueError):  # a package of a shape ModelConfig does not hold: size unknown
        parameters = 0
    if not (path / TOKENIZER).is_file():
        raise EdgeGPTError(f"the teacher {path} is not a complete model package: tokenizer.json is missing")
    # float32 and int8 graphs run on the CPU whatever device trains (Teacher.load), each training process its own.
    on_cuda = graph.dtype == "float16"
    weight_bytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    _check_fits(path, parameters, torch.device("cuda" if on_cuda else "cpu"), 1 if on_cuda else processes_per_machine,
                weight_bytes)
    return Teacher(path, "package", load_tokenizer(path / TOKENIZER), spec.vocab_size, spec.max_len, parameters, None)


def _open_huggingface(path: Path, device: torch.device, copies: int) -> Teacher:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise EdgeGPTError("a Hugging Face teacher needs transformers: pip install 'edgegpt[distill]'") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):  # the shape without the memory: counts parameters from config.json alone
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise EdgeGPTError(f"the teacher {path} is not a causal LM transformers can build "
                           f"({str(e).splitlines()[0][:160]})") from None
    parameters = sum(p.numel() for p in skeleton.parameters())
    _check_fits(path, parameters, device, copies)
    if not (path / TOKENIZER).is_file():
        raise EdgeGPTError(
            f"the teacher {path} has no tokenizer.json; save its fast tokenizer there with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR)"
        )
    tokenizer = load_tokenizer(path / TOKENIZER)
    if not any(path.glob("*.safetensors")):
        raise EdgeGPTError(f"the teacher {path} has no .safetensors weights (pickled .bin files are never loaded)")
    vocab = skeleton.get_output_embeddings().weight.shape[0]
    if tokenizer.get_vocab_size() > vocab:
        raise EdgeGPTError(f"the teacher {path}'s tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                           f"predicts only {vocab}")
    max_len = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                    if isinstance(getattr(config, k, None), int)), 2048)
    mappable = None
    if config.model_type == "llama":
        from edgegpt.convert import config_from_hf

        try:
            mappable = config_from_hf(read_json(path / CONFIG), path / CONFIG)
        except EdgeGPTError:
            mappable = None  # a Llama variant edgegpt cannot represent: still a teacher, not an initialiser
    return Teacher(path, config.model_type, tokenizer, vocab, max_len, parameters, mappable)


def check_student_tokenizer(teacher: Teacher, tokenizer_path: Path) -> None:
    """An explicitly given student tokenizer must be the teacher's vocabulary, token for token."""
    student = load_tokenizer(tokenizer_path)
    if student.get_vocab() != teacher.tokenizer.get_vocab():
        raise EdgeGPTError(
            f"--tokenizer {tokenizer_path} has a different vocabulary from the teacher's ({student.get_vocab_size()} "
            f"vs {teacher.tokenizer.get_vocab_size()} tokens); drop --tokenizer: the student takes the teacher's"
        )


# -- what a training step asks of the teacher ---------------------------------------------------------

@dataclass
class Teaching:
    """The teacher as a training step asks it about its rows: full logits (a PyTorch teacher without
    --teacher-top-k), or the top k as stored (float16), from the cache where it holds them (a package teacher,
    whose rows are windows of the fixed grid)."""

    teacher: Teacher
    k: int | None  # None: full logits
    cache: TopKCache | None = None
    cached: int = 0  # rows whose top k came from the cache
    computed: int = 0  # rows the teacher ran on for their top k

    def targets(self, inputs: Tensor, windows: Tensor | None) -> Tensor | TopK:
        """What the loss compares the student with at inputs [rows, T]; windows [rows]: their grid windows."""
        if self.k is None:
            return self.teacher.logits(inputs)
        if self.cache is None:
            self.computed += len(inputs)
            return _as_stored(self.teacher.top_k(inputs, self.k))
        windows = windows.tolist()
        found = [self.cache.get(window) for window in windows]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            fresh = _as_stored(self.teacher.top_k(inputs[missing], self.k))
            for i, log_probs, ids in zip(missing, fresh.log_probs.cpu().numpy(), fresh.ids.cpu().numpy()):
                found[i] = self.cache.put(windows[i], log_probs, ids)
            self.cache.commit()
        self.cached += len(found) - len(missing)
        self.computed += len(missing)
        log_probs = torch.from_numpy(np.stack([entry[0] for entry in found]))
        ids = torch.from_numpy(np.stack([entry[1] for entry in found]).astype(np.int64))
        return TopK(log_probs.to(inputs.device), ids.to(inputs.device))


def _as_stored(top: TopK) -> TopK:
    # float16, as the cache keeps them: a run trains on the same values whether they were computed or read back.
    # The floor keeps a -inf (a masked logit) finite: 0 · (−inf) would make the loss NaN.
    return TopK(top.log_probs.clamp(min=torch.finfo(torch.float16).min).half(), top.ids)


def open_top_k_cache(teacher: Teacher, root: Path, data_key: str, windows: int, block_size: int, k: int,
                     log: Callable[[str], None] = lambda message: None) -> TopKCache:
    """The cache of a loaded package teacher's top k over the token data `data_key`, in windows of block_size."""
    import onnxruntime

    identity = {"teacher": package_identity(teacher.path), "onnxruntime": onnxruntime.__version__,
                "provider": teacher.generator.provider, "data": data_key}
    return TopKCache.open(root, identity, CacheShape(windows, block_size, k, teacher.vocab_size), log)


# -- --init-from-teacher -----------------------------------------------------------------------------

def student_config_from_teacher(teacher: Teacher, layers: int | None) -> ModelConfig:
    """The teacher's shape with fewer layers (half by default): the DistilGPT2 recipe."""
    if teacher.kind == "package":
        raise EdgeGPTError(
            f"--init-from-teacher copies the teacher's layers in PyTorch, and {teacher.path} is an exported package; "
            "give the checkpoint it was exported from, or drop --init-from-teacher"
        )
    if teacher.edgegpt_config is None:
        raise EdgeGPTError(
            f"--init-from-teacher needs an edgegpt or Llama teacher whose layers map onto the student's; "
            f"this teacher is {teacher.kind!r}. Train without it (distillation still works)"
        )
    n_layers = layers or max(teacher.edgegpt_config.n_layers // 2, 1)
    if n_layers > teacher.edgegpt_config.n_layers:
        raise EdgeGPTError(f"--layers {n_layers} exceeds the teacher's {teacher.edgegpt_config.n_layers} layers")
    return dataclasses.replace(teacher.edgegpt_config, n_layers=n_layers)


def init_from_teacher(student: nn.Module, teacher: Teacher) -> list[int]:
    """Copy embeddings, final norm and every k-th teacher layer into the student; returns those layers."""
    source = teacher.model.state_dict() if teacher.kind == "edgegpt" else _llama_as_edgegpt(teacher)
    student_layers = student.cfg.n_layers
    stride = teacher.edgegpt_config.n_layers // student_layers
    picked = [i * stride for i in range(student_layers)]
    state = {}
    for name, tensor in student.state_dict().items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            name_in_teacher = f"layers.{picked[int(index)]}.{rest}"
        else:
            name_in_teacher = name
        if name_in_teacher not in source:
            continue  # buffers (rotary tables) and a tied head are rebuilt by the student itself
        state[name] = source[name_in_teacher].to(dtype=tensor.dtype, device=tensor.device)
        if state[name].shape != tensor.shape:
            raise EdgeGPTError(f"--init-from-teacher: {name} is {tuple(state[name].shape)} in the teacher and "
                               f"{tuple(tensor.shape)} in the student")
    student.load_state_dict(state, strict=False)
    return picked


def _llama_as_edgegpt(teacher: Teacher) -> dict[str, Tensor]:
    from edgegpt.convert import _translate

    out = {}
    for name, tensor in teacher.model.state_dict().items():
        try:
            out[_translate(name, to_hf=False)] = tensor
        except KeyError:
            continue  # rotary buffers
    return out

