"""The side-by-side row of benchmarks/finetune.py: the same fine-tuning written as a plain transformers loop (PEFT
for LoRA), the way a user without edgegpt would write it. Run by `finetune.py run` as a fresh process of its own
(`python benchmarks/finetune.py transformers ...`), so its time and peak RSS are its own.

    examples   each {"messages": [...]} record rendered with the folder's own chat template
               (tokenizer.apply_chat_template): the tokens of each assistant turn are the ones between the
               conversation rendered up to that turn with the assistant's turn opened and the conversation
               rendered through it (its end-of-turn marks included, the whitespace after them not: as
               edgegpt's records.py and transformers' {% generation %} masks); every other token is masked (-100)
    batches    `batch_size` examples per optimizer step, shuffled each epoch (torch.Generator(seed)), padded on
               the right to the longest of the batch (attention_mask 0, label -100): a plain loop does not pack
    optimizer  torch.optim.AdamW, betas (0.9, beta2), weight decay on matrices only; linear warm-up over the
               first `warmup` of the steps, then cosine down to lr · min_lr_ratio; gradients clipped to
               `grad_clip` — the schedule edgegpt's loop uses (edgegpt/train/loop.py), so only the
               implementation differs
    LoRA       peft.LoraConfig(r, lora_alpha, lora_dropout, target_modules) on the attention and MLP projections,
               merged into the weights (merge_and_unload) before the folder is saved

tokens/s counts the examples' own tokens (not padding) over the time of the optimizer steps alone (loading,
tokenizing and saving excluded); `padded_tokens_per_s` counts every position computed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# The projections LoRA adapts by default: the attention's and the MLP's (Llama / Qwen / Gemma names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def assistant_examples(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each record: labels are the ids on assistant turns, -100 elsewhere."""
    examples = []
    for number, record in enumerate(records, 1):
        messages = record["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        labels = [-100] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(tokenizer.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True))
            through = tokenizer.apply_chat_template(messages[:turn + 1], tokenize=True)
            if through != ids[:len(through)] or start > len(through):
                raise SystemExit(f"record {number}: the template renders a conversation's start differently from "
                                 "the whole conversation; the prefix mask does not apply")
            end = len(through)
            while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
                end -= 1  # the whitespace after the turn's end marker is the template's, not the reply's
            labels[start:end] = ids[start:end]
        examples.append((ids, labels))
    return examples


def learning_rate(step: int, steps: int, lr: float, warmup: float, min_lr_ratio: float) -> float:
    progress = step / max(steps, 1)
    if progress < warmup:
        return lr * max(progress, 1e-3) / warmup
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    low = lr * min_lr_ratio
    return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * t))


def train(args) -> dict:
    """Fine-tune the folder `args.hf` on `args.data` and save the result (merged, for LoRA) to `args.out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
    records = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = assistant_examples(tokenizer, records)
    context = model.config.max_position_embeddings
    examples = [(ids[:context], labels[:context]) for ids, labels in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout, target_modules=list(LORA_TARGETS),
                                                 task_type="CAUSAL_LM"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, args.beta2))
    per_epoch = math.ceil(len(examples) / args.batch_size)
    steps = args.steps or per_epoch * args.epochs
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    real = padded = 0
    losses = []
    stopped = "steps"
    started = time.perf_counter()
    for step in range(steps):
        if not order:
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = [examples[i] for i in order[:args.batch_size]]
        order = order[args.batch_size:]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int(mask.sum())
        padded += mask.numel()
        losses.append(loss.item())
        if args.time_budget and time.perf_counter() - started > args.time_budget * 60:
            stopped = "time_budget"
            break
    seconds = time.perf_counter() - started
    if args.lora:
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    done = len(losses)
    return {"loop": "plain PyTorch loop over transformers" + (" + PEFT LoRA" if args.lora else ""),
            "examples": len(examples), "steps": done, "planned_steps": steps, "batch_size": args.batch_size,
            "epochs": done * args.batch_size / len(examples), "lr": args.lr, "lora": args.lora,
            "train_seconds": seconds, "tokens": real, "tokens_per_s": real / seconds,
            "padded_tokens_per_s": padded / seconds, "first_loss": losses[0], "last_loss": losses[-1],
            "stopped": stopped, "threads": torch.get_num_threads()}


def chat_replies(folder: Path, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies of the transformers model in `folder` to each question, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ends = model.generation_config.eos_token_id
    replies = []
    threads = torch.get_num_threads()
    # One thread, as edgegpt's PyTorch reference decodes (edgegpt/reference.py torch_threads): batch-1 steps are
    # too short to share, and two threads on a busy 2-core machine made them many times slower.
    torch.set_num_threads(1)
    with torch.no_grad():
        for question in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                add_generation_prompt=True, return_tensors="pt")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=ends, pad_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    torch.set_num_threads(threads)
    return replies
