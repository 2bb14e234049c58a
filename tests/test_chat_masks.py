"""The assistant-token mask of chat examples (edgegpt/train/examples.py) against transformers'
apply_chat_template(..., return_assistant_tokens_mask=True), on templates of the ChatML (SmolLM2, Qwen),
Llama 3 and Gemma families written from their published formats with {% generation %} marks added around
what the assistant writes: its reply and the end-of-turn marker, not the newline the template puts after it.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.chat_template import ChatTemplate
from edgegpt.tokenizer import train_tokenizer
from edgegpt.train.examples import ExampleFormat, read_examples

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{% if role == 'model' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# family: (template, bos, eos, end of the assistant's turn)
FAMILIES = {
    "chatml": (CHATML, None, "<|im_end|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", "<end_of_turn>"),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "I am fine. 🙂 東京"}],
    [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "café?"}, {"role": "assistant", "content": "  spaced   out  \n"},
     {"role": "user", "content": "naïve — ü"}, {"role": "assistant", "content": "\n"},
     {"role": "user", "content": "🙂🙂"}, {"role": "assistant", "content": "東京 is the answer."}],
]


TEXTS = ["Hello there, how are you? I am fine. The quick brown fox jumps over the lazy dog. " * 20,
         "Ünïcödé — 東京 🙂 naïve café\n\n  spaced   out  "]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(TEXTS, 400)  # byte-level BPE, as GPT-2, SmolLM2, Qwen and Llama 3 have
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer


def sentencepiece_style_tokenizer():
    """BPE over text whose spaces are normalized to ▁, with byte fallback, as Gemma's (and Llama 2's) tokenizer:
    offsets then come through the normalizer's alignments."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", *byte_tokens, *SPECIAL], show_progress=False)
    tokenizer.train_from_iterator(TEXTS, trainer)
    return tokenizer


def example_format(tokenizer, family: str) -> ExampleFormat:
    template, bos, eos, _ = FAMILIES[family]
    return ExampleFormat(tokenizer, tokenizer.token_to_id(eos), (), ChatTemplate(template, bos, eos), family)


def write_chats(path, conversations):
    path.write_text("\n".join(json.dumps({"messages": c}, ensure_ascii=False) for c in conversations) + "\n",
                    encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_equals_transformers_assistant_mask(tokenizer, family, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = tokenizer if kind == "byte-level" else sentencepiece_style_tokenizer()
    template, bos, eos, _ = FAMILIES[family]
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)
    reference.chat_template = template
    ours = read_examples([write_chats(tmp_path / "chat.jsonl", CONVERSATIONS)], example_format(tokenizer, family))
    for conversation, (ids, trained) in zip(CONVERSATIONS, ours, strict=True):
        expected = reference.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert ids.tolist() == expected["input_ids"]
        assert trained.astype(int).tolist() == expected["assistant_masks"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_tokens_are_the_replies_and_their_end_of_turn(tokenizer, family, tmp_path):
    _, bos, _, end_of_turn = FAMILIES[family]
    conversation = CONVERSATIONS[0]
    [(ids, trained)] = read_examples([write_chats(tmp_path / "chat.jsonl", [conversation])],
                                     example_format(tokenizer, family))
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    trained_text = tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert trained_text == "".join(reply + end_of_turn for reply in replies)
    # The end of each assistant turn is trained; the newline a template writes after it is not.
    ends = [j for j, i in enumerate(ids) if i == tokenizer.token_to_id(end_of_turn)]
    assert sum(trained[ends]) == len(replies)
    assert not trained[ends[-1] + 1:].any()
    # bos written once, by the template (the text is encoded without adding special tokens)
    if bos is not None:
        assert ids[0] == tokenizer.token_to_id(bos) and (ids == tokenizer.token_to_id(bos)).sum() == 1


def test_include_prompts_trains_every_token(tokenizer, tmp_path):
    path = write_chats(tmp_path / "chat.jsonl", CONVERSATIONS)
    for (ids, trained), (same_ids, _) in zip(read_examples([path], example_format(tokenizer, "chatml"),
                                                           include_prompts=True),
                                             read_examples([path], example_format(tokenizer, "chatml"))):
        assert trained.all() and ids.tolist() == same_ids.tolist()


def test_weight_zero_keeps_a_reply_as_context(tokenizer, tmp_path):
    conversation = [dict(m) for m in CONVERSATIONS[0]]
    conversation[2]["weight"] = 0
    [(ids, trained)] = read_examples([write_chats(tmp_path / "chat.jsonl", [conversation])],
                                     example_format(tokenizer, "chatml"))
    assert tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False) == "I am fine. 🙂 東京<|im_end|>"


def test_roles_the_template_rejects_name_the_line(tokenizer, tmp_path):
    path = write_chats(tmp_path / "chat.jsonl", [CONVERSATIONS[0], [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]])
    with pytest.raises(EdgeGPTError, match=r"chat\.jsonl:2: .*Conversation roles must alternate") as error:
        read_examples([path], example_format(tokenizer, "gemma"))
    assert "\n" not in str(error.value)


def test_a_template_that_renders_turns_differently_is_refused(tokenizer, tmp_path):
    # The last reply rendered differently from the others (as Qwen3 adds an empty <think> block to it):
    # the incremental render cannot find the earlier replies, and says so instead of guessing.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last and m.role == 'assistant' %}"
                "[last]{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = ExampleFormat(tokenizer, tokenizer.token_to_id("<|im_end|>"), (), ChatTemplate(template), "odd")
    path = write_chats(tmp_path / "chat.jsonl", [CONVERSATIONS[0]])
    with pytest.raises(EdgeGPTError, match=r"chat\.jsonl:1: .*up to message 2 differently"):
        read_examples([path], fmt)
    assert read_examples([path], fmt, include_prompts=True)[0][1].all()
