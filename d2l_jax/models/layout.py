"""How scanned layers' weights are held in memory: stacked ``[L, ...]`` arrays, or one array per layer.

``nn.scan`` keeps a loop's weights stacked. Inside a loop that XLA unrolls fully, each iteration reads a
static slice of the stacked arrays, and XLA's CPU backend copies that slice out before multiplying (a
weight copy per layer per call: a quarter of a bfloat16 forward pass of SmolLM2-135M). Held as one array
per layer and stacked inside the jitted function, the stacking and the slicing cancel out and every
matmul reads its layer's weights in place. A loop that is not fully unrolled keeps its weights stacked
(stacking them inside the program would copy them all instead).

``split_layers`` turns every ``layers`` entry of a parameter tree whose loop is fully unrolled into a tuple
of per-layer trees; ``stacked_layers`` (called inside the jitted functions, before ``Module.apply``) turns
them back. Both leave trees without per-layer entries as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LAYERS = "layers"


def split_layers(
    tree: Any, unroll: int, item: Callable[[Any, int], Any] = lambda leaf, i: leaf[i], is_leaf: Callable[[Any], bool] | None = None
) -> Any:
    """``tree`` with each stacked ``layers`` entry of at most ``unroll`` layers as a tuple of per-layer trees.

    ``item(leaf, i)`` is layer ``i`` of a stacked leaf (indexing by default; boxed shapes take their own,
    with ``is_leaf`` saying what a leaf is). Entries already split, and longer ones, are left as they are.
    """
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key != LAYERS:
            out[key] = split_layers(value, unroll, item, is_leaf)
        elif isinstance(value, dict) and value and (length := jax.tree.leaves(value)[0].shape[0]) <= unroll:
            out[key] = tuple(jax.tree.map(lambda leaf: item(leaf, i), value, is_leaf=is_leaf) for i in range(length))
        else:
            out[key] = value
    return out


def stacked_layers(tree: Any) -> Any:
    """``tree`` with every per-layer ``layers`` entry (see ``split_layers``) stacked again, as ``nn.scan``
    reads it; a no-op for stacked trees. Call it inside jit, where the stacking costs nothing."""
    if not isinstance(tree, dict):
        return tree
    return {
        key: jax.tree.map(lambda *leaves: jnp.stack(leaves), *value) if key == LAYERS and isinstance(value, tuple) else stacked_layers(value)
        for key, value in tree.items()
    }
