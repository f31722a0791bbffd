"""Logical-axis names and the one rule table that maps them onto mesh axes.

Model code speaks only logical names (parameters via ``nn.with_logical_partitioning``, activations via
:func:`constrain`); a mesh with axes ``data``, ``fsdp`` and ``tensor`` and these rules decide placement.
Outside a mesh and rules context the constraints are no-ops, so the same modules run unsharded.
"""

from __future__ import annotations

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

# Base model parameters: vocab, embed, heads (query heads x head_dim), kv (kv heads x head_dim), mlp,
# layers, norm. Hypernetwork parameters: feature (context width F), feature_mlp (4F), latent (H),
# latent_mlp (4H), latent_heads, latent_kv, latent_queries, blocks (Perceiver layers), lora (d_in + d_out
# of the head), rank, modules. Activations: activation_batch, activation_length, activation_embed.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("feature", "fsdp"),
    ("feature_mlp", "tensor"),
    ("latent", "fsdp"),
    ("latent_mlp", "tensor"),
    ("latent_heads", "tensor"),
    ("latent_kv", "tensor"),
    ("latent_queries", None),
    ("blocks", None),
    ("lora", "tensor"),
    ("rank", None),
    ("modules", None),
)

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")


def constrain(x, names=HIDDEN_AXES):
    """Constrains an activation's sharding by logical axis names (a no-op without a mesh)."""
    return nn.with_logical_constraint(x, names)
