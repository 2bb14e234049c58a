"""Chat templates (runtime/chat_template.py): rendered exactly as transformers' apply_chat_template renders
them, bounded and sandboxed, and carried through Generator.chat / stream_chat, `edgegpt generate --chat`
and `edgegpt chat`. The templates are real models' templates written out here: no network."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PLAIN_CHAT, package_with
from edgegpt.cli.app import app
from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime import Generator
from edgegpt.runtime.chat_template import ChatTemplate

runner = CliRunner()

# Hugging Face's ChatML, as in Qwen and SmolLM tokenizer_config.json files.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct: bos_token written by the template, contents trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# Mistral-7B-Instruct-v0.1: [INST] blocks, raise_exception when user and assistant do not alternate.
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Qwen2-Instruct's: a default system prompt when the conversation has none.
DEFAULT_SYSTEM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Zephyr's: one block tag per indented line, which only trim_blocks and lstrip_blocks render as intended.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""
# tojson (transformers': plain JSON, no HTML escaping), loop controls, a {% generation %} block, tools/documents.
TOOLS_STYLE = ("{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
               "{{ message | tojson }}{% if message['role'] == 'assistant' %}{% generation %}[{{ message['content'] }}]"
               "{% endgeneration %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}"
               "{{ messages[0] | tojson(indent=2, sort_keys=True) }}{{ tools is none }}{{ documents is none }}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>"]
TEMPLATES = {  # name: (template, bos_token, eos_token)
    "chatml": (CHATML, None, "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "default_system": (DEFAULT_SYSTEM, None, "<|im_end|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
    "tools_style": (TOOLS_STYLE, "<s>", "</s>"),
}
CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is the capital of France?"}],
    "system first": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "  Hi there  "}],
    "three turns": [{"role": "user", "content": "<b>é ü 😀 & 'q'</b>"}, {"role": "assistant", "content": "Paris.\n\n"},
                    {"role": "user", "content": "And {{ Germany }}?"}],
}


def hf_tokenizer(template: str, bos: str | None, eos: str | None):
    """A transformers tokenizer over a tiny tokenizers.Tokenizer holding the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL, "[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL)
    # A post-processor that adds bos, as Llama tokenizers have: rendering must not add it a second time.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in (("bos_token", bos),
                                                                                    ("eos_token", eos)) if v})
    hf.chat_template = template
    return hf, tokenizer


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "mistral"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(name, conversation, add_generation_prompt):
    template, bos, eos = TEMPLATES[name]
    hf, tokenizer = hf_tokenizer(template, bos, eos)
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(template, bos, eos).render(messages, add_generation_prompt)
    assert ours == expected
    # Encoded as transformers encodes it: the template wrote the special tokens, none is added again.
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert tokenizer.encode(ours, add_special_tokens=False).ids == list(expected_ids)


def test_mistral_renders_as_transformers_and_refuses_what_it_refuses():
    from jinja2.exceptions import TemplateError

    template, bos, eos = TEMPLATES["mistral"]
    hf, _ = hf_tokenizer(template, bos, eos)
    ours = ChatTemplate(template, bos, eos, origin="mistral.jinja")
    alternating = CONVERSATIONS["three turns"]
    for add in (True, False):
        assert ours.render(alternating, add) == hf.apply_chat_template(alternating, tokenize=False,
                                                                       add_generation_prompt=add)
    for bad in (CONVERSATIONS["system first"], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(TemplateError):
            hf.apply_chat_template(bad, tokenize=False)
        with pytest.raises(EdgeGPTError) as refused:
            ours.render(bad)
        message = str(refused.value)
        assert message.startswith("mistral.jinja failed to render the conversation: it raised: ")
        assert "must alternate" in message or "Only user and assistant" in message
        assert "\n" not in message


def test_strftime_now_and_undefined_values_print_as_transformers_does():
    template = "{{ strftime_now('%Y') }}|{{ nothing }}|{{ bos_token }}|{% if custom is defined %}x{% endif %}"
    hf, _ = hf_tokenizer(template, None, "</s>")
    messages = CONVERSATIONS["one question"]
    assert ChatTemplate(template, None, "</s>").render(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert ChatTemplate(template).render(messages) == f"{time.strftime('%Y')}|||"


# -- bad templates and bad messages: each one line, naming the problem ---------------------------------

BAD_TEMPLATES = [
    ("{% for m in messages %}", "is not a valid Jinja template (line 1"),
    ("{{ messages | no_such_filter }}", "is not a valid Jinja template"),
    ("{{ raise_exception('system messages are not supported') }}", "it raised: system messages are not supported"),
    ("{{ nothing.attribute }}", "it used an undefined value: 'nothing' is undefined"),
    ("{{ messages[0]['content'].__class__ }}", "reached outside its sandbox: it accessed the attribute '__class__'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "reached outside its sandbox"),
    ("{{ messages.append(1) }}", "reached outside its sandbox: it accessed the attribute 'append'"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "a loop too long"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "it recursed too deep"),
    pytest.param("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                 "a loop too long", marks=pytest.mark.slow),  # over a second: it runs until the limit stops it
    ("{% for i in range(99999) %}{{ messages | tojson }}{% endfor %}", "its output passed 1,000,"),
    ("{{ 'x' * 10 ** 9 }}", "repeating a value 1e+09 times"),
    ("{{ 10 ** 100000 }}", "would pass the integer limit"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "it built a value of"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "a concatenation would pass"),
    ("{{ 'x' | center(10 ** 9) }}", "an argument of 1e+09 is beyond the limit"),
    ("{{ 'x'.ljust(10 ** 9) }}", "an argument of 1e+09 is beyond the limit"),
    ("{{ '%999999999s' % 'x' }}", "a %-format with a width"),
    ("{{ range(10 ** 6) | list }}", "a range is too long"),
    ("{{ 1 + 'a' }}", "TypeError: unsupported operand"),
]


@pytest.mark.parametrize("template,message", BAD_TEMPLATES)
def test_a_bad_template_is_one_clear_error(template, message):
    started = time.perf_counter()
    with pytest.raises(EdgeGPTError) as error:
        ChatTemplate(template, origin="pkg/chat_template.jinja").render(CONVERSATIONS["one question"])
    text = str(error.value)
    assert text.startswith("pkg/chat_template.jinja ") and message in text, text
    assert "\n" not in text and len(text) < 400
    assert time.perf_counter() - started < 30, "the budget did not stop it"  # a loose bound: a hang fails


BAD_MESSAGES = [
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    ([], "messages is empty"),
    (["hi"], "message 0 must be a dict"),
    ([{"role": "user"}], "message 0 lacks 'content'"),
    ([{"content": "hi"}], "message 0 lacks 'role'"),
    ([{"role": "user", "content": "hi", "name": "x"}], "message 0 has the key 'name'"),
    ([{"role": "user", "content": "hi"}, {"role": "", "content": "hi"}], "message 1's role must be a non-empty"),
    ([{"role": 1, "content": "hi"}], "message 0's role must be a non-empty string"),
    ([{"role": "user", "content": ["a", "b"]}], "message 0's content must be a string, got list"),
    ([{"role": "user", "content": None}], "message 0's content must be a string, got NoneType"),
    ([{"role": "user", "content": "bad \udc80"}], "message 0's content is not valid UTF-8"),
]


@pytest.mark.parametrize("messages,message", BAD_MESSAGES)
def test_bad_messages_are_one_clear_error(messages, message):
    with pytest.raises(EdgeGPTError, match="^" + re.escape(message)) as error:
        ChatTemplate(CHATML).render(messages)
    assert "\n" not in str(error.value)


# -- through the Generator and the command line, on the tiny package ---------------------------------

@pytest.fixture(scope="module")
def chat_package(tiny_package, tmp_path_factory) -> Path:
    return package_with(tiny_package, tmp_path_factory.mktemp("chat") / "model", PLAIN_CHAT)


@pytest.fixture(scope="module")
def gen(chat_package) -> Generator:
    return Generator.load(chat_package, provider="cpu")


QUESTION = [{"role": "user", "content": "What does the import statement do?"}]
GREEDY = dict(max_new_tokens=16, temperature=0)


def test_chat_generates_from_the_rendered_conversation(gen):
    rendered = gen.render_chat(QUESTION)
    assert rendered == "user: What does the import statement do?\nassistant:"
    ids = gen.package.tokenizer.encode(rendered, add_special_tokens=False).ids
    expected = gen.package.tokenizer.decode(gen.generate_ids(ids, **GREEDY))
    assert expected.strip(), "the tiny model said nothing: the comparison would be weak"
    stream = gen.stream_chat(QUESTION, **GREEDY)
    assert "".join(stream) == expected == gen.chat(QUESTION, **GREEDY)
    assert stream.finish_reason == "length"
    assert gen.chat(QUESTION, max_new_tokens=16, temperature=1.0, seed=3) == \
        gen.chat(QUESTION, max_new_tokens=16, temperature=1.0, seed=3)


def test_an_eos_list_stops_the_chat_at_any_of_its_ids(gen, chat_package, tmp_path):
    ids = gen.package.tokenizer.encode(gen.render_chat(QUESTION), add_special_tokens=False).ids
    plain = gen.generate_ids(ids, max_new_tokens=20, temperature=0, stop_at_eos=False)
    # The last token to appear for the first time in the reply this CPU generated (not the first token, not the
    # package's own eos): made an eos id, the reply must end just before it.
    first_appearances = [i for i in range(1, len(plain)) if plain[i] not in plain[:i] and plain[i] != 0]
    assert first_appearances, f"the reply is one token repeated, nothing to stop at: {plain}"
    at = first_appearances[-1]
    stopping = Generator.load(package_with(chat_package, tmp_path / "model", None, eos_token_id=[0, plain[at]]))
    stream = stopping.stream_chat(QUESTION, max_new_tokens=20, temperature=0)
    assert "".join(stream) == gen.package.tokenizer.decode(plain[:at]) and stream.finish_reason == "eos"
    assert stopping.chat(QUESTION, max_new_tokens=20, temperature=0, stop_at_eos=False) == \
        gen.package.tokenizer.decode(plain)


def test_chat_options_and_cancel_behave_as_in_stream(gen):
    import threading

    reply = gen.chat(QUESTION, **GREEDY)
    stop = reply[3:6]
    assert gen.chat(QUESTION, stop=stop, **GREEDY) == reply[: reply.index(stop)]
    cancel = threading.Event()
    cancel.set()
    stream = gen.stream_chat(QUESTION, cancel=cancel, **GREEDY)
    assert list(stream) == [] and stream.finish_reason == "cancelled"
    with pytest.raises(EdgeGPTError, match="top_p"):
        gen.stream_chat(QUESTION, top_p=2)  # checked before the first token is asked for
    with pytest.raises(EdgeGPTError, match="message 0 lacks 'content'"):
        gen.chat([{"role": "user"}])


def test_a_long_conversation_drops_its_oldest_turns_or_is_an_error(gen, corpus_text):
    lines = [line for line in corpus_text.splitlines() if len(line) > 60][:12]
    conversation = [{"role": "system", "content": "Be brief."}]
    for line in lines:
        conversation += [{"role": "user", "content": line}, {"role": "assistant", "content": line[::-1]}]
    conversation.append({"role": "user", "content": "What now?"})
    too_long = r"the conversation is [\d,]+ tokens but the model's context is 128 tokens; drop its oldest turns"
    with pytest.raises(EdgeGPTError, match=too_long):
        gen.chat(conversation, **GREEDY)
    fitted = gen.fit_chat(conversation, max_new_tokens=16)
    # The system message and the last turn stay, whole turns go, and the kept ones are the newest.
    assert fitted[0] == conversation[0] and fitted[-1] == conversation[-1] and fitted[1]["role"] == "user"
    assert fitted == conversation[:1] + conversation[len(conversation) - len(fitted) + 1:]
    tokens = len(gen.package.tokenizer.encode(gen.render_chat(fitted), add_special_tokens=False).ids)
    assert tokens <= 128 - 16
    longer = conversation[:1] + conversation[len(conversation) - len(fitted) - 1:]
    assert len(gen.package.tokenizer.encode(gen.render_chat(longer), add_special_tokens=False).ids) > 128 - 16
    assert gen.chat(conversation, truncate="left", **GREEDY) == gen.chat(fitted, **GREEDY)
    alone = [{"role": "user", "content": " ".join(lines)}]
    with pytest.raises(EdgeGPTError, match="last turn and system messages alone are"):
        gen.chat(alone, truncate="left", **GREEDY)


def test_a_package_without_a_template_or_with_a_broken_one(tiny_package, tmp_path):
    plain = Generator.load(tiny_package, provider="cpu")
    with pytest.raises(EdgeGPTError, match="has no chat template .*chat_template.jinja.*generate()"):
        plain.chat(QUESTION)
    broken = Generator.load(package_with(tiny_package, tmp_path / "model", "{% if %}"), provider="cpu")
    assert broken.generate("The ", max_new_tokens=3, temperature=0)  # text generation does not need it
    with pytest.raises(EdgeGPTError, match=r"model/chat_template.jinja is not a valid Jinja template"):
        broken.chat(QUESTION)


def test_the_template_sees_the_packages_bos_and_eos_strings(tiny_package, tmp_path):
    template = "[{{ bos_token }}|{{ eos_token }}]{% for m in messages %}{{ m['content'] }}{% endfor %}"
    without_bos = Generator.load(package_with(tiny_package, tmp_path / "a", template), provider="cpu")
    assert without_bos.render_chat(QUESTION) == "[|<|endoftext|>]What does the import statement do?"
    with_bos = Generator.load(package_with(tiny_package, tmp_path / "b", template, bos_token_id=0), provider="cpu")
    assert with_bos.render_chat(QUESTION).startswith("[<|endoftext|>|<|endoftext|>]")
    ids = with_bos.package.tokenizer.encode(with_bos.render_chat(QUESTION), add_special_tokens=False).ids
    assert ids.count(0) == 2  # the special token is one token each time the template writes it


def test_cli_generate_chat_asks_one_question(gen, chat_package, tiny_package):
    question = QUESTION[0]["content"]
    base = ["--max-new-tokens", "16", "--temperature", "0", "--provider", "cpu"]
    result = runner.invoke(app, ["generate", "--chat", question, "--model", str(chat_package), *base])
    assert result.exit_code == 0, result.output
    assert result.stdout == gen.chat(QUESTION, **GREEDY) + "\n"
    plain = runner.invoke(app, ["generate", "--chat", question, "--model", str(tiny_package), *base])
    assert plain.exit_code == 2 and plain.stderr.startswith("edgegpt: error: ") and "no chat template" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1


def kept_and_reset_replies(gen: Generator, openers, follow_up: str) -> tuple[str, str, str, str]:
    """The first opener after which the greedy reply to follow_up differs from its reply in a fresh
    conversation, with (first reply, reply kept, reply after a reset): what a briefly trained model lets the
    earlier turn change depends on the CPU's rounding, so it is looked for rather than assumed."""
    after_reset = gen.chat([{"role": "user", "content": follow_up}], **GREEDY)
    for opener in openers:
        first = gen.chat([{"role": "user", "content": opener}], **GREEDY)
        kept = gen.chat([{"role": "user", "content": opener}, {"role": "assistant", "content": first},
                         {"role": "user", "content": follow_up}], **GREEDY)
        if kept != after_reset:
            return opener, first, kept, after_reset
    pytest.fail("no opener changes the reply to the follow-up: the test cannot tell a kept conversation from "
                "a reset one")


def test_cli_chat_keeps_the_conversation_as_messages(gen, chat_package, corpus_text):
    openers = ["What is a module?", *(line.strip() for line in corpus_text.splitlines()
                                      if len(line.strip()) > 20 and not line.strip().startswith("/"))]
    opener, first, second, after_reset = kept_and_reset_replies(gen, openers[:200], "And a package?")
    base = ["chat", "--model", str(chat_package), "--max-new-tokens", "16", "--temperature", "0", "--provider", "cpu"]
    result = runner.invoke(app, base, input=f"{opener}\nAnd a package?\n/reset\nAnd a package?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n"


def test_cli_chat_with_a_template_drops_the_oldest_turns(chat_package, corpus_text):
    lines = [line for line in corpus_text.splitlines() if len(line) > 60][:12]
    base = ["chat", "--model", str(chat_package), "--max-new-tokens", "16", "--temperature", "0", "--provider", "cpu"]
    result = runner.invoke(app, base, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") >= len(lines)
    strict = runner.invoke(app, [*base, "--truncate", "none"], input="\n".join(lines) + "\n")
    assert strict.exit_code == 2
    assert "edgegpt: error: the conversation is" in strict.stderr.strip().splitlines()[-1]


def test_cli_max_length_caps_generate_and_chat(scripted_package, tmp_path):
    # The scripted package never writes its eos (conftest.SCRIPT), so the context is what ends both replies.
    scripted_chat = package_with(scripted_package, tmp_path / "model", PLAIN_CHAT)
    base = ["--model", str(scripted_chat), "--temperature", "0", "--provider", "cpu", "--max-length", "24"]
    capped = runner.invoke(app, ["generate", "The ", *base, "--max-new-tokens", "50"])
    assert capped.exit_code == 0, capped.output
    assert capped.stderr.strip() == "edgegpt: the model's context (24 tokens) is full; " \
                                    "generation stopped before --max-new-tokens"
    chat = runner.invoke(app, ["chat", *base, "--max-new-tokens", "50"], input="What is a module?\n")
    assert chat.exit_code == 0, chat.output
    assert "(the context of 24 tokens is full: the reply was cut short)" in chat.stderr
    bad = runner.invoke(app, ["generate", "The ", *base[:-1], "0"])
    assert bad.exit_code == 2 and "max_length must be an integer from 1" in bad.stderr


def test_threads_chat_at_once_on_one_generator(gen):
    import threading

    conversations = [[{"role": "user", "content": f"What is item {i}?"}] for i in range(4)]
    expected = [gen.chat(c, max_new_tokens=24, temperature=1.0, seed=i) for i, c in enumerate(conversations)]
    results: list[str | None] = [None] * 4

    def work(i: int) -> None:
        results[i] = gen.chat(conversations[i], max_new_tokens=24, temperature=1.0, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected and len(set(expected)) > 1
