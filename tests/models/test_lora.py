"""The LoRA argument: zero adapters are exact no-ops, adapters equal merged weights, rows are independent."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.lora import LoRA, lora_alpha, merged_kernel

RANK = 4
MODULE_PATHS = {"down_proj": ("mlp", "down_proj"), "q_proj": ("attn", "q_proj")}


def random_lora(config, batch, modules, seed=0, zero_b=False):
    key = jax.random.key(seed)
    shapes = config.projection_shapes()
    a, b = {}, {}
    for name in modules:
        d_in, d_out = shapes[name]
        key, ka, kb = jax.random.split(key, 3)
        a[name] = 0.1 * jax.random.normal(ka, (batch, config.num_layers, RANK, d_in))
        b[name] = jnp.zeros((batch, config.num_layers, RANK, d_out)) if zero_b else 0.1 * jax.random.normal(kb, (batch, config.num_layers, RANK, d_out))
    return LoRA(A=a, B=b, alpha=lora_alpha(RANK))


def merged_model(model: BaseModel, lora: LoRA, row: int) -> BaseModel:
    params = jax.tree.map(lambda x: x, model.params)
    for name in lora.modules:
        group, module = MODULE_PATHS[name]
        kernels = params["layers"][group][module]["kernel"]
        merged = jax.vmap(merged_kernel, in_axes=(0, 0, 0, None))(kernels, lora.A[name][row], lora.B[name][row], lora.alpha)
        params["layers"][group][module] = {"kernel": merged}
    return BaseModel(model.name, model.config, params, model.tokenizer, model.stop_token_ids)


def test_zero_b_gives_base_logits_exactly(tiny_llama):
    model, _ = tiny_llama
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 10))
    lora = random_lora(model.config, 2, ["down_proj", "q_proj", "v_proj"], zero_b=True)
    np.testing.assert_array_equal(np.asarray(model.logits(ids, lora=lora)), np.asarray(model.logits(ids)))


@pytest.mark.parametrize("module", ["down_proj", "q_proj"])
def test_lora_equals_merged_weights(tiny_llama, module):
    model, _ = tiny_llama
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 10))
    lora = random_lora(model.config, 1, [module], seed=2)
    with_lora = np.asarray(model.logits(ids, lora=lora))
    merged = np.asarray(merged_model(model, lora, 0).logits(ids))
    assert np.abs(with_lora - np.asarray(model.logits(ids))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(with_lora, merged, atol=1e-4, rtol=0)


def test_rows_carry_their_own_adapters(tiny_llama):
    model, _ = tiny_llama
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (3, 8))
    lora = random_lora(model.config, 3, ["down_proj", "q_proj"], seed=4)
    rows = [jax.tree.map(lambda v: v[row : row + 1], lora) for row in range(3)]
    alone = [np.asarray(model.logits(ids[row : row + 1], lora=single))[0] for row, single in enumerate(rows)]
    chex.assert_trees_all_close(list(np.asarray(model.logits(ids, lora=lora))), alone, atol=1e-5, rtol=1e-7)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c: LoRA(A={"lm_head": jnp.zeros((1, 3, 2, 64))}, B={"lm_head": jnp.zeros((1, 3, 2, 64))}, alpha=1.0), "unknown module"),
        (lambda c: LoRA(A={"down_proj": jnp.zeros((1, 3, 2, 64))}, B={"down_proj": jnp.zeros((1, 3, 2, 64))}, alpha=1.0), "expected A"),
        (lambda c: LoRA(A={"down_proj": jnp.zeros((1, 2, 2, 96))}, B={"down_proj": jnp.zeros((1, 2, 2, 64))}, alpha=1.0), "expected A"),
    ],
    ids=["unknown-module", "wrong-d_in", "wrong-layers"],
)
def test_mismatched_lora_is_rejected(tiny_llama, bad, message):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=message):
        model.logits(np.zeros((1, 4), np.int32), lora=bad(model.config))
