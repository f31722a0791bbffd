"""Combining chunk adapters into one adapter per document, at a static rank."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from d2l_jax.models.lora import LoRA
from d2l_jax.sharding import constrain


def combine_chunk_adapters(
    chunk_a: dict[str, Float[Array, "C L r d_in"]],
    chunk_b: dict[str, Float[Array, "C L r d_out"]],
    chunk_document: Int[Array, "C"],
    chunk_slot: Int[Array, "C"],
    num_chunks: Int[Array, "G"],
    bias: tuple[dict, dict] | None,
    *,
    max_chunks: int,
    alpha: float,
    scalers: Float[Array, "G"] | None = None,
    bias_scaler: float | Float[Array, ""] = 1.0,
) -> LoRA:
    """Concatenates each document's chunk adapters along the rank axis, then its bias LoRA.

    Chunk ``c`` belongs to document ``chunk_document[c]`` (``>= G`` marks a padding chunk, which is
    dropped) at position ``chunk_slot[c]``; its ranks land at ``[slot * r, (slot + 1) * r)``. Document g's
    bias LoRA follows at ``num_chunks[g] * r``; the rest up to ``(max_chunks + 1) * r`` is zero, so every
    adapter has the same shape. ``scalers`` multiply each document's chunk A (linear in the update);
    ``bias_scaler`` multiplies both bias A and B (quadratic), as the reference does.

    Returns a LoRA with ``A[G, L, (max_chunks + 1) r, d_in]`` and ``B[G, L, (max_chunks + 1) r, d_out]``.
    """
    documents = num_chunks.shape[0]
    rank = next(iter(chunk_a.values())).shape[2]
    total_rank = (max_chunks + 1) * rank
    ranks = chunk_slot[:, None] * rank + jnp.arange(rank)  # [C, r]
    bias_ranks = num_chunks[:, None] * rank + jnp.arange(rank)  # [G, r]
    rows = jnp.arange(documents)[:, None]

    def place(chunks, bias_part, scale):
        c, layers, _, d = chunks.shape
        if scale is not None:
            chunks = chunks * scale[jnp.minimum(chunk_document, documents - 1)][:, None, None, None]
        out = jnp.zeros((documents, layers, total_rank, d), chunks.dtype)
        # Indices separated by a slice put their axes first: updates are [C, r, L, d].
        out = out.at[chunk_document[:, None], :, ranks].set(chunks.transpose(0, 2, 1, 3), mode="drop")
        if bias_part is not None:
            update = jnp.broadcast_to(bias_part.transpose(1, 0, 2), (documents, rank, layers, d))
            out = out.at[rows, :, bias_ranks].set(update.astype(out.dtype) * bias_scaler)
        # Pin the result to the batch layout: left to itself, XLA mis-partitions these scatters on
        # data x fsdp x tensor meshes (rows of other shards came out wrong with jax 0.10).
        return constrain(out, ("activation_batch", None, None, None))

    modules = sorted(chunk_a)
    bias_a, bias_b = bias if bias is not None else ({m: None for m in modules}, {m: None for m in modules})
    return LoRA(
        A={m: place(chunk_a[m], bias_a[m], scalers) for m in modules},
        B={m: place(chunk_b[m], bias_b[m], None) for m in modules},
        alpha=alpha,
    )
