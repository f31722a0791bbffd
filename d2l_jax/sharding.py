"""Logical-axis names and the one rule table that maps them onto mesh axes.

Model code speaks only logical names (parameters via ``nn.with_logical_partitioning``, activations via
:func:`constrain`); a mesh with axes ``data``, ``fsdp`` and ``tensor`` and these rules decide placement.
Outside a mesh and rules context the constraints are no-ops, so the same modules run unsharded.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

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


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``data``, ``fsdp``, ``tensor``; sizes default to 1 except ``data`` (all devices).

    Raises ValueError naming the sizes when their product differs from the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    rest = math.prod(shape.get(a, 1) for a in MESH_AXES if a != "data")
    shape.setdefault("data", len(devices) // rest if rest and len(devices) % rest == 0 else 0)
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are {len(devices)}")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fitting_spec(shape: tuple[int, ...], spec: P, mesh: jax.sharding.Mesh) -> P:
    """``spec`` without the mesh axes that do not divide their dimension (those dimensions replicate)."""
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, ways = [], 1
        for name in names:
            if size % (ways * mesh.shape[name]) == 0:
                kept.append(name)
                ways *= mesh.shape[name]
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def logical_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree whose leaves carry logical axis names (``nn.Partitioned``, e.g. from
    ``jax.eval_shape`` of an ``init``); unboxed leaves are replicated. The result matches the unboxed tree."""
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.unbox(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, _fitting_spec(x.shape, spec, mesh)),
        shapes,
        mesh_specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: the leading axis over ``data`` and ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *(None,) * (ndim - 1)))


@contextlib.contextmanager
def mesh_rules(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
    """Makes ``mesh`` and the logical-axis ``rules`` current, so activation constraints take effect in
    functions traced inside (``jax.set_mesh`` must be entered outside ``jax.jit``)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
