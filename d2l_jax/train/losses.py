"""Context-distillation losses on the student's logits at the response positions.

Every loss here takes student logits ``[B, P, V]`` at the P label positions of each row (row = one
query about one context) and a ``[B, P]`` mask of real label tokens, and returns the per-context
average of the reference: the token mean of each row, then the mean over rows that have labels.
Losses are computed in float32. ``train.distillation.DistillationLoss`` picks one of ``LOSS_TYPES`` for
both meta-training and context distillation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from d2l_jax.models.lora import LoRA

LOSS_TYPES = ("top_k_kl", "full_kl", "ce")


def per_context_mean(token_loss: Float[Array, "B P"], mask: Float[Array, "B P"]) -> Float[Array, ""]:
    """Mean over rows with at least one label of each row's mean over its label tokens."""
    mask = mask.astype(jnp.float32)
    tokens = mask.sum(axis=1)
    row_loss = (token_loss * mask).sum(axis=1) / jnp.maximum(tokens, 1.0)
    rows = (tokens > 0).astype(jnp.float32)
    return (row_loss * rows).sum() / jnp.maximum(rows.sum(), 1.0)


def cross_entropy(logits: Float[Array, "B P V"], labels: Int[Array, "B P"], mask) -> Float[Array, ""]:
    """Next-token cross-entropy on the labels (the reference's NIAH loss)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return per_context_mean(token_loss, mask)


def top_k_targets(teacher_logits: Float[Array, "B P V"], k: int) -> tuple[Float[Array, "B P K"], Int[Array, "B P K"]]:
    """The teacher's top-k log-probabilities and their token ids (what offline targets store)."""
    log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(log_probs, k)


def top_k_kl(
    logits: Float[Array, "B P V"], teacher_log_probs: Float[Array, "B P K"], teacher_ids: Int[Array, "B P K"], mask
) -> Float[Array, ""]:
    """The reference's "KL": ``-sum_k p_T(k) log q_S(k)`` over the teacher's top-k tokens, with the
    teacher mass not renormalised and no teacher-entropy term (so it is a cross-entropy, >= 0)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    student = jnp.take_along_axis(log_probs, teacher_ids, axis=-1)
    token_loss = -(jnp.exp(teacher_log_probs.astype(jnp.float32)) * student).sum(-1)
    return per_context_mean(token_loss, mask)


def full_kl(logits: Float[Array, "B P V"], teacher_logits: Float[Array, "B P V"], mask) -> Float[Array, ""]:
    """``KL(p_T || q_S)`` over the whole vocabulary (zero when the logits coincide)."""
    student = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    token_loss = (jnp.exp(teacher) * (teacher - student)).sum(-1)
    return per_context_mean(token_loss, mask)


def lora_l1(lora: LoRA, num_chunks: Int[Array, "G"], rank: int, use_bias: bool) -> Float[Array, ""]:
    """The reference's L1 regulariser on combined adapters, averaged over modules and over A and B.

    The reference pads a batch's adapters to ``(max chunks + use_bias) * rank`` ranks and takes the mean of
    ``|x|`` over contexts, layers, ranks and width; the padding beyond that here (up to the static
    ``max_chunks``) is zero, so dividing the sum by the reference's element count gives its value.
    """
    documents = num_chunks.shape[0]
    used_rank = (num_chunks.max() + int(use_bias)) * rank
    total = 0.0
    for module in lora.modules:
        for x in (lora.A[module], lora.B[module]):
            _, layers, _, width = x.shape
            total += jnp.abs(x.astype(jnp.float32)).sum() / (documents * layers * used_rank * width)
    return total / len(lora.modules)
