"""The HyperLoRA head: Perceiver latents -> per-chunk LoRA weights for every layer and target module.

Layer-major latents ``[L, C, M, r, H]`` (L: the adapted layers) go through ResMLP blocks (per-layer
weights by default), are L2-normalised over H, and a per-layer linear head (per rank too with
``per_rank_head``) maps each to ``d_in + d_out`` of its module: one rank row of A and one of B.
``scaler_A`` (ones) and ``scaler_B`` (zeros) scale them per layer and rank, so a fresh hypernetwork
generates ``B = 0`` (with ``b_init="zero_head"``, ``scaler_B`` starts at ones and the head's B weights at
zero instead). With ``shared_a`` the head emits only B and every chunk's A is one learned, context-free
``shared_A`` per layer and rank. With ``center_head_input`` the head's inputs are centred: while training
on the mean over the batch's documents, afterwards on ``input_mean``, the running mean the train step keeps
in the ``stats`` collection (beside the parameters, as batch normalisation keeps its statistics; no
optimizer sees it), so B is driven by how a document differs from the typical one. The learned "bias LoRA" (``bias_A``, ``bias_B``, B zero at init) is
appended to every document's adapter when combining.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.hypernet.perceiver import TORCH_LINEAR_INIT
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layers import compute_einsum


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class ResMLPPerLayer(nn.Module):
    """``x + LN(Mix2(SiLU(Mix1(LN(x)))))`` with per-layer Mix weights (einops EinMix initialisation).

    Works layer-major, ``x [L, N, H]``, so the per-layer products are plain batched matmuls.
    """

    num_layers: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Float[Array, "L N H"]):
        width = x.shape[-1]
        hidden = 4 * width
        dtype = jnp.dtype(self.dtype)
        w1 = _param(self, "mix1_kernel", _uniform(math.sqrt(3 / width)), (self.num_layers, width, hidden), ("layers", "latent", "latent_mlp"))
        b1 = _param(self, "mix1_bias", _uniform(math.sqrt(1 / width)), (self.num_layers, hidden), ("layers", "latent_mlp"))
        w2 = _param(self, "mix2_kernel", _uniform(math.sqrt(3 / hidden)), (self.num_layers, hidden, width), ("layers", "latent_mlp", "latent"))
        b2 = _param(self, "mix2_bias", _uniform(math.sqrt(1 / hidden)), (self.num_layers, width), ("layers", "latent"))
        h = nn.LayerNorm(epsilon=1e-5, name="norm_in")(x)
        h = compute_einsum("lnh,lhk->lnk", h, w1, dtype) + b1[:, None, :]
        h = compute_einsum("lnk,lkh->lnh", jax.nn.silu(h), w2, dtype) + b2[:, None, :]
        return x + nn.LayerNorm(epsilon=1e-5, name="norm_out")(h).astype(x.dtype)


class ResMLPShared(nn.Module):
    """``x + LN(Linear(SiLU(Linear(LN(x)))))`` shared by all layers (PyTorch nn.Linear with bias)."""

    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        dtype = jnp.dtype(self.dtype)
        dense = lambda n, fan_in, name: nn.Dense(
            n, dtype=dtype, kernel_init=TORCH_LINEAR_INIT, bias_init=_uniform(1 / math.sqrt(fan_in)), name=name
        )
        h = nn.LayerNorm(epsilon=1e-5, name="norm_in")(x)
        h = dense(width, 4 * width, "linear2")(jax.nn.silu(dense(4 * width, width, "linear1")(h)))
        return x + nn.LayerNorm(epsilon=1e-5, name="norm_out")(h).astype(x.dtype)


def l2_normalize(x, eps: float):
    """``x / max(||x||, eps)`` over the last axis: the reference's ``x / ||x||`` except at the zero vector."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _zero_b_columns(init, d_ins: list[int], d_lora: int):
    """``init`` with every module's B columns (``d_in:``) zeroed; the module axis, if any, is axis 1."""

    def zeroed(key, shape, dtype=jnp.float32):
        keep = (jnp.arange(d_lora)[None, :] < jnp.array(d_ins)[:, None]).astype(dtype)  # [M, d_lora]
        if len(shape) == 3:  # [L, H, d_lora]: one module
            keep = keep[0]
        else:  # [L, M, (r,) H, d_lora]
            keep = keep.reshape(1, len(d_ins), *[1] * (len(shape) - 3), d_lora)
        return init(key, shape, dtype) * keep

    return zeroed


class LoRAHead(nn.Module):
    """Layer-major latents ``[L, C, M, r, H]`` -> ``(A, B)``: module -> ``[C, L, r, d_in]`` / ``[C, L, r, d_out]``.

    Also owns the bias LoRA (``bias_A_<module>`` ``[L, r, d_in]``, ``bias_B_<module>`` ``[L, r, d_out]``),
    read by :func:`bias_lora`.
    """

    config: HypernetConfig
    base: DecoderConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, latents: Float[Array, "L C M R H"], center_on=None):
        """``(A, B)``.

        ``center_on`` (a ``[C]`` mask, training only) centres on the mean over those chunks instead of the
        stored ``input_mean``, as batch normalisation uses the batch's statistics while training; that mean
        ``[L, M, r, H]`` is sown as ``intermediates/batch_input_mean`` for the train step's running mean.
        """
        c, base = self.config, self.base
        num_layers, rank, width = c.num_adapted(base), c.lora_rank, c.latent_size
        modules = c.target_modules
        shapes = base.projection_shapes()
        d_lora = max(head_width(shapes[m], c.shared_a) for m in modules)
        _, chunks, num_modules, _, _ = latents.shape
        x = latents.reshape(num_layers, -1, width)
        for i in range(c.num_pre_head_layers):
            block = ResMLPPerLayer(num_layers, self.dtype, name=f"pre_head_{i}") if c.per_layer_processing else ResMLPShared(self.dtype, name=f"pre_head_{i}")
            x = block(x)
        if c.center_head_input:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("layers", "modules", "rank", "latent"))
            shape = (num_layers, num_modules, rank, width)
            stored = self.variable("stats", "input_mean", lambda: zeros(None, shape, jnp.float32)).value
            x = x.reshape(num_layers, chunks, -1, width)
            if center_on is None:
                mean = jax.lax.stop_gradient(stored).reshape(num_layers, 1, -1, width)
            else:
                weights = center_on.astype(x.dtype)
                mean = jnp.einsum("lcnh,c->lnh", x, weights)[:, None] / jnp.maximum(weights.sum(), 1)
                self.sow("intermediates", "batch_input_mean", jax.lax.stop_gradient(mean).reshape(stored.shape))
            x = (x - mean).reshape(num_layers, -1, width)
        x = l2_normalize(x, c.l2_eps)
        head_init = nn.initializers.normal(0.5 / math.sqrt(width + d_lora * rank))
        if c.b_init == "zero_head":
            head_init = _zero_b_columns(head_init, [0 if c.shared_a else shapes[m][0] for m in modules], d_lora)
        dtype = jnp.dtype(self.dtype)
        if c.per_rank_head:
            axes = ("layers", "modules", "rank", "latent", "lora")
            kernel = _param(self, "head", head_init, (num_layers, num_modules, rank, width, d_lora), axes)
            x = x.reshape(num_layers, chunks, num_modules, rank, width)
            flat = compute_einsum("lcmrh,lmrhd->lcmrd", x, kernel, dtype)
        elif num_modules == 1:
            kernel = _param(self, "head", head_init, (num_layers, width, d_lora), ("layers", "latent", "lora"))
            flat = compute_einsum("lnh,lhd->lnd", x, kernel, dtype)
            flat = flat.reshape(num_layers, chunks, 1, rank, d_lora)
        else:
            kernel = _param(self, "head", head_init, (num_layers, num_modules, width, d_lora), ("layers", "modules", "latent", "lora"))
            x = x.reshape(num_layers, chunks, num_modules, rank, width).transpose(0, 2, 1, 3, 4)
            x = x.reshape(num_layers, num_modules, chunks * rank, width)
            flat = compute_einsum("lmnh,lmhd->lmnd", x, kernel, dtype)
            flat = flat.reshape(num_layers, num_modules, chunks, rank, d_lora).transpose(0, 2, 1, 3, 4)
        flat = flat.astype(jnp.float32).transpose(1, 0, 2, 3, 4)  # [C, L, M, r, d_lora]
        lora_a, lora_b = {}, {}
        for i, module in enumerate(modules):
            d_in, d_out = shapes[module]
            b_scaler_init = nn.initializers.zeros if c.b_init == "zero_scaler" else nn.initializers.ones
            scaler_b = _param(self, f"scaler_B_{module}", b_scaler_init, (num_layers, rank), ("layers", "rank"))
            _param(self, f"bias_A_{module}", nn.initializers.normal(0.2 / math.sqrt(d_in * rank)), (num_layers, rank, d_in), ("layers", "rank", "lora"))
            _param(self, f"bias_B_{module}", nn.initializers.zeros, (num_layers, rank, d_out), ("layers", "rank", "lora"))
            if c.shared_a:
                shared = _param(self, f"shared_A_{module}", nn.initializers.normal(1 / math.sqrt(d_in)), (num_layers, rank, d_in), ("layers", "rank", "lora"))
                lora_a[module] = jnp.broadcast_to(shared[None], (chunks, num_layers, rank, d_in))
                b_start = 0
            else:
                scaler_a = _param(self, f"scaler_A_{module}", nn.initializers.ones, (num_layers, rank), ("layers", "rank"))
                lora_a[module] = flat[:, :, i, :, :d_in] * scaler_a[None, :, :, None]
                b_start = d_in
            lora_b[module] = flat[:, :, i, :, b_start : b_start + d_out] * scaler_b[None, :, :, None]
        return lora_a, lora_b


def head_width(shape: tuple[int, int], shared_a: bool) -> int:
    """Outputs per rank of a module's head: ``d_in + d_out`` (rows of A and B), or ``d_out`` with a shared A."""
    d_in, d_out = shape
    return d_out if shared_a else d_in + d_out


def without_generated_b(head_params: dict, config: HypernetConfig, base: DecoderConfig) -> dict:
    """``head_params`` with the head's B outputs and every ``bias_B`` set to zero: the hypernetwork then
    generates ``B = 0`` (the student is the base model again) while what reads the document (the
    pre-head blocks, the A outputs or ``shared_A``, the scalers) is kept."""
    shapes = base.projection_shapes()
    kernel = head_params["head"]
    for i, module in enumerate(config.target_modules):
        start = 0 if config.shared_a else shapes[module][0]
        kernel = kernel.at[..., start:].set(0) if kernel.ndim == 3 else kernel.at[:, i, ..., start:].set(0)
    biases = {f"bias_B_{m}": jnp.zeros_like(head_params[f"bias_B_{m}"]) for m in config.target_modules}
    return {**head_params, "head": kernel, **biases}


def pad_to_base_layers(x: Float[Array, "... n r d"], num_layers: int, layer_axis: int):
    """Zero rows in front of the adapted layers so an adapter covers all ``num_layers`` base layers."""
    missing = num_layers - x.shape[layer_axis]
    if not missing:
        return x
    widths = [(0, 0)] * x.ndim
    widths[layer_axis] = (missing, 0)
    return jnp.pad(x, widths)


def bias_lora(head_params: dict, modules: tuple[str, ...]) -> tuple[dict, dict]:
    """The bias LoRA of the adapted layers from the head's parameters: module -> ``[n, r, d_in]`` and ``[n, r, d_out]``."""
    return {m: head_params[f"bias_A_{m}"] for m in modules}, {m: head_params[f"bias_B_{m}"] for m in modules}
