"""Hugging Face tensor names -> this package's parameter tree, as one table per family.

Every reader (safetensors, GGUF) first produces tensors under Hugging Face names in PyTorch layout
(``nn.Linear.weight`` is ``[out, in]``); :func:`params_from_hf` then places them with the table,
stacking per-layer tensors on a leading layer axis and checking every shape against the model.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig

# (Hugging Face name, parameter path, transpose). "{i}" is the layer index.
LLAMA_TABLE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("model.embed_tokens.weight", ("embedding",), False),
    ("model.norm.weight", ("final_norm", "scale"), False),
    ("lm_head.weight", ("lm_head",), True),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm", "scale"), False),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "pre_mlp_norm", "scale"), False),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), True),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), True),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), True),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), True),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), True),
)

# Qwen3: Llama's names plus RMSNorms over each head's queries and keys.
QWEN3_TABLE = LLAMA_TABLE + (
    ("model.layers.{i}.self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), False),
    ("model.layers.{i}.self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), False),
)

# Gemma-2: four norms per layer; its `post_attention_layernorm` normalises the attention branch's output
# (Llama's of that name is the pre-MLP norm, which Gemma-2 calls `pre_feedforward_layernorm`).
_GEMMA2_NORMS = {
    "model.layers.{i}.post_attention_layernorm.weight": ("layers", "post_attn_norm", "scale"),
    "model.layers.{i}.pre_feedforward_layernorm.weight": ("layers", "pre_mlp_norm", "scale"),
    "model.layers.{i}.post_feedforward_layernorm.weight": ("layers", "post_mlp_norm", "scale"),
}
GEMMA2_TABLE = tuple(row for row in LLAMA_TABLE if row[0] not in _GEMMA2_NORMS) + tuple(
    (name, path, False) for name, path in _GEMMA2_NORMS.items()
)

TABLES = {"llama": LLAMA_TABLE, "mistral": LLAMA_TABLE, "qwen3": QWEN3_TABLE, "gemma2": GEMMA2_TABLE}

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def expected_param_shapes(config: DecoderConfig) -> dict:
    """The parameter tree's shapes (``jax.ShapeDtypeStruct`` leaves), from the model alone."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens, tokens, tokens + 1))
    return nn.unbox(shapes)["params"]


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def params_from_hf(config: DecoderConfig, tensors: Mapping[str, Callable[[], np.ndarray]], dtype=jnp.float32) -> dict:
    """Builds the parameter tree from Hugging Face-named tensors.

    Args:
      config: the decoder configuration the tensors belong to.
      tensors: name -> zero-argument loader returning the tensor in PyTorch layout (loaded lazily).
      dtype: parameter dtype.

    Raises:
      ValueError: a tensor is missing, unexpected, or has the wrong shape.
    """
    table = TABLES[config.family]
    expected = expected_param_shapes(config)
    per_layer: dict[tuple[str, ...], list] = {}
    params: dict = {}
    unexpected = []
    for name, load in tensors.items():
        for template, path, transpose in table:
            match = _template_regex(template).match(name)
            if match:
                break
        else:
            if not _IGNORED.match(name):
                unexpected.append(name)
            continue
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue
        array = np.asarray(load())
        array = array.T if transpose else array
        if match.groups():
            layer = int(match.group(1))
            if layer >= config.num_layers:
                unexpected.append(name)
                continue
            per_layer.setdefault(path, [None] * config.num_layers)[layer] = array
        else:
            _set(params, path, array)
    if unexpected:
        raise ValueError(f"unexpected tensors for a {config.family} model: {sorted(unexpected)[:10]}")
    for path, arrays in per_layer.items():
        missing = [i for i, a in enumerate(arrays) if a is None]
        if missing:
            raise ValueError(f"tensor {'/'.join(path)} is missing for layers {missing}")
        _set(params, path, np.stack(arrays))

    flat_expected = _flatten(expected)
    flat_params = _flatten(params)
    missing = sorted("/".join(p) for p in flat_expected.keys() - flat_params.keys())
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing}")
    for path, want in flat_expected.items():
        got = flat_params[path].shape
        if got != want.shape:
            raise ValueError(f"parameter {'/'.join(path)} has shape {got}, expected {want.shape} for this config")
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out
