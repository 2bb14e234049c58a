"""Shared fixtures: a tiny checkpoint trained just enough that its logits are peaked (so greedy
decoding is a meaningful comparison), built once per test session from text that ships with Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SAMPLE_CHARS = 200_000
# Held-out tokens the tests' quality gates score: enough for 15 windows of the tiny model's context.
EVAL_TOKENS = 1024


def sample_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:SAMPLE_CHARS]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return sample_text()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, corpus_text) -> Path:
    import torch

    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.core.config import preset
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer([corpus_text], 512)
    ids = torch.tensor(tokenizer.encode(corpus_text).ids)
    model = GPT(preset("nano", max_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    directory = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(directory, model.eval(), tokenizer)
    return directory


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "python-topics.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """A float32 model package exported from `tiny_checkpoint`."""
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("tiny-package") / "model"
    export_package(tiny_checkpoint, directory)
    return directory


# What the scripted package writes after any prompt whose last token is not one of its own: this, then the
# same again, for as long as it is let run (a blank line sits between the two halves).
SCRIPT = ("Yes, it is", "Then more")


@pytest.fixture(scope="session")
def scripted_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """A float32 package (tiny_checkpoint's tokenizer) whose output the tests control: its next token depends on
    the last token only and wins by ~40 logits, so greedy and sampled text alike is SCRIPT[0] + a token holding a
    blank line + SCRIPT[1], repeated, on every CPU. Tests that need a property of the text (a blank line, where
    a stop string falls) take it from here instead of hoping a briefly trained model happens to write it."""
    import torch
    from tokenizers import Tokenizer

    from edgegpt.checkpoint import save_checkpoint
    from edgegpt.core.config import preset
    from edgegpt.export import export_package
    from edgegpt.model import GPT

    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    blank = next(i for i in sorted(tokenizer.get_vocab().values()) if "\n\n" in tokenizer.decode([i]))
    script = tokenizer.encode(SCRIPT[0]).ids + [blank] + tokenizer.encode(SCRIPT[1]).ids
    assert len(set(script)) == len(script), "a token repeats: the next token could not depend on the last alone"
    config = preset("nano", max_len=128, tie_embeddings=False)
    model = GPT(config).eval()
    # Orthonormal directions scaled to RMS 1, which RMSNorm leaves as they are: row 0 is every other token's
    # embedding, row i + 1 script token i's. With both residual branches zeroed the final hidden state is the
    # last token's embedding, and the head row of each token's successor is that token's direction.
    directions = torch.linalg.qr(torch.randn(config.dim, config.dim, generator=torch.Generator().manual_seed(0)))[0].T
    directions = directions[: len(script) + 1] * config.dim**0.5
    strength = 40.0 / config.dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed.weight.copy_(directions[0].expand_as(model.embed.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[script[0]] += strength * directions[0]
        for i, token in enumerate(script):
            model.embed.weight[token] = directions[i + 1]
            model.lm_head.weight[script[(i + 1) % len(script)]] += strength * directions[i + 1]
    checkpoint = tmp_path_factory.mktemp("scripted") / "checkpoint"
    save_checkpoint(checkpoint, model, tokenizer)
    directory = checkpoint.parent / "model"
    export_package(checkpoint, directory, gate=False)
    return directory


@pytest.fixture(scope="session")
def plain_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """--no-fuse: the plain torch.onnx graph (kv_layout concat), the oracle the fused graph is held to."""
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("plain-package") / "model"
    export_package(tiny_checkpoint, directory, fuse=False)
    return directory


@pytest.fixture(scope="session")
def tiny_package_int8(tmp_path_factory, tiny_checkpoint, corpus_file) -> Path:
    """An int8 model package (the default 8-bit format) exported from `tiny_checkpoint`, its quality
    gate scored on the test corpus (the fixture checkpoint has no training run to take text from)."""
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("tiny-package-int8") / "model"
    export_package(tiny_checkpoint, directory, quantize=True, eval_data=corpus_file, eval_tokens=EVAL_TOKENS)
    return directory


# -- the runtime tests' provider ----------------------------------------------------------------------
# EDGEGPT_TEST_PROVIDER=cuda runs the runtime tests on CUDA with a float16 package (the lead runs them on
# a lent GPU); the default, cpu, uses the float32 packages above. float16 rounds logits to ~1e-3 of their
# size, so parity with PyTorch is then held to RUNTIME_ATOL = 5e-2 instead of 1e-4, and token-for-token
# comparisons to the first RUNTIME_SAME_TOKENS tokens (a near-tie may flip later; in float32 all must agree).
RUNTIME_PROVIDER = __import__("os").environ.get("EDGEGPT_TEST_PROVIDER", "cpu")
RUNTIME_ATOL = 1e-4 if RUNTIME_PROVIDER == "cpu" else 5e-2
RUNTIME_SAME_TOKENS = None if RUNTIME_PROVIDER == "cpu" else 8


@pytest.fixture(scope="session")
def runtime_provider() -> str:
    return RUNTIME_PROVIDER


@pytest.fixture(scope="session")
def runtime_package(tmp_path_factory, tiny_checkpoint, tiny_package) -> Path:
    """The fused package the runtime tests load: tiny_package, or its float16 export under cuda."""
    if RUNTIME_PROVIDER == "cpu":
        return tiny_package
    from edgegpt.export import export_package

    directory = tmp_path_factory.mktemp("tiny-package-fp16") / "model"
    export_package(tiny_checkpoint, directory, precision="fp16", gate=False)
    return directory


def same_tokens(got: list[int], expected: list[int]) -> bool:
    """Token-for-token agreement, up to RUNTIME_SAME_TOKENS under a float16 provider."""
    n = RUNTIME_SAME_TOKENS
    return got == expected if n is None else got[:n] == expected[:n]


def assert_one_line_error(result, *fragments: str) -> None:
    """A CliRunner result that failed the way edgegpt fails: exit 2, one `edgegpt: error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgegpt: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def grow_beside_a_full_cache(generator, check=None) -> tuple[list[int], object]:
    """Feed 100 random tokens, by single steps and by chunks that cross growth boundaries, to a cache that
    starts at 4 positions and to one allocated at max_length: the logits must be equal at every step.
    check(grown) runs after each chunk. Returns the growing cache's capacity after each chunk and the
    full cache."""
    ids = np.random.default_rng(3).integers(0, generator.config.vocab_size, 100).tolist()
    chunks = [ids[:3], *[[t] for t in ids[3:9]], ids[9:15], *[[t] for t in ids[15:40]], ids[40:100]]
    full, grown = generator.empty_cache(capacity=generator.max_length), generator.empty_cache(capacity=4)
    capacities = []
    for chunk in chunks:
        expected, full = generator.forward(chunk, full)
        got, grown = generator.forward(chunk, grown)
        np.testing.assert_array_equal(got, expected)
        capacities.append(grown.capacity)
        if check is not None:
            check(grown)
    return capacities, full


# The tiny model's vocabulary has no chat markers; a template of plain text is what it can be asked with.
PLAIN_CHAT = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")


def package_with(tiny_package: Path, directory: Path, template: str | None, **generation) -> Path:
    """A copy of tiny_package with a chat template and generation_config.json values (no manifest)."""
    import json
    import shutil

    from edgegpt.core.formats import CHAT_TEMPLATE, GENERATION_CONFIG, MANIFEST

    copy = Path(shutil.copytree(tiny_package, directory))
    (copy / MANIFEST).unlink(missing_ok=True)  # edited files would fail its sha256s (tests/test_untrusted.py)
    if template is not None:
        (copy / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    if generation:
        path = copy / GENERATION_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **generation}))
    return copy
