"""Knowledge distillation: the student learns the labels and a teacher's softened next-token distribution.

    loss = α · CE(student, labels) + (1 − α) · T² · KL(teacher_T ‖ student_T)

where X_T is softmax(logits / T). Softening by T > 1 exposes how the teacher ranks the wrong tokens,
which is the knowledge labels do not carry; the T² factor keeps the KD term's gradients the same size
whatever T is (their magnitude falls as 1/T² otherwise; Hinton et al., 2015).

The teacher is an edgegpt checkpoint or a local Hugging Face causal-LM directory (anything
`AutoModelForCausalLM` loads, from safetensors only: nothing is downloaded, nothing is unpickled). The
student takes the teacher's tokenizer, so both predict over the same vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from edgegpt.checkpoint import load_checkpoint
from edgegpt.core.config import ModelConfig
from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CONFIG, TOKENIZER, WEIGHTS
from edgegpt.core.io import read_json
from edgegpt.tokenizer import load_tokenizer


class DistillLoss(NamedTuple):
    total: Tensor
    ce: Tensor  # cross-entropy against the labels, in nats/token
    kd: Tensor  # T²·KL(teacher_T ‖ student_T), in nats/token


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, alpha: float,
                      temperature: float, ignore_index: int = -100) -> DistillLoss:
    """The loss above, averaged over tokens; without a teacher it is plain cross-entropy. A position whose label
    is ignore_index (a prompt's token, padding) counts in neither term."""
    student_logits = _at_least_float32(student_logits).flatten(0, -2)
    labels = labels.flatten()
    ce = F.cross_entropy(student_logits, labels, ignore_index=ignore_index)
    if teacher_logits is None:
        return DistillLoss(ce, ce, torch.zeros_like(ce))
    teacher_logits = _at_least_float32(teacher_logits).flatten(0, -2)
    if teacher_logits.shape != student_logits.shape:
        raise EdgeGPTError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                           f"{tuple(student_logits.shape)}: the two vocabularies differ")
    counted = labels != ignore_index
    if not counted.all():
        student_logits, teacher_logits = student_logits[counted], teacher_logits[counted]
    student_log_p = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")
    kd = kl * temperature**2
    return DistillLoss(alpha * ce + (1 - alpha) * kd, ce, kd)


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
    kind: str  # "edgegpt" or the Hugging Face model_type
    tokenizer: Tokenizer
    vocab_size: int  # width of its logits: the student's vocab_size
    max_len: int  # longest sequence it was trained on
    parameters: int
    edgegpt_config: ModelConfig | None  # what --init-from-teacher maps onto (None: not mappable)
    model: nn.Module | None = None

    def load(self, device: torch.device, log: Callable[[str], None] = lambda message: None) -> "Teacher":
        """Read the weights, frozen in eval mode: float32, or bfloat16 on CUDA (inference needs no fp32 master)."""
        log(f"loading the teacher {self.path} ({self.parameters / 1e6:.1f}M parameters)")
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
        if self.kind == "edgegpt":
            return self.model(input_ids).float()
        return self.model(input_ids=input_ids, use_cache=False).logits.float()


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


def _check_fits(path: Path, parameters: int, device: torch.device, copies: int) -> None:
    """A teacher that does not fit would swap the machine to a halt or be OOM-killed mid-load."""
    dtype = _teacher_dtype(device)
    bytes_needed = parameters * torch.finfo(dtype).bits // 8 * copies
    free = available_memory(device)
    # 1.2: activations and the student share the same memory; erring high is the safe side.
    if bytes_needed * 1.2 > free:
        where = "GPU" if device.type == "cuda" else "RAM"
        per = f" ({copies} processes on this machine)" if copies > 1 else ""
        raise EdgeGPTError(
            f"the teacher {path} has {parameters / 1e9:.2f}B parameters and needs about {bytes_needed / 2**30:.1f} GiB "
            f"in {str(dtype).removeprefix('torch.')}{per}, but only {free / 2**30:.1f} GiB of {where} is free; "
            "use a smaller teacher or a bigger device"
        )


def open_teacher(path: Path, device: torch.device, processes_per_device: int = 1) -> Teacher:
    """What the teacher at `path` is, from its config and tokenizer (weights not read yet)."""
    path = Path(path)
    if not path.exists():
        raise EdgeGPTError(f"--teacher {path} does not exist")
    if not path.is_dir():
        raise EdgeGPTError(f"--teacher {path} is not a directory (an edgegpt checkpoint or a Hugging Face model)")
    copies = processes_per_device if device.type == "cpu" else 1
    if _is_edgegpt_checkpoint(path):
        cfg = ModelConfig.load(path / CONFIG)
        _check_fits(path, cfg.num_parameters(), device, copies)
        return Teacher(path, "edgegpt", load_tokenizer(path / TOKENIZER), cfg.vocab_size, cfg.max_len,
                       cfg.num_parameters(), cfg)
    if _is_huggingface_dir(path):
        return _open_huggingface(path, device, copies)
    raise EdgeGPTError(
        f"--teacher {path} is neither an edgegpt checkpoint (model.safetensors, config.json, tokenizer.json) "
        "nor a Hugging Face model directory (config.json with a model_type)"
    )


def load_teacher(path: Path, device: torch.device) -> Teacher:
    return open_teacher(path, device).load(device)


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


# -- --init-from-teacher -----------------------------------------------------------------------------

def student_config_from_teacher(teacher: Teacher, layers: int | None) -> ModelConfig:
    """The teacher's shape with fewer layers (half by default): the DistilGPT2 recipe."""
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

