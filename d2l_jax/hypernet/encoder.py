"""The context encoder: the frozen base model's activations on document chunks (no second copy of weights)."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.models.decoder import embed_tokens, first_layers_hidden_states
from d2l_jax.models.families import DecoderConfig


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
    hidden = first_layers_hidden_states(base, base_params, tokens, mask, num_layers)
    return jax.lax.stop_gradient(hidden if config.layer_to_layer else hidden[-1])
