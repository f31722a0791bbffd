"""Documents' chunks -> one combined adapter per document, for documents of any length.

One pass (:func:`batched_adapters`) encodes the chunks of several documents together and combines each
document's chunk adapters at the static rank ``(max_chunks + 1) * r`` the hypernetwork was trained with.
A document with more than ``max_chunks`` chunks goes through :func:`segmented_adapter`: its chunks are
encoded a segment at a time with the same hypernetwork, building the same combined update as the
reference's ``combine_lora`` over all chunks,

    delta_W = alpha * (sum_c (s * A_c)^T B_c + s_b^2 * bias_A^T bias_B),

without ever holding a zero-padded tensor of the full rank. When the concatenated rank ``(n + 1) * r``
would exceed ``min(d_in, d_out)`` the update is stored as an exact factorisation of that smaller rank,
so answer-time memory stops growing with the document.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.hypernet.head import bias_lora, pad_to_base_layers
from d2l_jax.hypernet.hypernet import document_adapters, encode_chunks
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.generate import bucket_length
from d2l_jax.models.lora import LoRA

_document_adapters = jax.jit(document_adapters, static_argnames=("config", "base", "execution"))
_encode_chunks = jax.jit(encode_chunks, static_argnames=("config", "base", "execution"))


@struct.dataclass
class Adapter:
    """One document's combined LoRA (a pytree of its arrays, so ``jax.block_until_ready(adapter)`` waits for it).

    Attributes:
      lora: ``A[1, L, R, d_in]`` and ``B[1, L, R, d_out]`` per target module; R >= rank is bucketed
        and the ranks beyond ``rank`` are zero.
      rank: the ranks in use: (num_chunks + 1) * r with the bias LoRA, num_chunks * r without, or
        ``min(d_in, d_out)`` for a long document's factorised update.
      num_tokens: templated token count of the source document.
      num_chunks: chunks it was split into.
    """

    lora: LoRA
    rank: int = struct.field(pytree_node=False)
    num_tokens: int = struct.field(pytree_node=False)
    num_chunks: int = struct.field(pytree_node=False)

    @property
    def A(self):
        return self.lora.A

    @property
    def B(self):
        return self.lora.B


def stack_adapters(adapters: Sequence[Adapter]) -> LoRA:
    """One LoRA with a row per adapter (for a batch of prompts, one document each), zero-padded to the
    largest rank among them."""
    if not adapters:
        raise ValueError("no adapters given")
    rank = max(next(iter(a.A.values())).shape[2] for a in adapters)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, rank - x.shape[2]), (0, 0)))
    return jax.tree.map(lambda *xs: jnp.concatenate([pad(x) for x in xs]), *(a.lora for a in adapters))


def delta_weights(adapter: Adapter, module: str) -> jax.Array:
    """The dense update ``alpha * A^T B`` of one module, ``[L, d_in, d_out]`` (for checks and tests)."""
    a, b = adapter.A[module][0], adapter.B[module][0]
    return adapter.lora.alpha * jnp.einsum("lrd,lro->ldo", a, b)


def adapter_bytes(adapter: Adapter | LoRA) -> int:
    """Bytes of an adapter's A and B arrays (what D2L adds to answer-time memory)."""
    lora = adapter.lora if isinstance(adapter, Adapter) else adapter
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((lora.A, lora.B))))


def _pad_chunks(chunks: Sequence[Sequence[int]], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[rows, length]`` token ids and mask (rows past the chunks are padding)."""
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, c in enumerate(chunks):
        tokens[i, : len(c)] = c
        mask[i, : len(c)] = 1
    return tokens, mask


def batched_adapters(
    config: HypernetConfig,
    execution: HypernetExecution,
    base: DecoderConfig,
    base_params,
    params,
    documents: Sequence[tuple[list[list[int]], int]],
    scaler: float = 1.0,
    bias_scaler: float = 1.0,
) -> list[Adapter]:
    """Adapters of several documents in one pass; ``documents`` are ``(chunks, templated tokens)`` pairs with
    at most ``config.max_chunks`` chunks each.

    The chunks are right-padded to a bucketed length and encoded ``execution.chunk_group_size`` at a time;
    each adapter keeps a bucketed prefix of the static rank (the ranks past its own are zero).
    """
    chunks = [c for doc_chunks, _ in documents for c in doc_chunks]
    length = bucket_length(max(len(c) for c in chunks))
    groups = math.ceil(len(chunks) / execution.chunk_group_size)
    size = math.ceil(len(chunks) / groups)
    tokens, mask = _pad_chunks(chunks, groups * size, length)
    owners = np.concatenate([np.full(len(c), g) for g, (c, _) in enumerate(documents)])
    slots = np.concatenate([np.arange(len(c)) for c, _ in documents])
    pad = groups * size - len(chunks)
    num_chunks = np.array([len(c) for c, _ in documents], np.int32)
    lora = _document_adapters(
        config,
        base,
        base_params,
        params,
        tokens.reshape(groups, size, length),
        mask.reshape(groups, size, length),
        np.pad(owners, (0, pad), constant_values=len(documents)).astype(np.int32),
        np.pad(slots, (0, pad)).astype(np.int32),
        num_chunks,
        np.full(len(documents), scaler, np.float32),
        np.float32(bias_scaler),
        execution=execution,
    )
    adapters = []
    for g, ((_, num_tokens), n) in enumerate(zip(documents, num_chunks.tolist())):
        rank = (n + config.use_bias) * config.lora_rank
        # Ranks past `rank` are zero; keep a bucketed prefix so inference does not pay for them.
        kept = min(bucket_length(rank, minimum=config.lora_rank), next(iter(lora.A.values())).shape[2])
        adapters.append(Adapter(jax.tree.map(lambda x: x[g : g + 1, :, :kept], lora), rank, num_tokens, n))
    return adapters


@jax.jit
def _add_products(total, a, b):
    """``total + sum_c A_c^T B_c`` per layer: ``[L, d_in, d_out]`` from ``A[C, L, r, d_in]``, ``B[C, L, r, d_out]``."""
    return total + jnp.einsum("clrd,clro->ldo", a, b)


def segmented_adapter(
    config: HypernetConfig,
    execution: HypernetExecution,
    base: DecoderConfig,
    base_params,
    params,
    chunks: list[list[int]],
    num_tokens: int,
    scaler: float = 1.0,
    bias_scaler: float = 1.0,
    segment_chunks: int | None = None,
    dense_above_rank: int | None = None,
) -> Adapter:
    """One adapter for a document of any number of chunks, encoded ``segment_chunks`` at a time.

    ``segment_chunks`` defaults to ``max_chunks`` rounded up to a whole number of chunk groups; every segment
    has the same shape, so it compiles once. ``scaler`` multiplies every chunk's A (linear in the update),
    ``bias_scaler`` both factors of the bias LoRA (quadratic), as one pass does.

    Per target module the LoRA is, with ``n`` chunks and generator rank ``r``:

    * concatenated: the chunk LoRAs along the rank axis (chunk-major), then the bias LoRA: ``(n + 1) r``
      ranks, zero-padded to a bucketed rank, when that bucket is at most ``dense_above_rank`` (default
      ``min(d_in, d_out)``);
    * factorised: otherwise the summed update ``D = sum_c A_c^T B_c + bias`` (``[L, d_in, d_out]``) as
      ``A = D^T, B = I`` (rank ``d_out``) when ``d_out <= d_in``, else ``A = I, B = D`` (rank ``d_in``).
      ``x A^T B = x D`` exactly; only float rounding differs from the concatenated form.

    Raises ValueError when ``segment_chunks < 1``.
    """
    group = execution.chunk_group_size
    segment = segment_chunks if segment_chunks is not None else max(config.max_chunks, group)
    if segment < 1:
        raise ValueError(f"segment_chunks must be >= 1, got {segment}")
    groups = math.ceil(segment / group)
    segment = groups * group
    length = bucket_length(max(len(c) for c in chunks))
    r, n = config.lora_rank, len(chunks)
    total_rank = (n + config.use_bias) * r
    shapes = base.projection_shapes()
    modules = config.target_modules
    dense = {m: bucket_length(total_rank, minimum=r) > (dense_above_rank if dense_above_rank is not None else min(shapes[m])) for m in modules}

    parts_a = {m: [] for m in modules}
    parts_b = {m: [] for m in modules}
    sums = {m: jnp.zeros((base.num_layers, *shapes[m]), jnp.float32) for m in modules if dense[m]}
    for start in range(0, n, segment):
        piece = chunks[start : start + segment]
        tokens, mask = _pad_chunks(piece, segment, length)
        a, b = _encode_chunks(
            config, base, base_params, params, tokens.reshape(groups, group, length), mask.reshape(groups, group, length), execution=execution
        )
        for m in modules:
            # Padding chunks (all-zero mask) are encoded too and dropped here.
            a_m, b_m = a[m][: len(piece)] * jnp.float32(scaler), b[m][: len(piece)]
            if dense[m]:
                sums[m] = _add_products(sums[m], a_m, b_m)
            else:
                parts_a[m].append(a_m)
                parts_b[m].append(b_m)

    bias = bias_lora(params["head"], modules) if config.use_bias else None
    lora_a, lora_b, ranks = {}, {}, []
    for m in modules:
        d_in, d_out = shapes[m]
        bias_a = bias_b = None
        if bias is not None:
            every_layer = lambda x: pad_to_base_layers(jnp.asarray(x, jnp.float32), base.num_layers, 0)
            bias_a = every_layer(bias[0][m]) * jnp.float32(bias_scaler)
            bias_b = every_layer(bias[1][m]) * jnp.float32(bias_scaler)
        if dense[m]:
            total = sums[m] if bias_a is None else _add_products(sums[m], bias_a[None], bias_b[None])
            if d_out <= d_in:
                a_full = jnp.swapaxes(total, 1, 2)
                b_full = jnp.broadcast_to(jnp.eye(d_out, dtype=jnp.float32), (base.num_layers, d_out, d_out))
            else:
                a_full = jnp.broadcast_to(jnp.eye(d_in, dtype=jnp.float32), (base.num_layers, d_in, d_in))
                b_full = total
            ranks.append(min(d_in, d_out))
        else:
            # [C, L, r, d] -> [L, C * r, d]: chunk-major, rank-minor, as the reference concatenates.
            a_full = jnp.concatenate(parts_a[m]).transpose(1, 0, 2, 3).reshape(base.num_layers, n * r, d_in)
            b_full = jnp.concatenate(parts_b[m]).transpose(1, 0, 2, 3).reshape(base.num_layers, n * r, d_out)
            if bias_a is not None:
                a_full = jnp.concatenate([a_full, bias_a], axis=1)
                b_full = jnp.concatenate([b_full, bias_b], axis=1)
            pad = bucket_length(total_rank, minimum=r) - total_rank
            a_full = jnp.pad(a_full, ((0, 0), (0, pad), (0, 0)))
            b_full = jnp.pad(b_full, ((0, 0), (0, pad), (0, 0)))
            ranks.append(total_rank)
        lora_a[m], lora_b[m] = a_full[None], b_full[None]
    return Adapter(LoRA(A=lora_a, B=lora_b, alpha=config.alpha), max(ranks), num_tokens, n)
