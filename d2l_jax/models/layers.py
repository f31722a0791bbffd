"""Building blocks shared by the decoder and the hypernetwork: mixed-precision einsum, dense layers,
RMS normalisation, grouped-query attention, and positions from a padding mask."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from d2l_jax.models.lora import lora_delta

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows stay NaN-free


def positions_from_mask(mask: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Position ids of right-padded rows: ``0, 1, ...`` over the real tokens (padding repeats the last)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def rms_normalize(x, eps: float):
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    eps: float
    weight_offset: float = 0.0  # Gemma stores w and scales by (1 + w)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), jnp.float32)
        return (rms_normalize(x, self.eps) * (self.weight_offset + scale.astype(jnp.float32))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def compute_einsum(spec: str, x, y, dtype, out_dtype=None):
    """``einsum(spec, x, y)`` with both operands in ``dtype``, accumulated in float32, returned in
    ``out_dtype`` (default ``dtype``).

    The usual mixed precision, in the backward pass too: the two gradient products also take ``dtype``
    operands and sum in float32, and each gradient comes back in its operand's dtype (autodiff would
    multiply the float32 cotangent with a ``dtype`` operand, which XLA's CPU backend does slowly).
    XLA's CPU backend runs bfloat16 products this way several times faster than float32 ones (AMX);
    float32 is unchanged. ``spec`` is explicit (``"lhs,rhs->out"``); every index of an operand must
    appear in the other operand or in the output.
    """
    _einsum_specs(spec)
    product = jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
    return product.astype(out_dtype or dtype)


def _einsum_specs(spec: str) -> tuple[str, str, str]:
    operands, out = spec.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    for name, operand, other in (("first", lhs, rhs + out), ("second", rhs, lhs + out)):
        if set(operand.replace("...", "")) - set(other.replace("...", "")):
            raise ValueError(f"compute_einsum({spec!r}): the {name} operand has an index found nowhere else")
    return lhs, rhs, out


def _compute_einsum_fwd(spec, x, y, dtype, out_dtype):
    return compute_einsum(spec, x, y, dtype, out_dtype), (x, y)


def _compute_einsum_bwd(spec, dtype, out_dtype, residuals, cotangent):
    x, y = residuals
    lhs, rhs, out = _einsum_specs(spec)
    contract = lambda subscripts, a, b, like: jnp.einsum(
        subscripts, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32
    ).astype(like.dtype)
    return contract(f"{out},{rhs}->{lhs}", cotangent, y, x), contract(f"{lhs},{out}->{rhs}", x, cotangent, y)


compute_einsum.defvjp(_compute_einsum_fwd, _compute_einsum_bwd)


class Linear(nn.Module):
    """``y = x W`` (kernel ``[d_in, d_out]``, no bias) plus an optional per-example LoRA delta."""

    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32
    kernel_init: Any = DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, x, lora: tuple[jax.Array, jax.Array] | None = None, alpha: float = 1.0):
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), (x.shape[-1], self.features), jnp.float32
        )
        y = compute_einsum("...d,df->...f", x, kernel, self.dtype)
        if lora is not None:
            y = y + lora_delta(x, *lora, alpha).astype(y.dtype)
        return y


def attend(q, k, v, mask, softcap: float | None = None, blocks: int = 1, past=None):
    """Grouped-query attention. q ``[B, T, N, Dh]`` (already scaled), k/v ``[B, S, K, Dh]``, mask ``[B, T, S]``.

    ``blocks > 1`` (only when query t sits at key slot t, the mask is causal and there is no ``past``)
    splits the queries into that many blocks, each scoring only the keys up to its end: about half the
    work, and score tensors ``blocks`` times smaller.

    ``past``: optional ``(k, v, mask)`` of cached keys, k/v ``[B, K, S', Dh]`` (the KV cache's layout) and
    mask ``[B, T, S']``; the queries attend over them and ``k``/``v`` under one softmax, without copying
    the cache into one key tensor.
    """
    b, t, n, dh = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
    v = v.transpose(0, 2, 1, 3)

    def scores_of(q_block, keys, mask_block):
        scores = compute_einsum("bkgtd,bksd->bkgts", q_block, keys, keys.dtype, jnp.float32)
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        return jnp.where(mask_block[:, None, None], scores, MASKED_SCORE)

    def block(q_block, mask_block, keys):
        scores = scores_of(q_block, k[:, :, :keys], mask_block[:, :, :keys])
        if past is None:
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            return compute_einsum("bkgts,bksd->bkgtd", probs, v[:, :, :keys], v.dtype)
        past_k, past_v, past_mask = past
        probs = jax.nn.softmax(jnp.concatenate([scores_of(q_block, past_k, past_mask), scores], axis=-1), axis=-1)
        probs = probs.astype(v.dtype)
        cached = past_k.shape[2]
        return compute_einsum("bkgts,bksd->bkgtd", probs[..., :cached], past_v, v.dtype) + compute_einsum(
            "bkgts,bksd->bkgtd", probs[..., cached:], v[:, :, :keys], v.dtype
        )

    if blocks == 1:
        out = block(q, mask, k.shape[2])
    else:
        if past is not None:
            raise ValueError("causal blocks need queries at key slots 0..T-1, so no cached keys")
        size = t // blocks
        pieces = [block(q[:, :, :, i * size : (i + 1) * size], mask[:, i * size : (i + 1) * size], (i + 1) * size) for i in range(blocks)]
        out = jnp.concatenate(pieces, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * dh)
