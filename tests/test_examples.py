"""Fine-tuning examples (edgegpt/train/examples.py, packing.py): reading JSONL records, the bad-data errors,
prompt/completion tokens, packing into rows without crossing examples, and the epoch sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import processors

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, GENERATION_CONFIG, TOKENIZER
from edgegpt.tokenizer import END_OF_TEXT, train_tokenizer
from edgegpt.train.examples import ExampleFormat, is_example_data, load_examples, read_examples
from edgegpt.train.packing import PADDING, pack_examples, row_batches, row_order, sample_rows

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WITH_BOS = "{{ bos_token }}" + CHATML


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(["What is the capital of France? Paris is. Answer: 42.\n" * 30], 300)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"])
    return tokenizer


def jsonl(path, *records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def checkpoint_dir(tmp_path, tokenizer, generation=None, template=None):
    directory = tmp_path / "checkpoint"
    directory.mkdir(parents=True)
    (directory / TOKENIZER).write_text(tokenizer.to_str(), encoding="utf-8")
    if generation is not None:
        (directory / GENERATION_CONFIG).write_text(json.dumps(generation), encoding="utf-8")
    if template is not None:
        (directory / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    return directory


# -- prompt/completion --------------------------------------------------------------------------------


def test_prompt_completion_is_raw_text_ending_in_end_of_text(tokenizer, tmp_path):
    fmt = ExampleFormat.from_tokenizer(tokenizer)
    path = jsonl(tmp_path / "pc.jsonl", {"prompt": "Q: capital of France?\nA:", "completion": " Paris"})
    [(ids, trained)] = read_examples([path], fmt)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    prompt = tokenizer.encode("Q: capital of France?\nA:", add_special_tokens=False).ids
    completion = tokenizer.encode(" Paris", add_special_tokens=False).ids
    assert ids.tolist() == [eot, *prompt, *completion, eot]  # started as data.py starts every document
    assert tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False) == " Paris" + END_OF_TEXT
    [(_, everything)] = read_examples([path], fmt, include_prompts=True)
    assert everything.all()


def test_an_imported_checkpoint_starts_with_bos_only_where_its_tokenizer_adds_one(tokenizer, tmp_path):
    adding = train_tokenizer(["What is the capital of France? Paris.\n" * 30], 300)
    adding.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"])
    bos, eos = adding.token_to_id("<s>"), adding.token_to_id("<|im_end|>")
    adding.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    generation = {"bos_token_id": bos, "eos_token_id": [eos, 0]}
    fmt = ExampleFormat.from_checkpoint(checkpoint_dir(tmp_path, adding, generation, WITH_BOS))
    assert (fmt.text_start, fmt.eos_id) == ((bos,), eos)
    path = jsonl(tmp_path / "mixed.jsonl", {"prompt": "Paris?", "completion": " Yes."}, chat("Capital?", "Paris"))
    (text_ids, _), (chat_ids, chat_trained) = read_examples([path], fmt)
    assert text_ids[0] == bos and text_ids[1] != bos and text_ids[-1] == eos
    # The template writes bos itself: the chat is encoded without adding another.
    assert chat_ids[0] == bos and (chat_ids == bos).sum() == 1
    assert adding.decode(chat_ids[chat_trained].tolist(), skip_special_tokens=False) == "Paris<|im_end|>"
    # A tokenizer that adds nothing (SmolLM2's) gets nothing before a raw-text example.
    fmt = ExampleFormat.from_checkpoint(checkpoint_dir(tmp_path / "plain", tokenizer, generation, CHATML))
    assert fmt.text_start == ()


# -- bad data -----------------------------------------------------------------------------------------

GOOD = json.dumps(chat("Capital of France?", "Paris"))
BAD_RECORDS = {
    "not JSON": ('{"messages": [', r"data\.jsonl:2 is not valid JSON"),
    "neither kind": ('{"text": "hello"}', r"data\.jsonl:2 is neither .*messages.*prompt"),
    "a list": ("[1, 2]", r"data\.jsonl:2 is neither"),
    "no content": ('{"messages": [{"role": "user"}]}', r"data\.jsonl:2: message 0 lacks 'content'"),
    "no role": ('{"messages": [{"content": "hi"}]}', r"data\.jsonl:2: message 0 lacks 'role'"),
    "content not text": ('{"messages": [{"role": "user", "content": 3}]}',
                         r"data\.jsonl:2: message 0's content must be a string"),
    "messages not a list": ('{"messages": "hi"}', r"data\.jsonl:2: messages must be a list"),
    "no reply": ('{"messages": [{"role": "user", "content": "hi"}]}', r"data\.jsonl:2 has no assistant message"),
    "reply first": ('{"messages": [{"role": "assistant", "content": "hi"}]}',
                    r"data\.jsonl:2: the conversation opens with an assistant message"),
    "bad weight": ('{"messages": [{"role": "user", "content": "a", "weight": 0}]}',
                   r"data\.jsonl:2: message 0's weight"),
    "prompt not text": ('{"prompt": 1, "completion": "x"}', r'data\.jsonl:2: "prompt" must be a string'),
    "no completion": ('{"prompt": "x"}', r'data\.jsonl:2: "completion" must be a string, got nothing'),
    "extra key": ('{"prompt": "x", "completion": "y", "label": 1}', r"data\.jsonl:2: .*also has 'label'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_is_one_line_naming_file_and_line(tokenizer, tmp_path, case):
    record, message = BAD_RECORDS[case]
    fmt = ExampleFormat.from_tokenizer(tokenizer, template=ExampleFormat.from_checkpoint(
        checkpoint_dir(tmp_path, tokenizer, {"eos_token_id": 0}, CHATML)).template)
    with pytest.raises(EdgeGPTError, match=message) as error:
        read_examples([jsonl(tmp_path / "data.jsonl", GOOD, record)], fmt)
    assert "\n" not in str(error.value)


def test_chat_data_for_a_checkpoint_without_a_template(tokenizer, tmp_path):
    fmt = ExampleFormat.from_checkpoint(checkpoint_dir(tmp_path, tokenizer))
    path = jsonl(tmp_path / "data.jsonl", {"prompt": "a", "completion": "b"}, GOOD)
    with pytest.raises(EdgeGPTError, match=r"data\.jsonl:2 is chat data .* has no chat template"):
        read_examples([path], fmt)


def test_an_empty_file(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(EdgeGPTError, match=r"empty\.jsonl holds no examples"):
        read_examples([tmp_path / "empty.jsonl"], ExampleFormat.from_tokenizer(tokenizer))


def test_lines_are_counted_by_newlines_only(tokenizer, tmp_path):
    # U+2028 is a line break to str.splitlines but plain text inside a JSON string.
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n{bad\n",
                    encoding="utf-8")
    with pytest.raises(EdgeGPTError, match=r"data\.jsonl:2 is not valid JSON"):
        read_examples([path], ExampleFormat.from_tokenizer(tokenizer))


def test_is_example_data(tokenizer, tmp_path):
    examples = jsonl(tmp_path / "chat.jsonl", GOOD)
    text = jsonl(tmp_path / "text.jsonl", {"text": "plain"})
    assert is_example_data([examples]) and not is_example_data([text])
    with pytest.raises(EdgeGPTError, match="mixes plain text"):
        is_example_data([examples, text])
    named = jsonl(tmp_path / "pairs.json", {"prompt": "a", "completion": "b"})  # a file given is read, any suffix
    assert is_example_data([named])
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "a.jsonl", GOOD)
    (folder / "notes.bin").write_bytes(b"\x00")  # not a file the corpus reader would take: ignored
    assert is_example_data([folder])
    (folder / "readme.md").write_text("plain", encoding="utf-8")
    with pytest.raises(EdgeGPTError, match="mixes plain text"):
        is_example_data([folder])


def test_a_bad_generation_config_names_its_file(tokenizer, tmp_path):
    directory = checkpoint_dir(tmp_path, tokenizer, {"eos_token_id": "</s>"}, CHATML)
    with pytest.raises(EdgeGPTError, match=r"generation_config\.json: eos_token_id must be a token id"):
        ExampleFormat.from_checkpoint(directory)


# -- packing ------------------------------------------------------------------------------------------


def example(length: int, first_id: int, trained_from: int = 1):
    ids = np.arange(first_id, first_id + length, dtype=np.int32)
    return ids, np.arange(length) >= trained_from


def test_packing_keeps_every_example_whole_and_masks_across_examples():
    examples = [example(n, 100 * i, trained_from=2) for i, n in enumerate([5, 9, 3, 9, 4, 2, 7])]
    rows = pack_examples(examples, block_size=9, pad_id=0)
    assert rows.tokens.shape == rows.documents.shape == (len(rows), 10) and rows.loss_mask.shape == (len(rows), 9)
    assert rows.tokens.dtype == rows.documents.dtype == np.int32 and rows.loss_mask.dtype == bool
    found = []
    for tokens, documents, mask in zip(rows.tokens, rows.documents, rows.loss_mask):
        for document in range(documents.max() + 1):
            at = np.flatnonzero(documents == document)
            assert (np.diff(at) == 1).all()  # contiguous
            found.append(tuple(tokens[at]))
            # labels inside the example, from its third token on (trained_from=2), never its first
            labels = at[1:] - 1
            assert mask[labels].tolist() == [j >= 2 for j in range(1, len(at))]
        assert not mask[documents[1:] < 0].any() and not mask[documents[1:] != documents[:-1]].any()
        assert (tokens[documents == PADDING] == 0).all()
    assert sorted(found) == sorted(tuple(ids) for ids, _ in examples)
    assert len(rows) == 5 and rows.trained_tokens == sum(n - 2 for n in [5, 9, 3, 9, 4, 2, 7])
    assert rows.filled == pytest.approx(39 / 50)
    again = pack_examples(examples, block_size=9, pad_id=0)
    assert (again.tokens == rows.tokens).all() and (again.documents == rows.documents).all()


def test_best_fit_fills_rows_that_greedy_file_order_would_leave_half_empty():
    lengths = [6, 5, 5, 6, 4, 4, 5, 5]  # 40 tokens: best-fit decreasing fills four rows of 10 exactly
    rows = pack_examples([example(n, 0) for n in lengths], block_size=9, pad_id=0)
    assert len(rows) == 4 and rows.filled == 1.0


def test_sample_rows_sees_every_row_once_per_epoch():
    rows = pack_examples([example(4, 10 * i) for i in range(10)], block_size=3, pad_id=0)  # one example a row
    assert len(rows) == 10
    drawn = np.concatenate([row_order(10, 4, seed=7, step=step) for step in range(5)])  # two epochs
    assert sorted(drawn[:10]) == sorted(drawn[10:20]) == list(range(10))
    assert drawn[:10].tolist() != drawn[10:20].tolist()  # each epoch its own order
    assert (row_order(10, 4, seed=7, step=3) == drawn[12:16]).all()  # from (seed, step) alone
    assert row_order(10, 4, seed=8, step=0).tolist() != drawn[:4].tolist()
    tokens, loss_mask, documents = sample_rows(rows, 4, seed=7, step=1)
    assert tokens.dtype == documents.dtype == np.int64 and tokens.shape == (4, 4) and loss_mask.shape == (4, 3)
    assert (tokens == rows.tokens[drawn[4:8]]).all()
    # A batch larger than the data spans epochs and still draws each row once per epoch.
    assert sorted(row_order(3, 6, seed=0, step=0)) == [0, 0, 1, 1, 2, 2]
    batches = list(row_batches(rows, 4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert (np.concatenate([b[0] for b in batches]) == rows.tokens).all()
    assert (np.concatenate([b[1] for b in batches]) == rows.loss_mask).all()


# -- loading ------------------------------------------------------------------------------------------


def test_load_examples_splits_truncates_and_summarizes(tokenizer, tmp_path):
    fmt = ExampleFormat.from_tokenizer(tokenizer)
    records = [{"prompt": f"Question {i}?", "completion": " Answer: 42." * (1 + i % 3)} for i in range(20)]
    records.append({"prompt": "long " * 80, "completion": " tail"})  # its completion falls past the cut: dropped
    records.append({"prompt": "Q?", "completion": " What is the capital of France? " * 20})  # truncated
    path = jsonl(tmp_path / "train.jsonl", *records)
    data = load_examples([path], fmt, block_size=48, val_fraction=0.2, seed=3)
    summary = data.summary
    assert summary.examples + summary.val_examples == 21 and summary.val_examples == 4
    assert (summary.truncated, summary.dropped) == (1, 1)
    assert summary.rows == len(data.train) and summary.val_rows == len(data.val)
    assert summary.tokens == int((data.train.documents >= 0).sum())
    assert summary.efficiency == pytest.approx(summary.tokens / (summary.rows * 49))
    assert summary.trained_tokens == data.train.trained_tokens > 0
    assert "1 truncated, 1 dropped" in summary.describe()
    same = load_examples([path], fmt, block_size=48, val_fraction=0.2, seed=3)
    assert (same.val.tokens == data.val.tokens).all()
    dropping = load_examples([path], fmt, block_size=48, val_fraction=0.2, seed=3, drop_long=True).summary
    assert (dropping.truncated, dropping.dropped) == (0, 2)
    val = jsonl(tmp_path / "val.jsonl", {"prompt": "Q?", "completion": " A."})
    held = load_examples([path], fmt, block_size=48, val_path=val)
    assert held.summary.val_examples == 1 and held.summary.examples == 21
    assert load_examples([path], fmt, block_size=48, val_path=[val, val]).summary.val_examples == 2


def test_a_single_example_needs_a_validation_file(tokenizer, tmp_path):
    path = jsonl(tmp_path / "one.jsonl", {"prompt": "Q?", "completion": " A."})
    with pytest.raises(EdgeGPTError, match="holds 1 example; validation needs one more"):
        load_examples([path], ExampleFormat.from_tokenizer(tokenizer), block_size=16)
    data = load_examples([path], ExampleFormat.from_tokenizer(tokenizer), block_size=16, val_path=path)
    assert len(data.train) == len(data.val) == 1


# -- the model reads packed rows ----------------------------------------------------------------------


@pytest.mark.slow
def test_packed_rows_give_each_example_its_own_logits_and_loss(tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    from edgegpt.core.config import preset
    from edgegpt.model import GPT

    fmt = ExampleFormat.from_checkpoint(checkpoint_dir(tmp_path, tokenizer, {"eos_token_id": 0}, CHATML))
    records = [chat(f"Question {i}: capital of France?" * (1 + i % 3), "Paris is. " * (1 + i % 2)) for i in range(6)]
    examples = {tuple(ids.tolist()): trained for ids, trained in read_examples([jsonl(tmp_path / "c.jsonl", *records)],
                                                                                 fmt)}
    rows = pack_examples(list(examples.items()), block_size=127, pad_id=fmt.eos_id)
    assert len(rows) < len(examples)  # several examples share a row
    torch.manual_seed(0)
    model = GPT(preset("nano", max_len=128, vocab_size=tokenizer.get_vocab_size())).eval()
    tokens, loss_mask, documents = (torch.from_numpy(a) for a in sample_rows(rows, len(rows), seed=0, step=0))
    with torch.no_grad():
        logits = model(tokens[:, :-1], documents=documents[:, :-1])
        nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        alone_nats, seen = 0.0, 0
        for row in range(len(tokens)):
            for document in range(int(documents[row].max()) + 1):
                at = torch.nonzero(documents[row] == document)[:, 0]
                ids = tokens[row, at]
                alone = model(ids[None, :-1])[0]
                assert (logits[row, at[:-1]] - alone).abs().max().item() <= 1e-5
                targets = torch.from_numpy(examples[tuple(ids.tolist())][1:])
                alone_nats += torch.nn.functional.cross_entropy(alone[targets], ids[1:][targets],
                                                                reduction="sum").item()
                seen += 1
    assert seen == len(examples)
    assert nats[loss_mask].sum().item() == pytest.approx(alone_nats, rel=1e-5)
