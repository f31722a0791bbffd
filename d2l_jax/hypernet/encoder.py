"""The context encoder: the frozen base model's activations on document chunks (no second copy of weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.models.decoder import Decoder, embed_tokens
from d2l_jax.models.families import DecoderConfig


def first_layers(base: DecoderConfig, base_params: dict, num_layers: int) -> tuple[DecoderConfig, dict]:
    """A config and parameter view of the base model truncated to its first ``num_layers`` layers."""
    params = dict(base_params, layers=jax.tree.map(lambda p: p[:num_layers], base_params["layers"]))
    return base.replace(num_layers=num_layers), params


def context_features(
    config: HypernetConfig, base: DecoderConfig, base_params: dict, tokens: Int[Array, "C T"], mask: Int[Array, "C T"]
) -> Float[Array, "..."]:
    """Features of right-padded chunks, under ``stop_gradient``.

    Returns ``[L, C, T, F]`` for ``per_layer_activations`` (entry 0: the scaled embeddings; entry l: the
    input of layer l; entry L-1: the final-normed output of layer L-2; the last layer never runs), and
    ``[C, T, F]`` for ``early_exit`` (final-normed output of layer ``exit_layer - 1``) and ``embed_only``.
    """
    if config.encoder_type == "embed_only":
        return jax.lax.stop_gradient(embed_tokens(base, base_params["embedding"], tokens))
    num_layers = base.num_layers - 1 if config.layer_to_layer else config.exit_layer(base)
    truncated, params = first_layers(base, base_params, num_layers)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = Decoder(truncated).apply(
        {"params": params}, tokens, positions, mask, compute_logits=False, return_hidden_states=config.layer_to_layer
    )
    return jax.lax.stop_gradient(out.hidden_states if config.layer_to_layer else out.last_hidden_state)
