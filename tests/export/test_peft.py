"""PEFT export of an internalized document's adapter: PyTorch + peft reproduce the JAX student."""

from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
from safetensors.numpy import load_file

import d2l_jax
from d2l_jax.export import load_peft_adapter, save_peft
from d2l_jax.hypernet.adapter import batched_adapters
from tests.conftest import randomized, torch_logits

SMALL = d2l_jax.HypernetConfig(
    latent_size=32, n_latent_queries=4, num_blocks=1, num_heads=4, head_dim=8, num_kv_heads=2, lora_rank=4, max_chunk_len=16, max_chunks=4
)


def _adapter(d2l, num_chunks=2, seed=0):
    """An adapter of ``num_chunks`` random-token chunks (the tiny models have no tokenizer)."""
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(3, d2l.base.config.vocab_size, 12).tolist() for _ in range(num_chunks)]
    (adapter,) = batched_adapters(d2l.config, d2l.execution, d2l.base.config, d2l.base.params, d2l.params, [(chunks, 24)])
    return adapter


def _peft_logits(torch_model, directory, ids):
    model = peft.PeftModel.from_pretrained(torch_model, str(directory))
    try:
        return torch_logits(model, ids)
    finally:
        model.unload()  # the session's torch model is shared: take the LoRA layers out again


def _max_difference(d2l, adapter, torch_model, directory, ids):
    mine = np.asarray(d2l.logits(ids, adapter=adapter))
    theirs = _peft_logits(torch_model, directory, ids)
    base = np.asarray(d2l.base.logits(ids))  # not d2l.logits: internalize made the adapter current
    assert np.abs(mine - base).max() > 1e-2  # the adapter changes the logits, so the comparison means something
    return float(np.abs(mine - theirs).max())


@pytest.mark.parametrize("modules", [("down_proj",), ("down_proj", "q_proj", "v_proj")])
def test_peft_reproduces_the_student_on_tiny_llama(tiny_llama, tmp_path, modules):
    base, torch_model = tiny_llama
    d2l = randomized(d2l_jax.D2L.create(base, SMALL.replace(target_modules=modules)))
    adapter = _adapter(d2l)
    # A bucketed adapter keeps zero ranks past the ones in use: they are not written.
    pad = lambda x: np.pad(np.asarray(x), ((0, 0), (0, 0), (0, 4), (0, 0)))
    adapter = adapter.replace(lora=jax.tree.map(pad, adapter.lora))
    assert adapter.rank == 12 and adapter.A[modules[0]].shape[2] == 16
    save_peft(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == adapter.rank and config["lora_alpha"] == pytest.approx(d2l.config.alpha * adapter.rank)
    ids = np.random.default_rng(1).integers(3, base.config.vocab_size, (2, 9))
    difference = _max_difference(d2l, adapter, torch_model, tmp_path, ids)
    print(f"tiny llama {modules}: max |logit difference| {difference:.2e}")
    assert difference < 1e-4


def test_layers_without_adapter_rows_are_left_out(tiny_llama, tmp_path):
    base, torch_model = tiny_llama
    d2l = randomized(d2l_jax.D2L.create(base, SMALL.replace(adapted_layers=2)))
    adapter = _adapter(d2l)
    save_peft(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1, 2]
    assert not any(".layers.0." in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    ids = np.random.default_rng(2).integers(3, base.config.vocab_size, (1, 11))
    assert _max_difference(d2l, adapter, torch_model, tmp_path, ids) < 1e-4


def test_peft_round_trip_gives_the_identical_adapter(tiny_llama, tmp_path):
    base, _ = tiny_llama
    d2l = randomized(d2l_jax.D2L.create(base, SMALL.replace(adapted_layers=2, target_modules=("down_proj", "k_proj"))))
    adapter = _adapter(d2l, num_chunks=3)
    back = load_peft_adapter(save_peft(adapter, tmp_path))
    assert (back.rank, back.num_tokens, back.num_chunks, back.lora.alpha) == (adapter.rank, adapter.num_tokens, adapter.num_chunks, adapter.lora.alpha)
    for mine, theirs in zip(jax.tree.leaves(adapter.lora), jax.tree.leaves(back.lora), strict=True):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_peft_export_refuses_a_batch_of_adapters(tiny_llama, tmp_path):
    base, _ = tiny_llama
    adapter = _adapter(randomized(d2l_jax.D2L.create(base, SMALL)))
    doubled = adapter.replace(lora=jax.tree.map(lambda x: np.concatenate([x, x]), adapter.lora))
    with pytest.raises(ValueError, match=r"\[1, L, R, d_in\]"):
        save_peft(doubled, tmp_path)


def test_peft_reproduces_the_student_on_smollm2(smollm2, smollm2_torch, tmp_path):
    d2l = randomized(d2l_jax.D2L.create(smollm2, SMALL.replace(max_chunk_len=64)), seed=3)
    adapter = d2l.internalize("The vault code is 4812. It opens the north door of the old observatory.")
    save_peft(adapter, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = smollm2.tokenizer("What is the vault code?")["input_ids"]
    difference = _max_difference(d2l, adapter, smollm2_torch, tmp_path, [ids])
    print(f"SmolLM2-135M: max |logit difference| {difference:.2e}")
    assert difference < 2e-3
