"""Loss math against NumPy transcriptions of the reference's formulas."""

import jax
import numpy as np
import pytest

from d2l_jax.models.lora import LoRA
from d2l_jax.train import losses

B, P, V, K = 3, 4, 50, 16


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def per_context(token_loss, mask):
    rows = [token_loss[b][mask[b] > 0].mean() for b in range(len(mask)) if mask[b].sum()]
    return np.mean(rows)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, P, V)).astype(np.float32) * 3
    teacher = rng.normal(size=(B, P, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, (B, P))
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])  # row 1 has no labels: it must not count
    return logits, teacher, labels, mask


def test_cross_entropy(data):
    logits, _, labels, mask = data
    expected = per_context(-np.take_along_axis(log_softmax(logits), labels[..., None], -1)[..., 0], mask)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask), expected, rtol=1e-5)


def test_top_k_kl_is_cross_entropy_to_unrenormalised_teacher_mass(data):
    logits, teacher, _, mask = data
    log_probs, ids = losses.top_k_targets(teacher, K)
    teacher_lp = log_softmax(teacher)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-teacher_lp, -1)[..., :K])
    student = np.take_along_axis(log_softmax(logits), np.asarray(ids), -1)
    expected = per_context(-(np.exp(np.take_along_axis(teacher_lp, np.asarray(ids), -1)) * student).sum(-1), mask)
    np.testing.assert_allclose(losses.top_k_kl(logits, log_probs, ids, mask), expected, rtol=1e-5)
    # Over the whole vocabulary it is the full KL plus the teacher's entropy.
    log_probs, ids = losses.top_k_targets(teacher, V)
    entropy = per_context(-(np.exp(teacher_lp) * teacher_lp).sum(-1), mask)
    np.testing.assert_allclose(
        losses.top_k_kl(logits, log_probs, ids, mask), losses.full_kl(logits, teacher, mask) + entropy, rtol=1e-5
    )


def test_full_kl(data):
    logits, teacher, _, mask = data
    s, t = log_softmax(logits), log_softmax(teacher)
    np.testing.assert_allclose(losses.full_kl(logits, teacher, mask), per_context((np.exp(t) * (t - s)).sum(-1), mask), rtol=1e-5)
    np.testing.assert_allclose(losses.full_kl(teacher, teacher, mask), 0.0, atol=1e-6)
    # Shifting logits by a constant leaves the distributions, hence the KL, unchanged.
    np.testing.assert_allclose(losses.full_kl(teacher + 5.0, teacher, mask), 0.0, atol=1e-5)


def test_gradient_of_masked_tokens_is_zero(data):
    logits, _, labels, mask = data
    grad = jax.grad(losses.cross_entropy)(logits, labels, mask)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    assert np.all(np.abs(np.asarray(grad)[mask == 1]).sum(-1) > 0)


def test_lora_l1_matches_the_reference_formula():
    rng = np.random.default_rng(1)
    documents, layers, rank, max_chunks = 2, 3, 2, 4
    num_chunks = np.array([1, 2])
    used = (num_chunks.max() + 1) * rank  # the reference pads to (max chunks + 1) * r
    lora_a, lora_b = {}, {}
    for module, (d_in, d_out) in {"down_proj": (6, 4), "q_proj": (4, 4)}.items():
        a = np.zeros((documents, layers, (max_chunks + 1) * rank, d_in), np.float32)
        b = np.zeros((documents, layers, (max_chunks + 1) * rank, d_out), np.float32)
        a[:, :, :used] = rng.normal(size=(documents, layers, used, d_in))
        b[:, :, :used] = rng.normal(size=(documents, layers, used, d_out))
        lora_a[module], lora_b[module] = a, b
    expected = np.mean(
        [
            (np.abs(lora_a[m][:, :, :used]).sum(0).mean() + np.abs(lora_b[m][:, :, :used]).sum(0).mean()) / documents
            for m in lora_a
        ]
    )
    got = losses.lora_l1(LoRA(lora_a, lora_b, alpha=1.0), num_chunks, rank, use_bias=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
