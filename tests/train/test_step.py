"""The jitted train step: teacher paths, learning, accumulation, compilation, optimizer details."""

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from d2l_jax.hypernet.encoder import context_features
from d2l_jax.hypernet.head import LoRAHead
from d2l_jax.hypernet.hypernet import join_stats, layer_latents
from d2l_jax.train import losses
from d2l_jax.train.config import TrainConfig
from d2l_jax.models.decoder import label_logits
from d2l_jax.train.optimizer import apply_finite_update, clip_by_global_norm, init_skipping_state, learning_rate_schedule, make_optimizer, weight_decay_mask
from d2l_jax.train.step import HEAD_INPUT_MOMENTUM, Trainer, micro_batch_loss
from tests.train.conftest import BASE, HYPER, random_batch

SGD_LIKE = dict(warmup_steps=0, steps=100, learning_rate=1e-3, min_learning_rate=1e-3)


def loss_and_grads(params, base_params, micro, train):
    fn = functools.partial(micro_batch_loss, hyper=HYPER, base=BASE, train=train)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, base_params, micro)


def test_online_and_offline_teacher_give_the_same_loss_and_gradients(base_params):
    trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2, **SGD_LIKE))
    params = trainer.init_state().params
    micro = jax.tree.map(lambda x: x[0], random_batch())
    teacher = label_logits(BASE, base_params, micro["teacher_tokens"], micro["teacher_mask"], micro["teacher_label_positions"])
    log_probs, ids = losses.top_k_targets(teacher, 16)
    offline = {k: v for k, v in micro.items() if not k.startswith("teacher")} | {"teacher_log_probs": log_probs, "teacher_ids": ids}
    (online_loss, _), online_grads = loss_and_grads(params, base_params, micro, TrainConfig(teacher="online"))
    (offline_loss, _), offline_grads = loss_and_grads(params, base_params, offline, TrainConfig(teacher="offline"))
    assert float(online_loss) > 0
    np.testing.assert_allclose(online_loss, offline_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), online_grads, offline_grads)


def test_a_step_with_the_base_layers_held_apart_equals_the_stacked_step(base_params):
    """With the base's layer loop unrolled fully, its weights are placed one array per layer (``models.layout``)."""
    results = []
    for base in (BASE, BASE.replace(scan_unroll=BASE.num_layers)):
        trainer = Trainer(HYPER, base, TrainConfig(batch_size=2, **SGD_LIKE))
        placed = trainer.put_base_params(base_params)
        assert isinstance(placed["layers"], tuple) == (base.scan_unroll == base.num_layers)
        chex.assert_trees_all_equal_shapes_and_dtypes(trainer.abstract_base_params(), placed)
        results.append(trainer.step(trainer.init_state(), placed, trainer.put_batch(random_batch())))
    assert float(results[0][1]["loss"]) > 0
    chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-7)


def test_the_fresh_state_is_made_in_two_programs_as_in_one():
    """``init_state`` makes the parameters, then the optimizer state (a lower peak); the state is the same
    as one program makes it, on the state's shardings."""
    trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2, seed=3))
    state = trainer.init_state()
    chex.assert_trees_all_equal(state, jax.jit(trainer._fresh_state)(jax.random.key(3)))
    assert jax.tree.map(lambda x: x.sharding, state) == trainer.state_shardings
    chex.assert_trees_all_equal_shapes_and_dtypes(state, trainer.abstract_state())


@pytest.mark.parametrize("loss", ["ce", "top_k_kl", "full_kl"])
def test_a_few_steps_lower_the_loss_and_compile_once(base_params, loss):
    trainer = Trainer(HYPER, BASE, TrainConfig(loss=loss, batch_size=2, l1_coef=0.0, **(SGD_LIKE | {"learning_rate": 1e-2, "min_learning_rate": 1e-2})))
    state, base = trainer.init_state(), trainer.put_base_params(base_params)
    batch = random_batch()
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    state, metrics = trainer.step(state, base, trainer.put_batch(batch))
    history = [float(metrics["loss"])]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(7):  # newly placed arrays of the same shapes each step
            state, metrics = trainer.step(state, base, trainer.put_batch(batch))
            history.append(float(metrics["loss"]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert trainer.flops_per_step and trainer.flops_per_step > 0
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.95 * history[0], history
    assert int(state.step) == 8


def test_accumulated_micro_batches_equal_one_large_batch(base_params):
    """Two micro-batches of 2 rows give the update of one batch of 4 (each row has labels)."""
    split = random_batch(seed=3, micro_batches=2, rows=2)
    rows = 4
    joined = {}
    for key, x in split.items():
        if key == "chunk_document":  # renumber the owners of the second micro-batch's chunks
            x = np.where(x == 2, rows, x + np.array([[0], [2]]))
        joined[key] = x.reshape(1, -1, *x.shape[2:])
    results = []
    for batch, (a, b) in [(split, (2, 2)), (joined, (1, 4))]:
        trainer = Trainer(HYPER, BASE, TrainConfig(loss="ce", batch_size=b, grad_accum_steps=a, **SGD_LIKE))
        state = trainer.init_state()
        state, metrics = trainer.step(state, trainer.put_base_params(base_params), trainer.put_batch(batch))
        results.append((state.params, metrics))
    np.testing.assert_allclose(results[0][1]["grad_norm"], results[1][1]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), results[0][0], results[1][0])


def test_chunk_groups_skip_padding_without_changing_the_step(base_params):
    """Encoding in groups of 2, the last of them padding only (skipped), equals encoding all chunks at once
    (with centred head inputs, whose batch mean must not change either)."""
    hyper = HYPER.replace(center_head_input=True)
    batch = random_batch(seed=5)
    padding = dict(ctx_tokens=0, ctx_mask=0, chunk_document=2, chunk_slot=0)
    for key, value in padding.items():
        x = batch[key]
        batch[key] = np.concatenate([x, np.full((1, 2, *x.shape[2:]), value, x.dtype)], axis=1)
    state = Trainer(hyper, BASE, TrainConfig(batch_size=2)).init_state()
    params = join_stats(state.params, state.stats)
    micro = jax.tree.map(lambda x: x[0], batch)
    results = []
    for group in (0, 2):
        fn = functools.partial(micro_batch_loss, hyper=hyper, base=BASE, train=TrainConfig(loss="ce", encoder_chunk_rows=group))
        results.append(jax.jit(jax.value_and_grad(fn, has_aux=True))(params, base_params, micro))
    (loss, metrics), grads = results[0]
    (grouped_loss, grouped_metrics), grouped_grads = results[1]
    np.testing.assert_allclose(grouped_loss, loss, rtol=1e-5)
    assert optax.tree.norm(grads) > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grouped_grads, grads)
    np.testing.assert_allclose(grouped_metrics["head_input_mean"], metrics["head_input_mean"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="encoder_chunk_rows=4 does not divide the 6 chunk rows"):
        fn = functools.partial(micro_batch_loss, hyper=hyper, base=BASE, train=TrainConfig(loss="ce", encoder_chunk_rows=4))
        fn(params, base_params, micro)


def test_head_input_mean_is_a_running_mean_over_real_chunks(base_params):
    hyper = HYPER.replace(center_head_input=True)
    trainer = Trainer(hyper, BASE, TrainConfig(batch_size=2, **SGD_LIKE))
    state, base = trainer.init_state(), trainer.put_base_params(base_params)

    @jax.jit
    def head_inputs(params, stats, tokens, mask):
        latents = layer_latents(hyper, BASE, params, context_features(hyper, BASE, base_params, tokens, mask), mask)
        _, captured = LoRAHead(hyper, BASE).apply({"params": params["head"], "stats": stats}, latents, capture_intermediates=True)
        (inputs,) = captured["intermediates"][f"pre_head_{hyper.num_pre_head_layers - 1}"]["__call__"]  # before centring
        return inputs.reshape(latents.shape)

    expected = 0.0
    for seed, momentum in [(0, 0.0), (1, HEAD_INPUT_MOMENTUM)]:
        batch = random_batch(seed=seed)
        micro = jax.tree.map(lambda x: x[0], batch)
        real = micro["chunk_document"] < micro["num_chunks"].shape[0]
        assert not real.all()  # the batch has a padding chunk, which must not count
        mean = head_inputs(state.params, state.stats, micro["ctx_tokens"][real], micro["ctx_mask"][real]).mean(axis=1)
        expected = momentum * expected + (1 - momentum) * np.asarray(mean)
        state, _ = trainer.step(state, base, trainer.put_batch(batch))
        np.testing.assert_allclose(state.stats["input_mean"], expected, rtol=1e-5, atol=1e-5)
        assert "input_mean" not in state.params["head"]  # no optimizer sees the statistic


def test_a_frozen_head_input_mean_centres_on_the_stored_mean_and_stays(base_params):
    hyper = HYPER.replace(center_head_input=True)
    train = TrainConfig(loss="ce", batch_size=2, freeze_head_input_mean=True, **SGD_LIKE)
    trainer = Trainer(hyper, BASE, train)
    state, base = trainer.init_state(), trainer.put_base_params(base_params)
    flat = traverse_util.flatten_dict(state.params["head"])
    keys = dict(zip(flat, jax.random.split(jax.random.key(3), len(flat))))
    head = traverse_util.unflatten_dict({k: x + jax.random.normal(keys[k], x.shape) for k, x in flat.items()})  # B not zero
    stored = np.asarray(jax.random.normal(jax.random.key(4), state.stats["input_mean"].shape))
    state = state.replace(params=dict(state.params, head=head), stats={"input_mean": stored})
    micro = jax.tree.map(lambda x: x[0], random_batch(seed=2))

    def loss(params, train):
        fn = functools.partial(micro_batch_loss, hyper=hyper, base=BASE, train=train)
        return jax.jit(fn)(params, base_params, micro)

    variables = join_stats(state.params, state.stats)
    batch_loss, metrics = loss(variables, train.replace(freeze_head_input_mean=False))
    on_batch_mean = join_stats(state.params, {"input_mean": metrics["head_input_mean"]})
    np.testing.assert_allclose(loss(on_batch_mean, train)[0], batch_loss, rtol=1e-5)  # it centres on the stored mean
    assert abs(loss(variables, train)[0] - batch_loss) > 1e-2

    before = jax.tree.map(np.asarray, state.params)  # the step donates the state
    for _ in range(2):
        state, _ = trainer.step(state, base, trainer.put_batch(random_batch(seed=2)))
    np.testing.assert_array_equal(state.stats["input_mean"], stored)
    assert optax.tree.norm(jax.tree.map(lambda a, b: a - b, state.params, before)) > 0


def test_weight_decay_mask_and_schedule():
    trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2))
    flat = traverse_util.flatten_dict(weight_decay_mask(trainer.init_state().params), sep="/")
    excluded = sorted(k for k, decayed in flat.items() if not decayed)
    assert all(any(w in k.lower() for w in ("norm", "scaler", "bias", "latents_q")) for k in excluded)
    assert flat["perceiver/encoder/layers/q_proj"] and flat["head/head"]
    assert not flat["perceiver/encoder/latents_q"] and not flat["head/scaler_B_down_proj"] and not flat["head/bias_A_q_proj"]
    schedule = learning_rate_schedule(TrainConfig(learning_rate=4e-5, warmup_steps=100, steps=1000))
    np.testing.assert_allclose([schedule(0), schedule(50), schedule(100), schedule(1000)], [0, 2e-5, 4e-5, 1e-7], rtol=1e-5)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_is_optaxs_with_or_without_the_norm_given(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    theirs, state = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ours = clip_by_global_norm(max_norm)
    chex.assert_trees_all_equal_structs(ours.init(grads), state)
    for norm in (None, optax.tree.norm(grads)):
        chex.assert_trees_all_close(ours.update(grads, ours.init(grads), grad_norm=norm)[0], theirs, rtol=1e-6)


def test_apply_finite_update_is_optaxs_apply_if_finite_then_apply_updates():
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=2, steps=10, perceiver_lr_scale=0.5, max_grad_norm=0.5))
    reference = optax.apply_if_finite(optimizer, max_consecutive_errors=2**30)
    rng = np.random.default_rng(0)
    params = {"perceiver": {"q_proj": rng.normal(size=(3, 4)).astype(np.float32), "norm": np.ones(4, np.float32)},
              "head": {"head": rng.normal(size=(2, 5)).astype(np.float32), "bias_A": np.zeros(5, np.float32)}}
    ours, theirs = init_skipping_state(optimizer, params), reference.init(params)
    chex.assert_trees_all_equal_structs(ours, theirs)
    chex.assert_trees_all_equal(ours, theirs)
    ours_params = theirs_params = params
    step = jax.jit(lambda g, s, p: apply_finite_update(optimizer, g, s, p, optax.tree.norm(g)))
    for bad in [None, None, np.nan, np.inf, None, np.nan, None]:
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        if bad is not None:
            grads["head"]["head"][1, 2] = bad
        ours_params, ours = step(grads, ours, ours_params)
        updates, theirs = reference.update(grads, theirs, theirs_params)
        theirs_params = optax.apply_updates(theirs_params, updates)
        chex.assert_trees_all_close(ours_params, theirs_params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert (int(ours.notfinite_count), int(ours.total_notfinite), bool(ours.last_finite)) == (0, 3, True)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    assert int(next(s for s in jax.tree.leaves(ours, is_leaf=is_adam) if is_adam(s)).count) == 4  # the taken steps only


def test_perceiver_lr_scale_scales_only_the_perceivers_updates(base_params):
    batch = random_batch()

    def one_step(scale):
        trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2, perceiver_lr_scale=scale, **SGD_LIKE))
        state = trainer.init_state()
        before = jax.device_get(state.params)
        state, _ = trainer.step(state, trainer.put_base_params(base_params), trainer.put_batch(batch))
        return jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), jax.device_get(state.params), before)

    full, half, frozen = one_step(1.0), one_step(0.5), one_step(0.0)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=2.5e-7)  # an ulp of float32 parameters up to 2
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(full["perceiver"]))
    jax.tree.map(lambda h, f: close(h, 0.5 * f), half["perceiver"], full["perceiver"])
    assert all(np.abs(x).max() == 0 for x in jax.tree.leaves(frozen["perceiver"]))
    jax.tree.map(close, frozen["head"], full["head"])


def test_a_bfloat16_first_moment_halves_it_and_steps_as_float32_does(base_params):
    batch, updates, states = random_batch(), {}, {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2, first_moment_dtype=dtype, **SGD_LIKE))
        state = trainer.init_state()
        before = jax.device_get(state.params)
        state, _ = trainer.step(state, trainer.put_base_params(base_params), trainer.put_batch(batch))
        updates[dtype] = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), jax.device_get(state.params), before)
        states[dtype] = state
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    adam = lambda state: next(s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s))
    assert {x.dtype for x in jax.tree.leaves(adam(states["bfloat16"]).mu)} == {np.dtype(jax.numpy.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam(states["bfloat16"]).nu)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(adam(states["float32"]).mu)} == {np.dtype(np.float32)}
    # the first step's update is lr * mu / sqrt(nu) with mu = (1 - b1) g, nu = (1 - b2) g^2: a sign of
    # the gradient; in bfloat16 mu keeps 8 bits of it, so updates agree to bfloat16's precision
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6), updates["bfloat16"], updates["float32"])


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="full_kl"):
        TrainConfig(loss="full_kl", teacher="offline")
    with pytest.raises(ValueError, match="loss="):
        TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, steps=10)
    with pytest.raises(ValueError, match="perceiver_lr_scale"):
        TrainConfig(perceiver_lr_scale=-0.1)
    with pytest.raises(ValueError, match="first_moment_dtype"):
        TrainConfig(first_moment_dtype="float16")


def test_questions_sharing_a_context_equal_that_context_repeated_per_question(base_params):
    """data.queries_per_context: Q query rows per context use its one adapter, as Q copies of the context would."""
    trainer = Trainer(HYPER, BASE, TrainConfig(batch_size=2, **SGD_LIKE))
    params = trainer.init_state().params
    big = jax.tree.map(lambda x: x[0], random_batch(seed=7, rows=4))
    big["chunk_document"], big["num_chunks"] = np.repeat(np.arange(4), 2).astype(np.int32), np.full(4, 2, np.int32)
    queries = {k: v for k, v in big.items() if not k.startswith(("ctx_", "chunk_", "num_"))}
    contexts = np.array([0, 1, 4, 5])  # the chunk rows of contexts 0 and 2
    shared = queries | {
        "ctx_tokens": big["ctx_tokens"][contexts], "ctx_mask": big["ctx_mask"][contexts],
        "chunk_document": np.array([0, 0, 1, 1], np.int32), "chunk_slot": np.array([0, 1, 0, 1], np.int32),
        "num_chunks": np.array([2, 2], np.int32),
    }
    repeated_rows = np.array([0, 1, 0, 1, 4, 5, 4, 5])
    repeated = queries | {
        "ctx_tokens": big["ctx_tokens"][repeated_rows], "ctx_mask": big["ctx_mask"][repeated_rows],
        "chunk_document": big["chunk_document"], "chunk_slot": big["chunk_slot"], "num_chunks": big["num_chunks"],
    }
    (shared_loss, shared_metrics), shared_grads = loss_and_grads(params, base_params, shared, TrainConfig())
    (repeated_loss, _), repeated_grads = loss_and_grads(params, base_params, repeated, TrainConfig())
    assert float(shared_loss) > 0 and float(shared_metrics["label_tokens"]) == float(big["label_mask"].sum())
    np.testing.assert_allclose(shared_loss, repeated_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), shared_grads, repeated_grads)
