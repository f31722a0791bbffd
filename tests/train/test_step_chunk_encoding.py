"""The train step's chunk encoding: centring on the batch's real chunks, and chunk groups that skip padding."""

import functools

import jax
import numpy as np
import optax
import pytest

from d2l_jax.hypernet.encoder import context_features
from d2l_jax.hypernet.head import LoRAHead
from d2l_jax.hypernet.hypernet import layer_latents
from d2l_jax.train.config import TrainConfig
from d2l_jax.train.step import HEAD_INPUT_MOMENTUM, Trainer, micro_batch_loss
from tests.train.conftest import BASE, HYPER, SGD_LIKE, random_batch


def test_head_input_mean_is_a_running_mean_over_real_chunks(base_params):
    hyper = HYPER.replace(center_head_input=True)
    trainer = Trainer(hyper, BASE, TrainConfig(batch_size=2, **SGD_LIKE))
    state, base = trainer.init_state(), trainer.put_base_params(base_params)
    expected = 0.0
    for seed, momentum in [(0, 0.0), (1, HEAD_INPUT_MOMENTUM)]:
        batch = random_batch(seed=seed)
        micro = jax.tree.map(lambda x: x[0], batch)
        real = micro["chunk_document"] < micro["num_chunks"].shape[0]
        assert not real.all()  # the batch has a padding chunk, which must not count
        tokens, mask = micro["ctx_tokens"][real], micro["ctx_mask"][real]
        latents = layer_latents(hyper, BASE, state.params, context_features(hyper, BASE, base_params, tokens, mask), mask)
        inputs = LoRAHead(hyper, BASE).apply({"params": state.params["head"]}, latents, inputs_only=True)
        mean = np.asarray(inputs).mean(axis=1)
        expected = momentum * expected + (1 - momentum) * np.asarray(mean)
        state, _ = trainer.step(state, base, trainer.put_batch(batch))
        np.testing.assert_allclose(state.params["head"]["input_mean"], expected, rtol=1e-5, atol=1e-5)


def test_chunk_groups_skip_padding_without_changing_the_step(base_params):
    """Encoding in groups of 2, the last of them padding only (skipped), equals encoding all chunks at once
    (with centred head inputs, whose batch mean must not change either)."""
    hyper = HYPER.replace(center_head_input=True)
    batch = random_batch(seed=5)
    padding = dict(ctx_tokens=0, ctx_mask=0, chunk_document=2, chunk_slot=0)
    for key, value in padding.items():
        x = batch[key]
        batch[key] = np.concatenate([x, np.full((1, 2, *x.shape[2:]), value, x.dtype)], axis=1)
    params = Trainer(hyper, BASE, TrainConfig(batch_size=2)).init_state().params
    micro = jax.tree.map(lambda x: x[0], batch)
    results = []
    for group in (0, 2):
        fn = functools.partial(micro_batch_loss, hyper=hyper, base=BASE, train=TrainConfig(loss="ce", chunk_group_size=group))
        results.append(jax.jit(jax.value_and_grad(fn, has_aux=True))(params, base_params, micro))
    (loss, metrics), grads = results[0]
    (grouped_loss, grouped_metrics), grouped_grads = results[1]
    np.testing.assert_allclose(grouped_loss, loss, rtol=1e-5)
    assert optax.tree.norm(grads) > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grouped_grads, grads)
    np.testing.assert_allclose(grouped_metrics["head_input_mean"], metrics["head_input_mean"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_group_size=4 does not divide the 6 chunk rows"):
        fn = functools.partial(micro_batch_loss, hyper=hyper, base=BASE, train=TrainConfig(loss="ce", chunk_group_size=4))
        fn(params, base_params, micro)
