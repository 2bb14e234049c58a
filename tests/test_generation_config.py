"""What an imported model brings along, carried from checkpoint to package to runtime: several end-of-text
ids, a beginning-of-text id, its own sampling defaults, and its chat template (docs/FORMATS.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgegpt.core.errors import EdgeGPTError
from edgegpt.core.formats import CHAT_TEMPLATE, GENERATION_CONFIG, MANIFEST
from edgegpt.runtime import Generator, ModelPackage

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def package_copy(tiny_package, tmp_path) -> Path:
    copy = Path(shutil.copytree(tiny_package, tmp_path / "model"))
    (copy / MANIFEST).unlink()  # these tests edit files; the manifest's hashes are tested elsewhere
    return copy


def edit_generation(package: Path, **fields) -> None:
    path = package / GENERATION_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_generation_ends_at_any_of_several_eos_ids(package_copy):
    plain = Generator.load(package_copy).generate_ids("The ", max_new_tokens=20, temperature=0, stop_at_eos=False)
    second_eos = plain[5]
    edit_generation(package_copy, eos_token_id=[0, second_eos])
    generator = Generator.load(package_copy)
    assert generator.package.generation.eos_token_ids == (0, second_eos)
    stream = generator.stream_tokens("The ", max_new_tokens=20, temperature=0)
    assert list(stream) == plain[: plain.index(second_eos)] and stream.finish_reason == "eos"


@pytest.mark.parametrize("value", [[], [-1], ["2"], True, [0, 10**9]])
def test_bad_eos_ids_are_refused(package_copy, value):
    edit_generation(package_copy, eos_token_id=value)
    with pytest.raises(EdgeGPTError, match="eos_token_id|token id"):
        ModelPackage.load(package_copy)


def test_a_chat_template_is_read_and_must_be_listed_in_the_manifest(tiny_package, tmp_path):
    copy = Path(shutil.copytree(tiny_package, tmp_path / "model"))
    assert ModelPackage.load(copy).chat_template is None
    (copy / CHAT_TEMPLATE).write_text(CHATML)
    with pytest.raises(EdgeGPTError, match="not listed in manifest.json"):
        ModelPackage.load(copy)
    (copy / MANIFEST).unlink()
    assert ModelPackage.load(copy).chat_template == CHATML


def test_export_carries_the_checkpoints_generation_config_and_chat_template(tiny_checkpoint, tmp_path):
    from edgegpt.export import export_package

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    (checkpoint / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": [0, 7], "bos_token_id": 5,
                                                            "temperature": 0.6, "top_p": 0.9}))
    (checkpoint / CHAT_TEMPLATE).write_text(CHATML)
    export_package(checkpoint, tmp_path / "model", gate=False)
    package = ModelPackage.load(tmp_path / "model")  # with its manifest: the template is listed and verified
    assert package.chat_template == CHATML
    assert package.generation.eos_token_ids == (0, 7) and package.generation.bos_token_id == 5
    assert (package.generation.temperature, package.generation.top_p, package.generation.top_k) == (0.6, 0.9, 50)
    assert CHAT_TEMPLATE in json.loads((tmp_path / "model" / MANIFEST).read_text())["files"]


def test_a_source_that_asks_for_greedy_decoding_gets_it(tiny_checkpoint, tmp_path):
    from edgegpt.export import export_package

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    (checkpoint / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": 0, "do_sample": False,
                                                            "temperature": 0.6}))
    export_package(checkpoint, tmp_path / "model", gate=False)
    assert ModelPackage.load(tmp_path / "model").generation.temperature == 0.0
