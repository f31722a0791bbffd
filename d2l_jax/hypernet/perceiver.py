"""The Perceiver aggregator: context features -> a fixed number of latent vectors.

The reference's variant of the Idefics2 resampler: a SwiGLU modality projection F -> 4F -> H, an encoder
of cross-attention layers whose keys and values come from the context only (never the latents),
non-causal and padding-masked, then a decoder that cross-attends from the output queries to the encoder
latents. Layers use a post-norm "sandwich" of RMSNorms. Linear layers have PyTorch's default
initialisation, U(+-1/sqrt(fan_in)), and the learned queries are N(0, 1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.models.layers import MASKED_SCORE, Linear, RMSNorm, attend, compute_einsum, rms_normalize

TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    hidden: int
    features: int
    axes: tuple[str, str, str]  # logical names of the input, hidden and output widths
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        d_in, d_hidden, d_out = self.axes
        dense = lambda n, axes, name: Linear(n, axes, jnp.dtype(self.dtype), TORCH_LINEAR_INIT, name=name)
        gate = dense(self.hidden, (d_in, d_hidden), "gate_proj")(x)
        up = dense(self.hidden, (d_in, d_hidden), "up_proj")(x)
        return dense(self.features, (d_hidden, d_out), "down_proj")(jax.nn.silu(gate) * up)


class CrossAttentionLayer(nn.Module):
    """Latents attend to the context (keys/values from the context only), then a SwiGLU MLP.

    With few queries (``queries * heads < kv_heads * head_dim``, e.g. the reference's 8 latents) the
    key and value projections are folded into the queries and the attention output,
    ``q (C W_k)^T = (q W_k^T) C^T`` and ``p (C W_v) = (p C) W_v``, so no per-token keys or values are
    ever formed: the same function with a fraction of the FLOPs on long contexts. ``absorb`` forces
    either form (None: the cheaper one). The context arrives RMS-normalised without weight (shared by
    all layers); this layer's context-norm weight is folded into its key and value kernels.
    """

    config: HypernetConfig
    dtype: str = "float32"
    absorb: bool | None = None

    @nn.compact
    def __call__(self, latents: Float[Array, "N Q H"], unit_context: Float[Array, "N S H"], mask: Bool[Array, "N S"]):
        c = self.config
        dtype = jnp.dtype(self.dtype)
        width, heads, kv_heads, head_dim = c.latent_size, c.num_heads, c.num_kv_heads, c.head_dim
        kernel = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(TORCH_LINEAR_INIT, axes), shape, jnp.float32
        ).astype(dtype)
        w_q = kernel("q_proj", (width, heads * head_dim), ("latent", "latent_heads"))
        w_k = kernel("k_proj", (width, kv_heads * head_dim), ("latent", "latent_kv"))
        w_v = kernel("v_proj", (width, kv_heads * head_dim), ("latent", "latent_kv"))
        w_o = kernel("o_proj", (heads * head_dim, width), ("latent_heads", "latent"))
        norm = lambda name: RMSNorm(c.rms_norm_eps, name=name)
        n, q_len, _ = latents.shape
        groups = heads // kv_heads

        context_scale = NormScale(name="input_context_norm")(width).astype(dtype)[:, None, None]
        context_n = unit_context.astype(dtype)
        q = compute_einsum("nqh,hd->nqd", norm("input_latents_norm")(latents), w_q, dtype)
        q = q.reshape(n, q_len, heads, head_dim) * jnp.asarray(head_dim**-0.5, dtype)
        w_k = context_scale * w_k.reshape(width, kv_heads, head_dim)
        w_v = context_scale * w_v.reshape(width, kv_heads, head_dim)
        absorb = self.absorb if self.absorb is not None else q_len * heads < kv_heads * head_dim
        if absorb:
            # Rows a = (query, kv head, group): plain batched matmuls against the context.
            q_ctx = compute_einsum("nqkgd,hkd->nqkgh", q.reshape(n, q_len, kv_heads, groups, head_dim), w_k, dtype)
            scores = compute_einsum("nah,nsh->nas", q_ctx.reshape(n, -1, width), context_n, dtype, jnp.float32)
            scores = jnp.where(mask[:, None, :], scores, MASKED_SCORE)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            out = compute_einsum("nas,nsh->nah", probs, context_n, dtype).reshape(n, q_len, kv_heads, groups, width)
            out = compute_einsum("nqkgh,hkd->nqkgd", out, w_v, dtype)
        else:
            k = compute_einsum("nsh,hkd->nskd", context_n, w_k, dtype)
            v = compute_einsum("nsh,hkd->nskd", context_n, w_v, dtype)
            out = attend(q, k, v, jnp.broadcast_to(mask[:, None, :], (n, q_len, mask.shape[1])))
        out = compute_einsum("nqd,dh->nqh", out.reshape(n, q_len, heads * head_dim), w_o, dtype)
        latents = latents + norm("post_attention_norm")(out)
        hidden = c.intermediate_factor * width
        mlp = SwiGLU(hidden, width, ("latent", "latent_mlp", "latent"), self.dtype, name="mlp")
        latents = latents + norm("post_ff_norm")(mlp(norm("pre_ff_norm")(latents)))
        return latents, None


class NormScale(nn.Module):
    """The weight of an RMSNorm (ones at init) for a caller that applies it itself."""

    @nn.compact
    def __call__(self, width: int):
        return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (width,), jnp.float32)


class Resampler(nn.Module):
    """``num_layers`` cross-attention layers from ``num_queries`` learned queries, then an RMSNorm."""

    config: HypernetConfig
    execution: HypernetExecution
    num_queries: int
    num_layers: int

    @nn.compact
    def __call__(self, context: Float[Array, "N S H"], mask: Bool[Array, "N S"]) -> Float[Array, "N Q H"]:
        c = self.config
        queries = self.param(
            "latents_q",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("latent_queries", "latent")),
            (self.num_queries, c.latent_size),
            jnp.float32,
        )
        latents = jnp.broadcast_to(queries, (context.shape[0], *queries.shape))
        layers = nn.scan(
            CrossAttentionLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.num_layers,
            unroll=min(self.execution.scan_unroll, self.num_layers),
            metadata_params={nn.PARTITION_NAME: "blocks"},
        )(c, self.execution.dtype, name="layers")
        latents, _ = layers(latents, rms_normalize(context, c.rms_norm_eps), mask)
        return RMSNorm(c.rms_norm_eps, name="norm")(latents)


class Perceiver(nn.Module):
    """Features ``[N, T, F]`` (padding where ``mask`` is False) -> latents ``[N, num_outputs, H]`` (float32)."""

    config: HypernetConfig
    num_outputs: int
    execution: HypernetExecution = HypernetExecution()

    @nn.compact
    def __call__(self, features: Float[Array, "N T F"], mask: Bool[Array, "N T"]) -> Float[Array, "N Q H"]:
        c = self.config
        hidden = c.intermediate_factor * features.shape[-1]
        projection = SwiGLU(hidden, c.latent_size, ("feature", "feature_mlp", "latent"), self.execution.dtype, name="modality_projection")
        context = projection(features)
        latents = Resampler(c, self.execution, c.n_latent_queries, c.num_blocks, name="encoder")(context, mask)
        every = jnp.ones(latents.shape[:2], bool)
        latents = Resampler(c, self.execution, self.num_outputs, 1, name="decoder")(latents, every)
        return latents.astype(jnp.float32)
