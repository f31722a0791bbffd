"""Documents of any length as one adapter (chunked internalization), and greedy replies to token ids.

``D2L.internalize`` combines a document's chunk adapters at the static rank ``(max_chunks + 1) * r`` the
hypernetwork was trained with, so it refuses documents with more chunks. :func:`internalize_long` lifts
that limit for evaluation: it encodes the chunks a segment at a time with the same hypernetwork and
builds the same combined update as the reference's ``combine_lora`` over all chunks,

    delta_W = alpha * (sum_c (s * A_c)^T B_c + s_b^2 * bias_A^T bias_B),

without ever holding a zero-padded tensor of the full rank. When the concatenated rank ``(n + 1) * r``
would exceed ``min(d_in, d_out)`` the update is stored as an exact factorisation of that smaller rank
(see :func:`internalize_long`), so answer-time memory stops growing with the document.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2l_jax.api import D2L, Adapter
from d2l_jax.data.chunking import chunk_document, tokenize_document
from d2l_jax.hypernet.head import bias_lora, pad_to_base_layers
from d2l_jax.hypernet.hypernet import encode_chunks
from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.lora import LoRA

_encode_chunks = jax.jit(encode_chunks, static_argnames=("config", "base"))


@jax.jit
def _add_products(total, a, b):
    """``total + sum_c A_c^T B_c`` per layer: ``[L, d_in, d_out]`` from ``A[C, L, r, d_in]``, ``B[C, L, r, d_out]``."""
    return total + jnp.einsum("clrd,clro->ldo", a, b)


def _tokenizer(d2l: D2L):
    if d2l.base.tokenizer is None:
        raise ValueError(f"{d2l.base.name} was loaded without a tokenizer; documents need one")
    return d2l.base.tokenizer


def all_document_chunks(d2l: D2L, document: str) -> tuple[list[list[int]], int]:
    """(chunks of templated token ids, total templated tokens), like ``D2L.document_chunks`` but
    without its ``max_chunks`` limit. Raises TypeError / ValueError for non-text or empty documents."""
    ids = tokenize_document(_tokenizer(d2l), document, d2l.affixes)
    return chunk_document(ids, d2l.affixes, d2l.config.max_chunk_len), len(ids)


def fits_one_pass(d2l: D2L, document: str) -> bool:
    """Whether ``D2L.internalize`` accepts the document (at most ``max_chunks`` chunks)."""
    return len(all_document_chunks(d2l, document)[0]) <= d2l.config.max_chunks


def internalize_long(
    d2l: D2L,
    document: str,
    scaler: float = 1.0,
    bias_scaler: float = 1.0,
    segment_chunks: int | None = None,
    dense_above_rank: int | None = None,
) -> Adapter:
    """One adapter for a document of any length; ``d2l``'s current adapter is left unchanged.

    The chunks (the same split as ``D2L.internalize``: pieces of at most ``max_chunk_len`` tokens, each a
    complete user turn) are encoded ``segment_chunks`` at a time (default: ``max_chunks`` rounded up to a
    whole number of ``chunk_group_size`` groups; every segment has the same shape, so it compiles once).
    ``scaler`` multiplies every chunk's A (linear in the update), ``bias_scaler`` both factors of the
    bias LoRA (quadratic), as ``D2L.internalize`` does.

    Per target module the LoRA is, with ``n`` chunks and generator rank ``r``:

    * concatenated: the chunk LoRAs along the rank axis (chunk-major), then the bias LoRA: ``(n + 1) r``
      ranks, zero-padded to a bucketed rank, when that bucket is at most ``dense_above_rank`` (default
      ``min(d_in, d_out)``);
    * factorised: otherwise the summed update ``D = sum_c A_c^T B_c + bias`` (``[L, d_in, d_out]``) as
      ``A = D^T, B = I`` (rank ``d_out``) when ``d_out <= d_in``, else ``A = I, B = D`` (rank ``d_in``).
      ``x A^T B = x D`` exactly; only float rounding differs from the concatenated form.

    Returns an Adapter with ``A[1, L, R, d_in]``, ``B[1, L, R, d_out]`` and ``rank`` = the largest rank in
    use over the modules (``(n + 1) r`` or ``min(d_in, d_out)``).

    Raises:
      TypeError / ValueError: non-text or empty document; ``segment_chunks < 1``.
    """
    config, base = d2l.config, d2l.base
    chunks, num_tokens = all_document_chunks(d2l, document)
    group = config.chunk_group_size
    segment = segment_chunks if segment_chunks is not None else max(config.max_chunks, group)
    if segment < 1:
        raise ValueError(f"segment_chunks must be >= 1, got {segment}")
    groups = math.ceil(segment / group)
    segment = groups * group
    length = gen.bucket_length(max(len(c) for c in chunks))
    r = config.lora_rank
    n = len(chunks)
    total_rank = (n + config.use_bias) * r
    shapes = base.config.projection_shapes()
    modules = config.target_modules
    dense = {}
    for m in modules:
        limit = dense_above_rank if dense_above_rank is not None else min(shapes[m])
        dense[m] = gen.bucket_length(total_rank, minimum=r) > limit

    parts_a = {m: [] for m in modules}
    parts_b = {m: [] for m in modules}
    sums = {m: jnp.zeros((base.config.num_layers, *shapes[m]), jnp.float32) for m in modules if dense[m]}
    for start in range(0, n, segment):
        piece = chunks[start : start + segment]
        tokens = np.zeros((segment, length), np.int32)
        mask = np.zeros((segment, length), np.int32)
        for i, c in enumerate(piece):
            tokens[i, : len(c)] = c
            mask[i, : len(c)] = 1
        tokens, mask = tokens.reshape(groups, group, length), mask.reshape(groups, group, length)
        a, b = _encode_chunks(config, base.config, base.params, d2l.params, tokens, mask)
        for m in modules:
            # Padding chunks (all-zero mask) are encoded too and dropped here.
            a_m, b_m = a[m][: len(piece)] * jnp.float32(scaler), b[m][: len(piece)]
            if dense[m]:
                sums[m] = _add_products(sums[m], a_m, b_m)
            else:
                parts_a[m].append(a_m)
                parts_b[m].append(b_m)

    bias = bias_lora(d2l.params["head"], modules) if config.use_bias else None
    lora_a, lora_b, ranks = {}, {}, []
    for m in modules:
        d_in, d_out = shapes[m]
        bias_a = bias_b = None
        if bias is not None:
            every_layer = lambda x: pad_to_base_layers(jnp.asarray(x, jnp.float32), base.config.num_layers, 0)
            bias_a = every_layer(bias[0][m]) * jnp.float32(bias_scaler)
            bias_b = every_layer(bias[1][m]) * jnp.float32(bias_scaler)
        if dense[m]:
            total = sums[m] if bias_a is None else _add_products(sums[m], bias_a[None], bias_b[None])
            num_layers = total.shape[0]
            if d_out <= d_in:
                a_full = jnp.swapaxes(total, 1, 2)
                b_full = jnp.broadcast_to(jnp.eye(d_out, dtype=jnp.float32), (num_layers, d_out, d_out))
            else:
                a_full = jnp.broadcast_to(jnp.eye(d_in, dtype=jnp.float32), (num_layers, d_in, d_in))
                b_full = total
            ranks.append(min(d_in, d_out))
        else:
            # [C, L, r, d] -> [L, C * r, d]: chunk-major, rank-minor, as the reference concatenates.
            a_full = jnp.concatenate(parts_a[m]).transpose(1, 0, 2, 3).reshape(base.config.num_layers, n * r, d_in)
            b_full = jnp.concatenate(parts_b[m]).transpose(1, 0, 2, 3).reshape(base.config.num_layers, n * r, d_out)
            if bias_a is not None:
                a_full = jnp.concatenate([a_full, bias_a], axis=1)
                b_full = jnp.concatenate([b_full, bias_b], axis=1)
            pad = gen.bucket_length(total_rank, minimum=r) - total_rank
            a_full = jnp.pad(a_full, ((0, 0), (0, pad), (0, 0)))
            b_full = jnp.pad(b_full, ((0, 0), (0, pad), (0, 0)))
            ranks.append(total_rank)
        lora_a[m], lora_b[m] = a_full[None], b_full[None]
    lora = LoRA(A=lora_a, B=lora_b, alpha=config.alpha)
    return Adapter(lora, max(ranks), num_tokens, n)


def internalize_any(d2l: D2L, documents: Sequence[str], scaler: float = 1.0) -> list[Adapter]:
    """Adapters for documents of any length: one batched ``D2L.internalize`` call when every document
    fits ``max_chunks``, else :func:`internalize_long` per document. Leaves no current adapter set."""
    documents = list(documents)
    if all(fits_one_pass(d2l, d) for d in documents):
        adapters = d2l.internalize(documents, scaler=scaler)
    else:
        adapters = [internalize_long(d2l, d, scaler=scaler) for d in documents]
    d2l.reset()
    return adapters


def delta_weights(adapter: Adapter, module: str) -> jax.Array:
    """The dense update ``alpha * A^T B`` of one module, ``[L, d_in, d_out]`` (for checks and tests)."""
    a, b = adapter.A[module][0], adapter.B[module][0]
    return adapter.lora.alpha * jnp.einsum("lrd,lro->ldo", a, b)


def adapter_bytes(adapter: Adapter | LoRA) -> int:
    """Bytes of an adapter's A and B arrays (what D2L adds to answer-time memory)."""
    lora = adapter.lora if isinstance(adapter, Adapter) else adapter
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((lora.A, lora.B))))


def truncate_middle(ids: Sequence[int], window: int, max_new_tokens: int) -> list[int]:
    """The reference's truncated in-context input: when ``len(ids) + max_new_tokens`` exceeds ``window``,
    keep the first and the last ``(window - max_new_tokens) // 2`` tokens (the middle of the document is
    dropped; the chat header and the question survive). Shorter inputs come back unchanged.

    Raises ValueError when ``max_new_tokens >= window``.
    """
    if max_new_tokens >= window:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in a window of {window} tokens")
    ids = list(ids)
    if len(ids) + max_new_tokens <= window:
        return ids
    keep = (window - max_new_tokens) // 2
    return ids[:keep] + ids[len(ids) - keep :]


def answer_program_bytes(
    base: BaseModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, lora: LoRA | None = None
) -> dict[str, int]:
    """XLA's buffer assignment for the program :meth:`BaseModel.generate_ids` runs on these prompts (compiled,
    not run): ``arguments`` (base parameters, adapter, prompt), ``temporaries`` (KV cache, activations),
    ``outputs``, and ``total`` = their sum minus aliased bytes, an upper bound on its live memory."""
    args, buffer = base.generation_args(prompts, max_new_tokens, lora)
    stats = gen.generate_tokens.lower(*args, buffer=buffer).compile().memory_analysis()
    arguments, temporaries, outputs = stats.argument_size_in_bytes, stats.temp_size_in_bytes, stats.output_size_in_bytes
    return {
        "arguments": int(arguments),
        "temporaries": int(temporaries),
        "outputs": int(outputs),
        "total": int(arguments + temporaries + outputs - stats.alias_size_in_bytes),
    }
