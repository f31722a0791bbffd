"""Document chunks -> per-chunk LoRAs -> one adapter per document, as pure functions of the parameters.

A hypernetwork's variables are ``{"perceiver": ..., "head": ...}`` (its parameters, see ``perceiver.py`` and
``head.py``) and, with ``center_head_input``, ``"stats": {"input_mean": ...}`` (the head's running statistic,
which training keeps beside the parameters and no optimizer sees; :func:`split_stats`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from d2l_jax.hypernet.combine import combine_chunk_adapters
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.hypernet.encoder import context_features
from d2l_jax.hypernet.head import LoRAHead, bias_lora, pad_to_base_layers
from d2l_jax.hypernet.perceiver import Perceiver
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layout import stacked_layers
from d2l_jax.models.lora import LoRA


DEFAULT_EXECUTION = HypernetExecution()


def _modules(config: HypernetConfig, base: DecoderConfig, execution: HypernetExecution) -> tuple[Perceiver, LoRAHead]:
    per_layer_outputs = len(config.target_modules) * config.lora_rank
    num_outputs = per_layer_outputs if config.layer_to_layer else config.num_adapted(base) * per_layer_outputs
    return Perceiver(config, num_outputs, execution), LoRAHead(config, base, execution.dtype)


def init_hypernet(config: HypernetConfig, base: DecoderConfig, key) -> dict:
    """Freshly initialised hypernetwork variables (parameters and statistics), boxed with logical axis
    names (``nn.Partitioned``)."""
    config.check_base(base)
    perceiver, head = _modules(config, base, DEFAULT_EXECUTION)
    perceiver_key, head_key = jax.random.split(key)
    features = jnp.zeros((1, 1, base.hidden_size), jnp.float32)
    latents = jnp.zeros((config.num_adapted(base), 1, len(config.target_modules), config.lora_rank, config.latent_size))
    head_variables = head.init(head_key, latents)
    variables = {"perceiver": perceiver.init(perceiver_key, features, jnp.ones((1, 1), bool))["params"], "head": head_variables["params"]}
    return variables | ({"stats": head_variables["stats"]} if "stats" in head_variables else {})


def abstract_hypernet(config: HypernetConfig, base: DecoderConfig) -> dict:
    """The shapes and dtypes (ShapeDtypeStructs) of ``init_hypernet``'s unboxed variables, allocating nothing."""
    return jax.eval_shape(lambda: nn.unbox(init_hypernet(config, base, jax.random.key(0))))


# The variables that only enter matmuls, where the compute dtype is cast to anyway (Linear kernels, the
# ResMLP mixes, attention projections, the head); norms, biases, scalers, latent queries, the bias LoRA and
# statistics are used in float32.
MATMUL_WEIGHTS = ("kernel", "mix1_kernel", "mix2_kernel", "q_proj", "k_proj", "v_proj", "o_proj", "head")


def matmul_weights_in(variables: dict, dtype: str) -> dict:
    """``variables`` with their matmul weights (:data:`MATMUL_WEIGHTS`) stored in ``dtype``, for inference in
    that compute dtype: the weights are cast once instead of in every call, and the matmuls read half the
    bytes. On a CPU this is also what makes them bfloat16 at all: XLA keeps a float32 weight that is cast to
    bfloat16 inside a program in float32 (excess precision), so the adapters then differ from float32
    execution's by bfloat16's rounding instead of not at all."""
    if jnp.dtype(dtype) == jnp.float32:
        return variables
    cast = lambda path, x: x.astype(dtype) if path[-1].key in MATMUL_WEIGHTS else x
    return jax.tree_util.tree_map_with_path(cast, variables)


def split_stats(variables: dict) -> tuple[dict, dict]:
    """(parameters, statistics) of a hypernetwork's variables; the statistics are ``{}`` when it keeps none."""
    return {k: v for k, v in variables.items() if k != "stats"}, variables.get("stats", {})


def join_stats(params: dict, stats: dict) -> dict:
    """The variables of ``params`` and ``stats`` (the inverse of :func:`split_stats`)."""
    return params | ({"stats": stats} if stats else {})


def param_count(variables) -> int:
    """Parameters of a hypernetwork's variables (its statistics are not counted)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(split_stats(variables)[0])))


def layer_latents(config: HypernetConfig, base: DecoderConfig, params: dict, features, mask: Int[Array, "C T"], execution: HypernetExecution = DEFAULT_EXECUTION):
    """Perceiver latents of the chunks for the adapted layers, layer-major: ``[L, C, M, r, H]``.

    ``features`` are ``[L, C, T, F]`` in layer-to-layer mode (one Perceiver, shared by all layers, maps
    layer l's features to layer l's latents; only the adapted layers' are used) and ``[C, T, F]`` otherwise
    (one Perceiver call emits the latents of every adapted layer). In ``iterative`` mode the layers go
    through the Perceiver one at a time.
    """
    perceiver, _ = _modules(config, base, execution)
    mask = mask.astype(bool)
    run = lambda f, m: perceiver.apply({"params": stacked_layers(params["perceiver"])}, f, m)
    num_layers, modules, rank = config.num_adapted(base), len(config.target_modules), config.lora_rank
    if not config.layer_to_layer:
        latents = run(features, mask).reshape(features.shape[0], num_layers, modules, rank, -1)
        return latents.transpose(1, 0, 2, 3, 4)
    features = features[features.shape[0] - num_layers :]
    _, chunks, length, width = features.shape
    if execution.iterative:
        latents = jax.lax.map(lambda f: run(f, mask), features)
    else:
        layer_major_mask = jnp.broadcast_to(mask, (num_layers, chunks, length)).reshape(-1, length)
        latents = run(features.reshape(num_layers * chunks, length, width), layer_major_mask)
    return latents.reshape(num_layers, chunks, modules, rank, -1)


def chunk_adapters(config: HypernetConfig, base: DecoderConfig, params: dict, features, mask: Int[Array, "C T"], execution: HypernetExecution = DEFAULT_EXECUTION):
    """Per-chunk LoRAs: module -> A ``[C, L, r, d_in]`` and B ``[C, L, r, d_out]`` (float32; zero below the adapted layers)."""
    latents = layer_latents(config, base, params, features, mask, execution)
    return _pad_layers(_head_adapters(config, base, params, latents, execution), base)


def _pad_layers(adapters, base: DecoderConfig):
    """Chunk adapters of the adapted layers -> adapters of every base layer (zero below)."""
    return jax.tree.map(lambda x: pad_to_base_layers(x, base.num_layers, 1), adapters)


def _head_adapters(config: HypernetConfig, base: DecoderConfig, params: dict, latents, execution: HypernetExecution, center_on=None):
    """Latents -> chunk adapters of the adapted layers only; with ``center_on``, also the head's input mean."""
    _, head = _modules(config, base, execution)
    variables = {"params": params["head"]} | ({"stats": params["stats"]} if "stats" in params else {})
    if center_on is None:
        return head.apply(variables, latents)
    adapters, sown = head.apply(variables, latents, center_on=center_on, mutable="intermediates")
    (mean,) = sown["intermediates"]["batch_input_mean"]
    return adapters, mean


def _group_adapters(config, base, base_params, params, tokens, mask, execution, center_on=None):
    """``encode_chunks`` without the padding to every base layer (and with optional centring)."""

    def group_latents(group):
        group_tokens, group_mask = group
        features = context_features(config, base, base_params, group_tokens, group_mask)
        return layer_latents(config, base, params, features, group_mask, execution)

    groups, size = tokens.shape[:2]
    if groups == 1:
        latents = group_latents((tokens[0], mask[0]))
    else:
        shape = jax.eval_shape(group_latents, (tokens[0], mask[0]))
        skip = lambda group: jnp.zeros(shape.shape, shape.dtype)
        # The groups run the base model's layers, so they unroll as its loop over layers does.
        each = lambda _, group: (None, jax.lax.cond(group[1].any(), group_latents, skip, group))
        _, latents = jax.lax.scan(each, None, (tokens, mask), unroll=base.scan_unroll)
        latents = jnp.moveaxis(latents, 0, 1).reshape(shape.shape[0], groups * size, *shape.shape[2:])
    return _head_adapters(config, base, params, latents, execution, None if center_on is None else center_on.reshape(-1))


def encode_chunks(
    config: HypernetConfig,
    base: DecoderConfig,
    base_params: dict,
    params: dict,
    tokens: Int[Array, "G C T"],
    mask: Int[Array, "G C T"],
    execution: HypernetExecution = DEFAULT_EXECUTION,
):
    """Chunk token ids in groups -> per-chunk LoRAs ``[G * C, L, r, d]`` (zero below the adapted layers).

    The encoder and Perceiver run one group after another (so memory is bounded by the group size) and
    skip groups without a real token, whose latents are zero: a batch that puts its padding chunks last
    pays nothing for them. The head then maps every chunk's latents at once."""
    return _pad_layers(_group_adapters(config, base, base_params, params, tokens, mask, execution), base)


def document_adapters(
    config: HypernetConfig,
    base: DecoderConfig,
    base_params: dict,
    params: dict,
    tokens: Int[Array, "G C T"],
    mask: Int[Array, "G C T"],
    chunk_document: Int[Array, "C"],
    chunk_slot: Int[Array, "C"],
    num_chunks: Int[Array, "G"],
    scalers: Float[Array, "G"] | None = None,
    bias_scaler=1.0,
    execution: HypernetExecution = DEFAULT_EXECUTION,
) -> LoRA:
    """The whole path from grouped chunk ids to one combined adapter per document.

    ``chunk_document`` and ``chunk_slot`` describe the flattened chunks (see ``combine_chunk_adapters``).
    The adapters have rank ``(min(max_chunks, C) + 1) * r``: no document can have more chunks than there
    are chunk rows, so a few chunks do not pay for the full static rank. With ``center_head_input`` the
    head's inputs are centred on the stored running mean.
    """
    chunk_a, chunk_b = _group_adapters(config, base, base_params, params, tokens, mask, execution)
    return _combine(config, base, params, chunk_a, chunk_b, chunk_document, chunk_slot, num_chunks, scalers, bias_scaler)


def batch_centered_document_adapters(
    config: HypernetConfig,
    base: DecoderConfig,
    base_params: dict,
    params: dict,
    tokens: Int[Array, "G C T"],
    mask: Int[Array, "G C T"],
    chunk_document: Int[Array, "C"],
    chunk_slot: Int[Array, "C"],
    num_chunks: Int[Array, "G"],
    execution: HypernetExecution = DEFAULT_EXECUTION,
) -> tuple[LoRA, Float[Array, "L M r H"]]:
    """``document_adapters`` as training with ``center_head_input`` runs it: the head's inputs are centred on
    their mean over these documents' real chunks, which is returned with the adapters (for the running mean)."""
    center_on = (chunk_document < num_chunks.shape[0]).reshape(tokens.shape[:2])
    (chunk_a, chunk_b), mean = _group_adapters(config, base, base_params, params, tokens, mask, execution, center_on)
    return _combine(config, base, params, chunk_a, chunk_b, chunk_document, chunk_slot, num_chunks), mean


def _combine(config, base, params, chunk_a, chunk_b, chunk_document, chunk_slot, num_chunks, scalers=None, bias_scaler=1.0):
    # Combined on the adapted layers only, then padded: the training step's student slices the padding
    # off again, and XLA drops a slice of a pad, so no work or memory goes to the layers without adapters.
    bias = bias_lora(params["head"], config.target_modules) if config.use_bias else None
    adapter = combine_chunk_adapters(
        chunk_a,
        chunk_b,
        chunk_document,
        chunk_slot,
        num_chunks,
        bias,
        max_chunks=min(config.max_chunks, chunk_document.shape[0]),  # no document has more chunks than there are rows
        alpha=config.alpha,
        scalers=scalers,
        bias_scaler=bias_scaler,
    )
    return adapter.replace(A=_pad_layers(adapter.A, base), B=_pad_layers(adapter.B, base))
