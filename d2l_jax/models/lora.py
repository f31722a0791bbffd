"""Per-example LoRA adapters as explicit pytrees.

A :class:`LoRA` holds, for each targeted projection (Hugging Face names such as ``"down_proj"``),
``A[B, L, R, d_in]`` and ``B[B, L, R, d_out]``: one adapter per batch row, stacked over layers, with B
stored rank-major (the transpose of PEFT's ``lora_B``). A projection ``y = x W`` becomes

    y = x W + alpha * (x A^T) B

with ``alpha`` fixed by the generating rank ``r`` (``2 * r**1.5``) and independent of the combined rank
``R``, which grows when adapters of several chunks are concatenated along the rank axis.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_alpha(rank: int) -> float:
    """The reference's scaling for a rank-``rank`` generator: ``2 * rank**1.5`` (45.25 at rank 8)."""
    return 2.0 * rank**1.5


@struct.dataclass
class LoRA:
    """LoRA weights for some projections of every layer, one adapter per batch row.

    Attributes:
      A: module name -> ``[B, L, R, d_in]``.
      B: module name -> ``[B, L, R, d_out]``.
      alpha: the scaling applied to ``B^T A`` (static).
    """

    A: Mapping[str, Float[Array, "B L R d_in"]]
    B: Mapping[str, Float[Array, "B L R d_out"]]
    alpha: float = struct.field(pytree_node=False)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.A))

    def layer(self, module: str) -> tuple[jax.Array, jax.Array] | None:
        """(A, B) for ``module`` inside a scanned layer (layer axis already removed), or None."""
        if module not in self.A:
            return None
        return self.A[module], self.B[module]


def validate_lora(lora: LoRA, projection_shapes: Mapping[str, tuple[int, int]], num_layers: int, batch: int) -> None:
    """Raises ValueError if ``lora`` does not fit a model with these projections, layers and batch size."""
    if set(lora.A) != set(lora.B):
        raise ValueError(f"LoRA A modules {sorted(lora.A)} differ from B modules {sorted(lora.B)}")
    for name in lora.A:
        if name not in projection_shapes:
            raise ValueError(f"LoRA targets unknown module {name!r}; known: {sorted(projection_shapes)}")
        d_in, d_out = projection_shapes[name]
        a, b = lora.A[name], lora.B[name]
        if a.ndim != 4 or b.ndim != 4:
            raise ValueError(f"LoRA {name}: A and B must be [B, L, R, d], got {a.shape} and {b.shape}")
        want_a, want_b = (batch, num_layers, a.shape[2], d_in), (batch, num_layers, a.shape[2], d_out)
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(f"LoRA {name}: expected A {want_a} and B {want_b}, got {a.shape} and {b.shape}")


def lora_delta(x: Float[Array, "B T d_in"], a: Float[Array, "B R d_in"], b: Float[Array, "B R d_out"], alpha: float):
    """``alpha * (x A^T) B`` per batch row, computed in A's dtype (as the reference does)."""
    x = x.astype(a.dtype)
    xa = jnp.einsum("btd,brd->btr", x, a)
    return alpha * jnp.einsum("btr,bro->bto", xa, b)


def merged_kernel(kernel: Float[Array, "d_in d_out"], a: Float[Array, "R d_in"], b: Float[Array, "R d_out"], alpha: float):
    """The dense kernel equivalent to one adapter: ``W + alpha * A^T B``."""
    return kernel + alpha * jnp.einsum("rd,ro->do", a, b).astype(kernel.dtype)
