"""The distillation core shared by meta-training and context distillation: the strategy's targets and
losses are those of ``losses``, the teacher's targets come from the frozen base, and the D2L and CD steps
give the same loss for the same student and teacher."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax.baselines import context_distillation as cd
from d2l_jax.hypernet.hypernet import document_adapters, init_hypernet
from d2l_jax.train import losses
from d2l_jax.train.config import TrainConfig
from d2l_jax.models.decoder import label_logits
from d2l_jax.train.distillation import DistillationLoss, teacher_targets
from d2l_jax.train.optimizer import adamw, cosine_schedule
from d2l_jax.train.step import micro_batch_loss
from tests.train.conftest import BASE, HYPER, random_batch

B, P, V, K = 3, 4, 50, 5


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(B, P, V)) * 3, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(B, P, V)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (B, P)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], jnp.int32)
    return logits, teacher, labels, mask


def test_strategy_targets_and_losses_are_those_of_losses(data):
    logits, teacher, labels, mask = data
    log_probs, ids = losses.top_k_targets(teacher, K)
    chex.assert_shape([log_probs, ids], (B, P, K))
    expected = {
        "top_k_kl": ({"teacher_log_probs": log_probs, "teacher_ids": ids}, losses.top_k_kl(logits, log_probs, ids, mask)),
        "full_kl": ({"teacher_logits": teacher}, losses.full_kl(logits, teacher, mask)),
        "ce": ({}, losses.cross_entropy(logits, labels, mask)),
    }
    assert set(expected) == set(losses.LOSS_TYPES)
    for kind, (targets, loss) in expected.items():
        distillation = DistillationLoss(kind, K)
        got = distillation.targets(teacher)
        chex.assert_trees_all_close(got, targets)
        # A batch holding every kind's entries is a valid ``targets``: each kind reads only its own.
        value = distillation.loss(logits, {**got, "labels": labels, "teacher_logits": teacher}, mask)
        chex.assert_shape(value, ())
        chex.assert_trees_all_close(value, loss, rtol=1e-6)
        assert float(value) > 0


def test_bad_strategies_are_rejected(data):
    with pytest.raises(ValueError, match="loss='mse'"):
        DistillationLoss("mse")
    with pytest.raises(ValueError, match="top_k"):
        DistillationLoss("top_k_kl", top_k=0)
    DistillationLoss("ce", top_k=0)  # top_k only matters to top_k_kl
    logits, _, _, mask = data
    with pytest.raises(KeyError, match="teacher_ids"):
        DistillationLoss("top_k_kl").loss(logits, {"teacher_log_probs": logits[..., :K]}, mask)


def test_teacher_targets_are_the_top_k_of_the_frozen_base(base_params):
    micro = jax.tree.map(lambda x: x[0], random_batch())
    args = (micro["teacher_tokens"], micro["teacher_mask"], micro["teacher_label_positions"])
    distillation = DistillationLoss("top_k_kl", top_k=8)
    targets = teacher_targets(BASE, base_params, *args, distillation)
    expected_log_probs, expected_ids = losses.top_k_targets(label_logits(BASE, base_params, *args), 8)
    rows, labels = micro["labels"].shape
    chex.assert_shape([targets["teacher_log_probs"], targets["teacher_ids"]], (rows, labels, 8))
    chex.assert_trees_all_close(targets["teacher_log_probs"], expected_log_probs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(targets["teacher_ids"], expected_ids)
    # No gradient reaches the base model through the targets, and ce needs no teacher.
    grads = jax.grad(lambda p: teacher_targets(BASE, p, *args, distillation)["teacher_log_probs"].sum())(base_params)
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(grads))
    assert teacher_targets(BASE, base_params, *args, DistillationLoss("ce")) == {}


@pytest.mark.parametrize("kind", losses.LOSS_TYPES)
def test_d2l_and_cd_steps_give_the_same_loss_for_the_same_student(base_params, kind):
    # One row, so the D2L step's per-context mean and CD's mean over all label tokens coincide. The
    # hypernetwork's adapter for that row becomes CD's LoRA; the D2L step's teacher runs online, CD's
    # targets are precomputed by the same function.
    micro = jax.tree.map(lambda x: x[0], random_batch(seed=5, rows=1))
    params = nn.unbox(init_hypernet(HYPER, BASE, jax.random.key(0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # a random head, so the adapter is not zero
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    _, d2l_metrics = jax.jit(functools.partial(micro_batch_loss, hyper=HYPER, base=BASE, train=TrainConfig(loss=kind)))(
        params, base_params, micro
    )

    length = micro["ctx_tokens"].shape[1]
    lora = jax.jit(document_adapters, static_argnums=(0, 1))(
        HYPER, BASE, base_params, params, micro["ctx_tokens"].reshape(1, -1, length), micro["ctx_mask"].reshape(1, -1, length),
        micro["chunk_document"], micro["chunk_slot"], micro["num_chunks"],
    )
    assert max(float(jnp.abs(b).max()) for b in lora.B.values()) > 0
    distillation = DistillationLoss(kind)
    targets = jax.jit(teacher_targets, static_argnums=(0, 5))(
        BASE, base_params, micro["teacher_tokens"], micro["teacher_mask"], micro["teacher_label_positions"], distillation
    )
    batch = {name: micro[name] for name in ("tokens", "mask", "label_positions", "labels", "label_mask")} | targets
    lora_params = {"A": {m: a[0] for m, a in lora.A.items()}, "B": {m: b[0] for m, b in lora.B.items()}}
    spec = cd._StepSpec(alpha=lora.alpha, distillation=distillation, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = spec.optimizer(0.0).init(lora_params)
    _, _, cd_loss = cd._cd_train_step(BASE, spec, base_params, lora_params, opt_state, batch, jnp.float32(1e-3))

    logits = jax.jit(label_logits, static_argnums=0)(BASE, base_params, micro["tokens"], micro["mask"], micro["label_positions"], lora)
    shared = distillation.loss(logits, {**targets, "labels": micro["labels"]}, micro["label_mask"])
    assert float(shared) > 0
    chex.assert_trees_all_close(d2l_metrics["distill"], shared, rtol=1e-5)
    chex.assert_trees_all_close(cd_loss, shared, rtol=1e-5)


def test_adamw_is_torchs_decoupled_adamw_at_a_traced_rate():
    # First step from a fresh state: Adam's bias-corrected direction is g / (|g| + eps), and the decay is
    # added to it before the rate scales both (torch's AdamW), whatever rate the compiled step is given.
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.3, -0.1, 0.0])}
    optimizer = functools.partial(adamw, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    step = jax.jit(lambda rate: optimizer(rate).update(grads, optimizer(0.0).init(params), params)[0])
    for rate in (1e-2, 3e-3):
        direction = grads["w"] / (jnp.abs(grads["w"]) + 1e-8) + 0.1 * params["w"]
        # (float32 bias corrections: 1 - 0.999 is not exactly 1e-3)
        chex.assert_trees_all_close(step(jnp.float32(rate)), {"w": -rate * direction}, rtol=2e-5)
    assert step._cache_size() == 1

    schedule = cosine_schedule(2.0, 10)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(12)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
