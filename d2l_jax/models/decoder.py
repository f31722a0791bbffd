"""One decoder-only transformer for every supported family (differences are DecoderConfig fields).

Parameter tree (Hugging Face names in parentheses; kernels are ``[d_in, d_out]``)::

    embedding                             [V, D]        (model.embed_tokens)
    layers/input_norm/scale               [L, D]        (input_layernorm)
    layers/attn/{q,k,v,o}_proj/kernel     [L, ., .]     (self_attn.*)
    layers/attn/{q,k}_norm/scale          [L, Dh]       (self_attn.{q,k}_norm; only with use_qk_norm)
    layers/post_attn_norm/scale           [L, D]        (Gemma-2 post_attention_layernorm; only with use_post_norms)
    layers/pre_mlp_norm/scale             [L, D]        (post_attention_layernorm; Gemma-2 pre_feedforward_layernorm)
    layers/mlp/{gate,up,down}_proj/kernel [L, ., .]     (mlp.*)
    layers/post_mlp_norm/scale            [L, D]        (Gemma-2 post_feedforward_layernorm; only with use_post_norms)
    final_norm/scale                      [D]           (model.norm)
    lm_head                               [D, V]        (lm_head; absent when embeddings are tied)

Layers run under ``nn.scan``; a LoRA (``d2l_jax.models.lora.LoRA``) and a KV cache's layers are scanned with
them. The cache is only read inside the scan; the new keys and values are written into it once, after it,
so a decoding loop updates its cache in place instead of rebuilding it every step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layers import DEFAULT_KERNEL_INIT, Linear, RMSNorm, attend, compute_einsum, positions_from_mask
from d2l_jax.models.layout import stacked_layers
from d2l_jax.models.lora import LoRA
from d2l_jax.sharding import constrain

MLP_ACTIVATION_FNS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots, shared write position for the whole batch.

    k, v: ``[L, B, K, S, head_dim]`` (the layout attention reads); valid: ``[B, S]`` (slot holds a real
    token); index: next free slot.
    ``unwritten`` (static) says no slot has been written, so a prefill into it is causal from slot 0.
    """

    k: Float[Array, "L B S K Dh"]
    v: Float[Array, "L B S K Dh"]
    valid: Bool[Array, "B S"]
    index: Int[Array, ""]
    unwritten: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, length: int) -> "KVCache":
        shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            unwritten=True,
        )


@struct.dataclass
class DecoderOutput:
    """logits: ``[B, T or P, V]`` float32 or None; last_hidden_state: ``[B, T, D]``, the final-normed
    output of the last layer; hidden_states: ``[L + 1, B, T, D]`` (Hugging Face convention: embeddings,
    the output of each layer but the last, then the final-normed output) or None; cache: the updated
    KVCache or None."""

    logits: Any = None
    last_hidden_state: Any = None
    hidden_states: Any = None
    cache: Any = None


def rope_inv_freq(config: DecoderConfig) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]``, with the configured scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        mid = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_mid, mid, scaled)
    raise ValueError(f"unknown RoPE scaling kind {scaling.kind!r}")


def rope_tables(config: DecoderConfig, positions: Int[Array, "B T"]):
    """cos and sin ``[B, T, 1, head_dim]`` (Hugging Face's half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(config)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T N Dh"], cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def embed_tokens(config: DecoderConfig, embedding: Float[Array, "V D"], tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Token embeddings in the compute dtype, times the family's embedding multiplier."""
    dtype = jnp.dtype(config.dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if config.embedding_multiplier != 1.0:
        x = x * jnp.asarray(config.embedding_multiplier, dtype)
    return x


def attention_mask(
    query_segments: Int[Array, "B T"],
    key_segments: Int[Array, "B S"],
    query_slots: Int[Array, "T"],
    key_slots: Int[Array, "S"],
    sliding_window: int | None = None,
) -> Bool[Array, "B T S"]:
    """Causal attention restricted to the same segment (0 = padding, never attended)."""
    causal = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        causal &= query_slots[:, None] - key_slots[None, :] < sliding_window
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return same & (key_segments[:, None, :] > 0) & causal[None]


LayerMasks = Bool[Array, "B T S"] | tuple[Bool[Array, "B T S"], Bool[Array, "B T S"]]


def layer_masks(
    config: DecoderConfig,
    query_segments: Int[Array, "B T"],
    key_segments: Int[Array, "B S"],
    query_slots: Int[Array, "T"],
    key_slots: Int[Array, "S"],
) -> LayerMasks:
    """The attention masks the layers need: one ``[B, T, S]`` mask when every layer attends alike, else
    ``(global, sliding)`` for a model that mixes global and sliding-window layers (Gemma-2)."""
    if config.sliding_layer_flags() is None:
        return attention_mask(query_segments, key_segments, query_slots, key_slots, config.sliding_window)
    return (
        attention_mask(query_segments, key_segments, query_slots, key_slots),
        attention_mask(query_segments, key_segments, query_slots, key_slots, config.sliding_window),
    )


def sliding_flags(config: DecoderConfig) -> Bool[Array, "L"] | None:
    """Per layer, whether it takes the sliding mask of :func:`layer_masks`'s pair; None for a single mask."""
    flags = config.sliding_layer_flags()
    return None if flags is None else jnp.asarray(flags)


def select_mask(masks: LayerMasks, is_sliding: Bool[Array, ""] | None) -> Bool[Array, "B T S"]:
    """One layer's mask from :func:`layer_masks`' result and that layer's :func:`sliding_flags` entry."""
    if is_sliding is None:
        return masks
    return jnp.where(is_sliding, masks[1], masks[0])


def causal_blocks(length: int) -> int:
    """Query blocks for causal attention over ``length`` tokens: a block skips the keys after it."""
    for blocks in (16, 8, 4, 2):
        if length % blocks == 0 and length // blocks >= 32:
            return blocks
    return 1


class Attention(nn.Module):
    """Grouped-query self-attention over the new tokens and, with ``past`` (``attend``'s cached keys, values
    and mask of this layer), the cache's slots. Returns the output and the new tokens' keys and values
    ``[B, T, K, head_dim]``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, lora: LoRA | None, past):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        alpha = lora.alpha if lora is not None else 1.0
        module_lora = (lambda name: lora.layer(name)) if lora is not None else (lambda name: None)
        b, t, _ = x.shape
        q = Linear(c.num_heads * c.head_dim, ("embed", "heads"), dtype, name="q_proj")(x, module_lora("q_proj"), alpha)
        k = Linear(c.num_kv_heads * c.head_dim, ("embed", "kv"), dtype, name="k_proj")(x, module_lora("k_proj"), alpha)
        v = Linear(c.num_kv_heads * c.head_dim, ("embed", "kv"), dtype, name="v_proj")(x, module_lora("v_proj"), alpha)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.use_qk_norm:
            q = RMSNorm(c.rms_norm_eps, c.norm_weight_offset, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, c.norm_weight_offset, name="k_norm")(k)
        q = apply_rope(q, cos, sin) * jnp.asarray(c.query_scale, q.dtype)
        k = apply_rope(k, cos, sin)
        blocks = causal_blocks(t) if past is None else 1
        out = attend(q, k, v, mask, c.attn_logit_softcap, blocks, past)
        out = Linear(c.hidden_size, ("heads", "embed"), dtype, name="o_proj")(out, module_lora("o_proj"), alpha)
        return out, (k, v)


class MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, lora: LoRA | None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        alpha = lora.alpha if lora is not None else 1.0
        module_lora = (lambda name: lora.layer(name)) if lora is not None else (lambda name: None)
        gate = Linear(c.intermediate_size, ("embed", "mlp"), dtype, name="gate_proj")(x, module_lora("gate_proj"), alpha)
        up = Linear(c.intermediate_size, ("embed", "mlp"), dtype, name="up_proj")(x, module_lora("up_proj"), alpha)
        h = MLP_ACTIVATION_FNS[c.mlp_activation](gate) * up
        return Linear(c.hidden_size, ("mlp", "embed"), dtype, name="down_proj")(h, module_lora("down_proj"), alpha)


class Block(nn.Module):
    """One pre-norm decoder layer (with ``use_post_norms``, also post-norms on both branches). Scanned:
    returns the next carry and (layer input if collected, the new tokens' keys and values if ``caches``).
    ``mask`` / ``past_mask`` (over the new tokens / the cache's slots) and ``is_sliding`` are
    :func:`layer_masks`' results and this layer's :func:`sliding_flags` entry; ``past_kv`` is this layer's
    cached keys and values or None."""

    config: DecoderConfig
    collect_inputs: bool = False
    caches: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, lora: LoRA | None, past_kv, past_mask, is_sliding=None):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.norm_weight_offset, name=name)
        layer_input = x if self.collect_inputs else None
        past = None if past_kv is None else (*past_kv, select_mask(past_mask, is_sliding))
        mask = select_mask(mask, is_sliding)
        h, kv = Attention(c, name="attn")(norm("input_norm")(x), cos, sin, mask, lora, past)
        if c.use_post_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        h = MLP(c, name="mlp")(norm("pre_mlp_norm")(x), lora)
        if c.use_post_norms:
            h = norm("post_mlp_norm")(h)
        x = constrain(x + h)
        return x, (layer_input, kv if self.caches else None)


class Decoder(nn.Module):
    """Decoder-only language model.

    Call with ``tokens``, ``positions`` (RoPE positions) and ``segment_ids`` (all ``[B, T]``;
    segment 0 marks padding, and distinct positive ids keep packed sequences apart):

      - ``lora``: optional per-example LoRA (``d2l_jax.models.lora.LoRA``); None is the base model.
      - ``cache``: optional KVCache; the tokens attend to every valid earlier slot and are written at
        ``cache.index`` of the returned cache (packing is not supported in cache mode).
      - ``logit_positions``: optional ``[B, P]`` indices; logits are computed only there.
      - ``compute_logits=False`` skips the vocabulary projection entirely.
      - ``return_hidden_states=True`` also returns ``[L + 1, B, T, D]`` hidden states.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"],
        *,
        lora: LoRA | None = None,
        cache: KVCache | None = None,
        logit_positions: Int[Array, "B P"] | None = None,
        compute_logits: bool = True,
        return_hidden_states: bool = False,
    ) -> DecoderOutput:
        c = self.config
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            jnp.float32,
        )
        x = constrain(embed_tokens(c, embedding, tokens))
        cos, sin = rope_tables(c, positions)

        t = tokens.shape[1]
        past_kv = past_mask = None
        if cache is None:
            slots = jnp.arange(t)
            mask = layer_masks(c, segment_ids, segment_ids, slots, slots)
        else:
            query_slots = cache.index + jnp.arange(t)
            every_query = jnp.ones_like(segment_ids)
            mask = layer_masks(c, every_query, (segment_ids > 0).astype(jnp.int32), query_slots, query_slots)
            if not cache.unwritten:
                past_kv = (cache.k, cache.v)
                slots = jnp.arange(cache.valid.shape[1])
                past_mask = layer_masks(c, every_query, cache.valid.astype(jnp.int32), query_slots, slots)

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 1, 0, nn.broadcast, 0),
            length=c.num_layers,
            unroll=c.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, collect_inputs=return_hidden_states, caches=cache is not None, name="layers")
        x, (layer_inputs, kv) = layers(x, cos, sin, mask, lora, past_kv, past_mask, sliding_flags(c))

        final_norm = RMSNorm(c.rms_norm_eps, c.norm_weight_offset, name="final_norm")
        last_hidden_state = final_norm(x)  # dropped by XLA when unused
        hidden_states = None
        if return_hidden_states:
            hidden_states = jnp.concatenate([layer_inputs, last_hidden_state[None]], axis=0)
        new_cache = None
        if cache is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(old, new.swapaxes(2, 3).astype(old.dtype), cache.index, axis=3)
                    for old, new in zip((cache.k, cache.v), kv))  # new: [L, B, T, K, Dh]
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, segment_ids > 0, cache.index, axis=1)
            new_cache = KVCache(k=k, v=v, valid=valid, index=cache.index + t)

        logits = None
        if compute_logits:
            lm_head = None
            if not c.tie_word_embeddings:
                lm_head = self.param(
                    "lm_head", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "vocab")), (c.hidden_size, c.vocab_size), jnp.float32
                )
            logits = project_logits(c, final_norm, embedding, lm_head, x, logit_positions)
        return DecoderOutput(logits=logits, last_hidden_state=last_hidden_state, hidden_states=hidden_states, cache=new_cache)


def project_logits(config: DecoderConfig, final_norm, embedding, lm_head, x: Float[Array, "B T D"], logit_positions=None):
    """Float32 logits of the final-normed hidden states ``x`` (only at ``logit_positions`` if given)."""
    dtype = jnp.dtype(config.dtype)
    if logit_positions is not None:
        x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    x = final_norm(x)
    if lm_head is None:
        logits = compute_einsum("btd,vd->btv", x, embedding, dtype, jnp.float32)
    else:
        logits = compute_einsum("btd,dv->btv", x, lm_head, dtype, jnp.float32)
    if config.final_logit_softcap is not None:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def _layer_runner(config: DecoderConfig, params: dict, segment_ids: Int[Array, "B T"]):
    """``run(x, first, last, lora=None, collect=False)``: decoder layers ``first..last-1`` on ``x``, returning
    ``x`` and, with ``collect``, each layer's input ``[last - first, B, T, D]``. ``lora`` holds those layers'
    adapters, layer-major. Stacked layer weights run in a ``lax.scan`` indexing them; weights held apart
    (``models.layout``) in a Python loop, so that every matmul reads its layer's own array."""
    positions = positions_from_mask(segment_ids > 0)
    cos, sin = rope_tables(config, positions)
    slots = jnp.arange(segment_ids.shape[1])
    masks = layer_masks(config, segment_ids, segment_ids, slots, slots)
    flags = sliding_flags(config)
    block = Block(config)
    layers = params["layers"]

    def layer(x, layer_params, is_sliding, lora_layer):
        y, _ = block.apply({"params": layer_params}, x, cos, sin, masks, lora_layer, None, None, is_sliding)
        return y

    if config.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[config.remat_policy])

    def run(x, first, last, lora=None, collect=False):
        if isinstance(layers, tuple):
            inputs = []
            for n, index in enumerate(range(first, last)):
                inputs.append(x)
                lora_layer = None if lora is None else jax.tree.map(lambda a: a[n], lora)
                x = layer(x, layers[index], None if flags is None else flags[index], lora_layer)
            return x, jnp.stack(inputs) if collect else None

        def step(x, inputs):
            index, lora_layer = inputs
            layer_params = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, index, keepdims=False), layers)
            return layer(x, layer_params, None if flags is None else flags[index], lora_layer), x if collect else None

        return jax.lax.scan(step, x, (jnp.arange(first, last), lora), unroll=config.scan_unroll)

    return run


def first_layers_hidden_states(
    config: DecoderConfig, params: dict, tokens: Int[Array, "B T"], segment_ids: Int[Array, "B T"], num_layers: int
) -> Float[Array, "n B T D"]:
    """Hidden states of the first ``num_layers`` layers, as ``Decoder(...).hidden_states`` of a model cut
    after them: ``[num_layers + 1, B, T, D]``, the last entry final-normed. Only those layers' weights are
    read."""
    run = _layer_runner(config, params, segment_ids)
    x, inputs = run(embed_tokens(config, params["embedding"], tokens), 0, num_layers, collect=True)
    last = RMSNorm(config.rms_norm_eps, config.norm_weight_offset).apply({"params": params["final_norm"]}, x)
    return jnp.concatenate([inputs, last[None]], axis=0)


def late_lora_logits(
    config: DecoderConfig,
    params: dict,
    tokens: Int[Array, "B T"],
    segment_ids: Int[Array, "B T"],
    logit_positions: Int[Array, "B P"],
    lora: LoRA,
    first_layer: int,
) -> Float[Array, "B P V"]:
    """``Decoder(config)`` logits at ``logit_positions`` for a ``lora`` that is zero below ``first_layer``.

    The layers below ``first_layer`` run without the adapter and outside the gradient, so a backward pass
    only goes through the adapted layers; the result equals the full model's.
    """
    run = _layer_runner(config, params, segment_ids)
    x, _ = run(embed_tokens(config, params["embedding"], tokens), 0, first_layer)
    late = jax.tree.map(lambda a: jnp.moveaxis(a[:, first_layer:], 1, 0), lora)
    x, _ = run(jax.lax.stop_gradient(x), first_layer, config.num_layers, late)
    final_norm = lambda h: RMSNorm(config.rms_norm_eps, config.norm_weight_offset).apply({"params": params["final_norm"]}, h)
    return project_logits(config, final_norm, params["embedding"], params.get("lm_head"), x, logit_positions)


def label_logits(
    config: DecoderConfig,
    params,
    tokens: Int[Array, "B T"],
    mask: Int[Array, "B T"],
    label_positions: Int[Array, "B P"],
    lora: LoRA | None = None,
    first_adapted_layer: int = 0,
) -> Float[Array, "B P V"]:
    """``Decoder(config)``'s float32 logits ``[B, P, V]`` at ``label_positions`` only (with ``lora`` if given).

    ``tokens``/``mask`` are right-padded rows. A ``lora`` that is zero below ``first_adapted_layer`` lets
    the layers below run outside the gradient (the result is the same as with ``first_adapted_layer=0``).
    """
    if lora is not None and first_adapted_layer:
        return late_lora_logits(config, params, tokens, mask, label_positions, lora, first_adapted_layer)
    out = Decoder(config).apply(
        {"params": stacked_layers(params)}, tokens, positions_from_mask(mask), mask, lora=lora, logit_positions=label_positions
    )
    return out.logits
