"""Batched autoregressive generation: one jitted prefill + ``lax.while_loop`` decode over a KV cache.

Prompts are left-padded to a bucketed length (and the batch to a power of two) so that prompts of
similar length share one compiled program; the loop stops when every row has produced a stop token
or ``max_new_tokens`` tokens, without returning to the host in between.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from d2l_jax.models.decoder import Decoder, KVCache
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layers import positions_from_mask
from d2l_jax.models.layout import stacked_layers
from d2l_jax.models.lora import LoRA

NO_TOKEN = -1  # fills the output after a row has stopped


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest bucket >= n among minimum * {2^k, 1.5 * 2^k} (at most a third wasted)."""
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def sample_next(logits: Float[Array, "B V"], key, temperature, top_p) -> Int[Array, "B"]:
    """Greedy when ``temperature == 0``, else nucleus sampling at that temperature (both traced)."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1)

    def nucleus(_):
        scaled = logits / temperature
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the most likely token is always kept
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None).astype(jnp.int32)


@struct.dataclass
class _LoopState:
    step: Int[Array, ""]
    token: Int[Array, "B"]
    position: Int[Array, "B"]
    cache: KVCache
    done: Array
    out: Int[Array, "B N"]
    top_log_probs: Float[Array, "B N K"]  # K = 0 unless asked for
    top_ids: Int[Array, "B N K"]
    key: Array


def _record_top_k(log_probs_out, ids_out, logits: Float[Array, "B V"], index):
    """Writes the top-k (k = the buffers' last axis) of ``logits``' log-softmax at ``index`` of the buffers."""
    k = ids_out.shape[-1]
    if k == 0:
        return log_probs_out, ids_out
    log_probs, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return log_probs_out.at[:, index].set(log_probs), ids_out.at[:, index].set(ids.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "buffer", "top_k"))
def generate_tokens(
    config: DecoderConfig,
    params,
    tokens: Int[Array, "B T"],
    mask: Int[Array, "B T"],
    lora: LoRA | None,
    key,
    stop_ids: Int[Array, "S"],
    temperature,
    top_p,
    limit,
    *,
    buffer: int,
    top_k: int = 0,
):
    """Generates up to ``limit <= buffer`` tokens per left-padded prompt row.

    Returns ``[B, buffer]`` token ids: each row's tokens up to and including its first stop token,
    then NO_TOKEN. With ``top_k > 0`` returns ``(ids, log_probs, top_ids)``, the last two ``[B, buffer,
    top_k]``: at each generated position the top-k of the distribution it was chosen from (float32
    log-softmax), which for a greedy reply is the teacher-forced distribution over that token.
    """
    model = Decoder(config)
    variables = {"params": stacked_layers(params)}
    batch, length = tokens.shape
    positions = positions_from_mask(mask)
    prefill = model.apply(
        variables,
        tokens,
        positions,
        mask,
        lora=lora,
        cache=KVCache.empty(config, batch, length + buffer),
        logit_positions=jnp.full((batch, 1), length - 1),
    )
    key, subkey = jax.random.split(key)
    token = sample_next(prefill.logits[:, 0], subkey, temperature, top_p)
    empty_row = mask.sum(axis=1) == 0
    top_log_probs, top_ids = _record_top_k(
        jnp.zeros((batch, buffer, top_k), jnp.float32), jnp.zeros((batch, buffer, top_k), jnp.int32), prefill.logits[:, 0], 0
    )
    state = _LoopState(
        step=jnp.ones((), jnp.int32),
        token=token,
        position=positions[:, -1] + 1,
        cache=prefill.cache,
        done=jnp.isin(token, stop_ids) | empty_row,
        out=jnp.full((batch, buffer), NO_TOKEN, jnp.int32).at[:, 0].set(jnp.where(empty_row, NO_TOKEN, token)),
        top_log_probs=top_log_probs,
        top_ids=top_ids,
        key=key,
    )

    def keep_going(s: _LoopState):
        return (s.step < limit) & ~jnp.all(s.done)

    def decode_one(s: _LoopState):
        step = model.apply(
            variables,
            s.token[:, None],
            s.position[:, None],
            jnp.ones((batch, 1), jnp.int32),
            lora=lora,
            cache=s.cache,
            logit_positions=jnp.zeros((batch, 1), jnp.int32),
        )
        key, subkey = jax.random.split(s.key)
        token = sample_next(step.logits[:, 0], subkey, temperature, top_p)
        out = s.out.at[:, s.step].set(jnp.where(s.done, NO_TOKEN, token))
        top_log_probs, top_ids = _record_top_k(s.top_log_probs, s.top_ids, step.logits[:, 0], s.step)
        return _LoopState(
            step=s.step + 1,
            token=token,
            position=s.position + 1,
            cache=step.cache,
            done=s.done | jnp.isin(token, stop_ids),
            out=out,
            top_log_probs=top_log_probs,
            top_ids=top_ids,
            key=key,
        )

    final = jax.lax.while_loop(keep_going, decode_one, state)
    return (final.out, final.top_log_probs, final.top_ids) if top_k else final.out


def left_pad(sequences: list[list[int]], length: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ``[rows, length]`` ids and a 0/1 mask (extra rows are all padding)."""
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(sequences):
        if seq:
            tokens[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    return tokens, mask


def strip_after_stop(row: np.ndarray, stop_ids: set[int]) -> list[int]:
    """The generated ids before the first stop token or NO_TOKEN."""
    ids = []
    for token in row.tolist():
        if token == NO_TOKEN or token in stop_ids:
            break
        ids.append(token)
    return ids
