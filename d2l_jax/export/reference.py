"""The reference implementation's checkpoints (SakanaAI/doc-to-lora ``pytorch_model.bin``), both ways.

A reference checkpoint is ``torch.save`` of ``ModulatedPretrainedModel.state_dict()``: the hypernetwork's
float32 tensors under PyTorch names, plus three non-tensor entries, ``base_model_name_or_path`` (str),
``hypernet_config`` (the reference's ``HypernetConfig`` data class, holding a PEFT ``LoraConfig`` and an
``AggregatorConfig``) and ``ctx_encoder_args`` (``CtxEncoderArguments``).

One table (:func:`reference_table`) maps every reference key to a parameter of this project:

  reference key (P = ``aggregator.perceiver.``)        this project                                   how
  P``modality_projection.{gate,up,down}_proj.weight``   ``perceiver/modality_projection/*/kernel``     transpose
  P``{encoder,decoder}.latents_q``                      ``perceiver/{encoder,decoder}/latents_q``      same
  P``{encoder,decoder}.layers.{i}.<norm>.weight``       ``perceiver/*/layers/<norm>/scale[i]``         layer i of a stack
  P``{encoder,decoder}.layers.{i}.self_attn.*.weight``  ``perceiver/*/layers/{q,k,v,o}_proj[i]``       transpose
  P``{encoder,decoder}.layers.{i}.mlp.*.weight``        ``perceiver/*/layers/mlp/*/kernel[i]``         transpose
  P``{encoder,decoder}.layernorm.weight``               ``perceiver/*/norm/scale``                     same
  ``layers.{j}.layers.{0,4}.{weight,bias}``             ``head/pre_head_{j}/norm_{in,out}/{scale,bias}`` same
  ``layers.{j}.layers.{1,3}.weight`` / ``.bias``         ``head/pre_head_{j}/mix{1,2}_kernel`` / ``_bias`` same / [1,L,1,1,d] -> [L,d]
  ``layers.{j}.mlp.{0,6}.*``, ``.mlp.{2,5}.*``          ``head/pre_head_{j}/norm_*``, ``linear{1,2}/*`` (shared ResMLP; kernels transposed)
  ``{bias_A,bias_B}.<module>``                          ``head/{bias_A,bias_B}_<module>``              same
  ``{scaler_A,scaler_B}.<module>``                      ``head/{scaler_A,scaler_B}_<module>``          [1,L,r,1] -> [L,r]
  ``head.weight``                                       ``head/head``                                  same

The norms are ``input_latents_layernorm``, ``input_context_layernorm``, ``post_attention_layernorm``,
``pre_ff_layernorm`` and ``post_ff_layernorm`` (here ``*_norm``). Our attention folds the context norm's
weight into the key and value kernels at run time, so the stored weights correspond one to one.

What the reference cannot express (:func:`check_expressible`): this project's additions that change the
function or the parameters (``adapted_layers``, ``per_rank_head``, ``shared_a``, ``center_head_input``, a
non-default ``l2_eps``) and a Perceiver attention other than the reference's fixed one (16 heads of 128,
4 key/value heads, MLP factor 4, RMSNorm eps 1e-6). ``b_init`` only chooses an initialisation and
exports; chunking (``max_chunk_len``, ``max_chunks``) lives in the reference's ``args.yaml``, not here.

The pickle lacks the chunking fields; the reference's training writes them to ``args.yaml`` in the run
directory (``<run>/args.yaml`` beside ``<run>/checkpoint-<step>/pytorch_model.bin``), a ``yaml.dump`` of
all its argument data classes. :func:`read_run_args` reads it without constructing anything it names,
and :func:`config_changes_from_run_args` takes from it:

  args.yaml (CtxTrainingArguments)    this project          how
  ``max_ctx_chunk_len``               ``max_chunk_len``     as is when > 0; else what the reference's train.py
                                                            uses: ``max_ctx_len`` if > 0, else the base
                                                            model's ``max_position_embeddings``
  ``max_ctx_chunk_num``               ``max_chunks``        as is when set (> 0)

The reference bounds a chunk's piece of the document before adding the chat affixes; here
``max_chunk_len`` counts the affixes too, so a document near the limit may split into one more chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from d2l_jax.export import torch_checkpoint
from d2l_jax.hypernet.config import ADDITIONS, HypernetConfig
from d2l_jax.hypernet.hypernet import abstract_hypernet
from d2l_jax.models.families import DecoderConfig
from d2l_jax.train.checkpoint import CheckpointMismatchError

PERCEIVER = "aggregator.perceiver."
EXTRA_ENTRIES = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")
COMPILED_PREFIX = "_orig_mod."  # torch.compile's; the reference strips it on load

# The reference's Perceiver attention is fixed (Idefics2PerceiverConfig defaults, reference-facts §2.1).
REFERENCE_PERCEIVER = {"num_heads": 16, "head_dim": 128, "num_kv_heads": 4, "intermediate_factor": 4, "rms_norm_eps": 1e-6}
_DEFAULTS = HypernetConfig()
# Additions that change the function or the parameter tree (b_init only chooses an initialisation).
_INEXPRESSIBLE = tuple(f for f in ADDITIONS if f != "b_init")

# Hub ids of the base models this project knows by a short name (what the reference's get_model loads).
HUB_NAMES = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "mistral-7b-instruct-v0.2": "mistralai/Mistral-7B-Instruct-v0.2",
}

_REFERENCE_CLASSES = (
    "ctx_to_lora.modeling.hypernet.HypernetConfig",
    "ctx_to_lora.modeling.aggregator.AggregatorConfig",
    "ctx_to_lora.configs.CtxEncoderArguments",
)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = (
    ("input_latents_layernorm", "input_latents_norm"),
    ("input_context_layernorm", "input_context_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_ff_layernorm", "pre_ff_norm"),
    ("post_ff_layernorm", "post_ff_norm"),
)
_MLP = ("gate_proj", "up_proj", "down_proj")

RUN_ARGS_FILE = "args.yaml"
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")  # the HF Trainer's checkpoint folders


class ReferenceFormatError(ValueError):
    """A reference checkpoint is inconsistent (missing, extra or misshapen keys, bad config fields), or a
    hypernetwork uses a field the reference cannot express (the message names it)."""


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One reference tensor and where it lives here.

    path: this project's parameter path; ``index``: the row of a stacked (scanned) parameter, or None.
    transpose: PyTorch ``nn.Linear`` weight ``[out, in]`` vs a kernel ``[in, out]``; otherwise the two
    differ at most by singleton axes (a reshape).
    """

    key: str
    path: tuple[str, ...]
    index: int | None
    transpose: bool
    reference_shape: tuple[int, ...]
    shape: tuple[int, ...]

    def to_reference(self, x: np.ndarray) -> np.ndarray:
        x = x if self.index is None else x[self.index]
        return np.ascontiguousarray((x.T if self.transpose else x).reshape(self.reference_shape))

    def from_reference(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T if self.transpose else x.reshape(self.shape))


def check_expressible(config: HypernetConfig) -> None:
    """Raises ReferenceFormatError naming the first field of ``config`` the reference cannot express."""
    for name in _INEXPRESSIBLE:
        if getattr(config, name) != getattr(_DEFAULTS, name):
            raise ReferenceFormatError(
                f"HypernetConfig.{name}={getattr(config, name)!r} is this project's addition and the reference cannot express it "
                f"(only {name}={getattr(_DEFAULTS, name)!r} exports)"
            )
    for name, value in REFERENCE_PERCEIVER.items():
        if getattr(config, name) != value:
            raise ReferenceFormatError(f"HypernetConfig.{name}={getattr(config, name)!r}: the reference's Perceiver fixes {name}={value!r}")


def reference_table(config: HypernetConfig, base: DecoderConfig) -> list[KeyMapping]:
    """Every tensor key of the reference's checkpoint for ``config`` on ``base``, in the reference's
    ``state_dict`` order, with its shape and where it lives here.

    Raises ReferenceFormatError when ``config`` is not expressible (:func:`check_expressible`).
    """
    check_expressible(config)
    tree = abstract_hypernet(config, base)
    rows: list[KeyMapping] = []

    def add(key, path, index=None, transpose=False, reference_shape=None):
        leaf = tree
        for part in path:
            leaf = leaf[part]
        shape = tuple(leaf.shape[1:] if index is not None else leaf.shape)
        if reference_shape is None:
            reference_shape = shape[::-1] if transpose else shape
        if math.prod(reference_shape) != math.prod(shape):
            raise AssertionError(f"{key}: {reference_shape} vs {shape}")
        rows.append(KeyMapping(key, tuple(path), index, transpose, tuple(reference_shape), shape))

    for proj in _MLP:
        add(f"{PERCEIVER}modality_projection.{proj}.weight", ("perceiver", "modality_projection", proj, "kernel"), transpose=True)
    for part, blocks in (("encoder", config.num_blocks), ("decoder", 1)):
        add(f"{PERCEIVER}{part}.latents_q", ("perceiver", part, "latents_q"))
        for i in range(blocks):
            prefix, layers = f"{PERCEIVER}{part}.layers.{i}.", ("perceiver", part, "layers")
            for theirs, ours in _NORMS[:2]:
                add(f"{prefix}{theirs}.weight", (*layers, ours, "scale"), i)
            for proj in _ATTENTION:
                add(f"{prefix}self_attn.{proj}.weight", (*layers, proj), i, transpose=True)
            for theirs, ours in _NORMS[2:]:
                add(f"{prefix}{theirs}.weight", (*layers, ours, "scale"), i)
            for proj in _MLP:
                add(f"{prefix}mlp.{proj}.weight", (*layers, "mlp", proj, "kernel"), i, transpose=True)
        add(f"{PERCEIVER}{part}.layernorm.weight", ("perceiver", part, "norm", "scale"))

    num_layers, rank = base.num_layers, config.lora_rank
    for j in range(config.num_pre_head_layers):
        block = ("head", f"pre_head_{j}")
        if config.per_layer_processing:
            prefix = f"layers.{j}.layers."
            add(f"{prefix}0.weight", (*block, "norm_in", "scale"))
            add(f"{prefix}0.bias", (*block, "norm_in", "bias"))
            add(f"{prefix}1.weight", (*block, "mix1_kernel"))
            add(f"{prefix}1.bias", (*block, "mix1_bias"), reference_shape=(1, num_layers, 1, 1, 4 * config.latent_size))
            add(f"{prefix}3.weight", (*block, "mix2_kernel"))
            add(f"{prefix}3.bias", (*block, "mix2_bias"), reference_shape=(1, num_layers, 1, 1, config.latent_size))
            add(f"{prefix}4.weight", (*block, "norm_out", "scale"))
            add(f"{prefix}4.bias", (*block, "norm_out", "bias"))
        else:  # nn.Sequential(LN, Dropout, Linear, SiLU, Dropout, Linear, LN)
            prefix = f"layers.{j}.mlp."
            add(f"{prefix}0.weight", (*block, "norm_in", "scale"))
            add(f"{prefix}0.bias", (*block, "norm_in", "bias"))
            add(f"{prefix}2.weight", (*block, "linear1", "kernel"), transpose=True)
            add(f"{prefix}2.bias", (*block, "linear1", "bias"))
            add(f"{prefix}5.weight", (*block, "linear2", "kernel"), transpose=True)
            add(f"{prefix}5.bias", (*block, "linear2", "bias"))
            add(f"{prefix}6.weight", (*block, "norm_out", "scale"))
            add(f"{prefix}6.bias", (*block, "norm_out", "bias"))
    for name in ("bias_A", "bias_B"):
        for m in config.target_modules:
            add(f"{name}.{m}", ("head", f"{name}_{m}"))
    for name in ("scaler_A", "scaler_B"):
        for m in config.target_modules:
            add(f"{name}.{m}", ("head", f"{name}_{m}"), reference_shape=(1, num_layers, rank, 1))
    add("head.weight", ("head", "head"))
    return rows


# ---------------------------------------------------------------------------------------------------
# Configs


def _base_key(name: str) -> str:
    """A base model's name as compared across frameworks: the last path component, lower-cased, without .gguf."""
    last = Path(str(name).rstrip("/")).name.lower()
    return last[: -len(".gguf")] if last.endswith(".gguf") else last


def reference_entries(config: HypernetConfig, base: DecoderConfig, base_name: str) -> dict[str, Any]:
    """The three non-tensor entries of a reference checkpoint for ``config`` on ``base``, as plain field
    dicts: ``{"base_model_name_or_path": str, "hypernet_config": {...}, "ctx_encoder_args": {...}}``, where
    ``hypernet_config["lora_config"]`` holds the LoraConfig's arguments and ``["aggregator_config"]`` a dict.

    Raises ReferenceFormatError when ``config`` is not expressible.
    """
    check_expressible(config)
    shapes = base.projection_shapes()
    modules = config.target_modules
    aggregator = dict(
        aggregator_type="perceiver",
        num_layers=base.num_layers,
        num_modules=len(modules),
        num_extra_modules=0,
        output_size=config.latent_size,
        feature_size=base.hidden_size,
        pooling_type="mean",
        num_latent_factor=8,
        lora_r=config.lora_rank,
        per_rank_gen=True,
        n_latent_queries=config.n_latent_queries,
        num_blocks=config.num_blocks,
        num_self_attn_per_block=0,
        shared_weights=False,
        layer_to_layer_ctx_encoder=config.layer_to_layer,
    )
    hypernet = dict(
        latent_size=config.latent_size,
        use_light_weight_lora=False,
        light_weight_latent_size=128,
        per_rank_gen=True,
        use_per_rank_bias=False,
        use_bias=config.use_bias,
        per_layer_processing=config.per_layer_processing,
        use_token_mixing=False,
        num_pre_head_layers=config.num_pre_head_layers,
        dropout_rate=0.0,
        lora_config=dict(r=config.lora_rank, lora_alpha=config.alpha, target_modules=set(modules), lora_dropout=0.0, task_type="CAUSAL_LM"),
        extra_modules=None,
        base_hidden_size=base.hidden_size,
        layer_indices=np.arange(base.num_layers, dtype=np.int64),
        feature_sizes=({m: shapes[m][0] for m in modules}, {m: shapes[m][1] for m in modules}),
        aggregator_config=aggregator,
    )
    ctx_encoder = dict(
        ctx_encoder_model_name_or_path=None,
        ctx_encoder_type=config.encoder_type,
        layer_idx=config.exit_layer(base),
        quantize_ctx_encoder=False,  # this project encodes unquantised
        ctx_encoder_last_layer=None,
    )
    return {"base_model_name_or_path": base_name, "hypernet_config": hypernet, "ctx_encoder_args": ctx_encoder}


def _fields(obj, what: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, torch_checkpoint.Record):
        return vars(obj)
    raise ReferenceFormatError(f"{what} must be a data-class instance, got {type(obj).__name__}")


def config_from_reference(entries: dict[str, Any], base: DecoderConfig, base_name: str, source: str = "checkpoint") -> HypernetConfig:
    """This project's HypernetConfig for a reference checkpoint's three non-tensor entries (records or dicts).

    Checks the checkpoint against ``base`` (named ``base_name``): raises CheckpointMismatchError naming the
    checkpoint's base model when its name (compared by last path component, case-insensitively), layer
    count, hidden size or projection shapes differ; ReferenceFormatError naming the field for a missing
    field or a setting this project does not implement (a separate context-encoder model, self-attention
    in the Perceiver, shared Perceiver blocks, extra modules, ``per_rank_gen=False``, a LoRA alpha other
    than ``2 r^1.5``).
    """
    missing = [k for k in EXTRA_ENTRIES if k not in entries]
    if missing:
        raise ReferenceFormatError(f"{source}: lacks the entries {missing} of a reference checkpoint")
    name = entries["base_model_name_or_path"]
    if not isinstance(name, str):
        raise ReferenceFormatError(f"{source}: base_model_name_or_path must be a str, got {type(name).__name__}")
    hyper = _fields(entries["hypernet_config"], "hypernet_config")
    ctx = _fields(entries["ctx_encoder_args"], "ctx_encoder_args")

    def field(fields, key, what, default=dataclasses.MISSING):
        if key in fields and fields[key] is not None:
            return fields[key]
        if default is not dataclasses.MISSING:
            return default
        raise ReferenceFormatError(f"{source}: {what}.{key} is missing")

    lora = _fields(field(hyper, "lora_config", "hypernet_config"), "hypernet_config.lora_config")
    aggregator = _fields(field(hyper, "aggregator_config", "hypernet_config"), "hypernet_config.aggregator_config")

    def mismatch(what, theirs, ours):
        return CheckpointMismatchError(
            f"{source} was trained on base model {name!r} ({what} {theirs}), which differs from the given {base_name!r} ({what} {ours})"
        )

    if _base_key(name) != _base_key(base_name):
        raise CheckpointMismatchError(f"{source} was trained on base model {name!r}, not the given {base_name!r}")
    layer_indices = np.asarray(field(hyper, "layer_indices", "hypernet_config"))
    if layer_indices.shape != (base.num_layers,) or not np.array_equal(layer_indices, np.arange(base.num_layers)):
        raise mismatch("layer_indices", f"of length {layer_indices.size}", f"of {base.num_layers} layers")
    if field(hyper, "base_hidden_size", "hypernet_config") != base.hidden_size:
        raise mismatch("base_hidden_size", hyper["base_hidden_size"], base.hidden_size)
    if field(aggregator, "num_layers", "aggregator_config") != base.num_layers:
        raise mismatch("aggregator_config.num_layers", aggregator["num_layers"], base.num_layers)

    if field(ctx, "ctx_encoder_model_name_or_path", "ctx_encoder_args", None) is not None:
        raise ReferenceFormatError(
            f"{source}: ctx_encoder_args.ctx_encoder_model_name_or_path={ctx['ctx_encoder_model_name_or_path']!r}: a context encoder "
            "other than the base model is not implemented here"
        )
    if field(aggregator, "feature_size", "aggregator_config") != base.hidden_size:
        raise mismatch("aggregator_config.feature_size", aggregator["feature_size"], base.hidden_size)
    checks = [
        (aggregator, "aggregator_type", "aggregator_config", "perceiver"),
        (aggregator, "num_self_attn_per_block", "aggregator_config", 0),
        (aggregator, "shared_weights", "aggregator_config", False),
        (aggregator, "num_extra_modules", "aggregator_config", 0),
        (aggregator, "per_rank_gen", "aggregator_config", True),
        (hyper, "per_rank_gen", "hypernet_config", True),
    ]
    for fields, key, what, expected in checks:
        if field(fields, key, what) != expected:
            raise ReferenceFormatError(f"{source}: {what}.{key}={fields[key]!r} is not implemented here (only {expected!r})")
    if field(hyper, "extra_modules", "hypernet_config", None):
        raise ReferenceFormatError(f"{source}: hypernet_config.extra_modules={hyper['extra_modules']!r} is not implemented here")

    rank = int(field(lora, "r", "lora_config"))
    modules = field(lora, "target_modules", "lora_config")
    modules = tuple(sorted([modules] if isinstance(modules, str) else modules))
    alpha = float(field(lora, "lora_alpha", "lora_config"))
    if not math.isclose(alpha, 2.0 * rank**1.5, rel_tol=1e-6):
        raise ReferenceFormatError(f"{source}: lora_config.lora_alpha={alpha} for r={rank}; this project's scaling is 2 r^1.5 = {2.0 * rank**1.5}")
    for key, expected in (("lora_r", rank), ("num_modules", len(modules)), ("output_size", field(hyper, "latent_size", "hypernet_config"))):
        if field(aggregator, key, "aggregator_config") != expected:
            raise ReferenceFormatError(f"{source}: aggregator_config.{key}={aggregator[key]!r} disagrees with the hypernet config ({expected!r})")
    shapes = base.projection_shapes()
    unknown = [m for m in modules if m not in shapes]
    if unknown:
        raise ReferenceFormatError(f"{source}: lora_config.target_modules {unknown} are not projections of {base_name!r}")
    d_in, d_out = field(hyper, "feature_sizes", "hypernet_config")
    for m in modules:
        if (d_in.get(m), d_out.get(m)) != shapes[m]:
            raise mismatch(f"feature_sizes[{m!r}]", (d_in.get(m), d_out.get(m)), shapes[m])

    encoder_type = str(field(ctx, "ctx_encoder_type", "ctx_encoder_args"))
    layer_to_layer = bool(field(aggregator, "layer_to_layer_ctx_encoder", "aggregator_config"))
    if layer_to_layer != (encoder_type == "per_layer_activations"):
        raise ReferenceFormatError(
            f"{source}: aggregator_config.layer_to_layer_ctx_encoder={layer_to_layer} disagrees with ctx_encoder_type={encoder_type!r}"
        )
    last_layer = field(ctx, "ctx_encoder_last_layer", "ctx_encoder_args", None)
    if encoder_type == "per_layer_activations" and last_layer not in (None, base.num_layers):
        raise ReferenceFormatError(f"{source}: ctx_encoder_args.ctx_encoder_last_layer={last_layer} is not implemented here (only None)")
    early_exit_layer = None
    if encoder_type == "early_exit":
        layer_idx = field(ctx, "layer_idx", "ctx_encoder_args", None)
        # The reference's default is num_layers // 4, which is this project's default (None) as well.
        early_exit_layer = None if layer_idx in (None, base.num_layers // 4) else int(layer_idx)
    try:
        return HypernetConfig(
            encoder_type=encoder_type,
            early_exit_layer=early_exit_layer,
            latent_size=int(field(hyper, "latent_size", "hypernet_config")),
            n_latent_queries=int(field(aggregator, "n_latent_queries", "aggregator_config")),
            num_blocks=int(field(aggregator, "num_blocks", "aggregator_config")),
            lora_rank=rank,
            target_modules=modules,
            # The reference backfills these three for old checkpoints.
            num_pre_head_layers=int(field(hyper, "num_pre_head_layers", "hypernet_config", 4)),
            per_layer_processing=bool(field(hyper, "per_layer_processing", "hypernet_config")),
            use_bias=bool(field(hyper, "use_bias", "hypernet_config", True)),
            **REFERENCE_PERCEIVER,
        )
    except ValueError as error:
        raise ReferenceFormatError(f"{source}: {error}") from error


# ---------------------------------------------------------------------------------------------------
# The run's args.yaml


@dataclasses.dataclass(frozen=True)
class OpaqueValue:
    """A value of args.yaml written with a Python tag (``!!python/object/apply:...``: the reference dumps
    str enums such as ``exp_setup`` and the Trainer's strategies that way), kept as its tag and plain data;
    the class it names is never imported."""

    tag: str
    value: Any


class _RunArgsLoader(yaml.SafeLoader):
    """YAML's safe loader, plus Python-tagged nodes read as :class:`OpaqueValue` (plain data inside)."""


def _opaque(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return tuple(value) if suffix == "tuple" else OpaqueValue(f"python/{suffix}", value)


_RunArgsLoader.add_multi_constructor("tag:yaml.org,2002:python/", _opaque)


def run_args_path(checkpoint: str | Path) -> Path | None:
    """The ``args.yaml`` the reference's training wrote for the checkpoint file ``checkpoint``: ``<run>/args.yaml``
    for ``<run>/checkpoint-<step>/pytorch_model.bin``, or None when the file is not in such a folder or the
    run directory has none."""
    folder = Path(checkpoint).parent
    candidate = folder.parent / RUN_ARGS_FILE
    return candidate if _CHECKPOINT_DIR.fullmatch(folder.name) and candidate.is_file() else None


def read_run_args(path: str | Path) -> dict[str, Any]:
    """The fields of a reference run's ``args.yaml`` as a dict. Values the reference dumped with a Python tag
    come back as :class:`OpaqueValue`; nothing is imported or run. Raises ReferenceFormatError naming the file
    when it is not YAML or not a mapping of field names, FileNotFoundError when it does not exist."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        values = yaml.load(text, Loader=_RunArgsLoader)  # a SafeLoader: tagged values stay data
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())[:300]
        raise ReferenceFormatError(f"{path}: not a readable args.yaml ({type(error).__name__}: {detail})") from error
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ReferenceFormatError(f"{path}: an args.yaml must be a mapping of argument names to values, got {type(values).__name__}")
    return values


def config_changes_from_run_args(args: dict[str, Any], base: DecoderConfig, source: str = RUN_ARGS_FILE) -> dict[str, int]:
    """The HypernetConfig fields a reference run's arguments (``read_run_args``) give for a checkpoint on
    ``base``: ``max_chunk_len`` and ``max_chunks`` (see the module docstring). Fields absent from ``args``
    give nothing. Raises ReferenceFormatError naming ``source`` and the field when a value is not an integer."""

    def integer(key):
        value = args.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReferenceFormatError(f"{source}: {key}={value!r} must be an integer")
        return value

    changes = {}
    chunk_len, ctx_len = integer("max_ctx_chunk_len"), integer("max_ctx_len")
    if chunk_len is not None:
        # train.py: a chunk length <= 0 means the context limit, which defaults to the context encoder's.
        changes["max_chunk_len"] = chunk_len if chunk_len > 0 else ctx_len if ctx_len and ctx_len > 0 else base.max_position_embeddings
    chunks = integer("max_ctx_chunk_num")
    if chunks is not None and chunks > 0:
        changes["max_chunks"] = chunks
    return changes


# ---------------------------------------------------------------------------------------------------
# Files


def read_reference_checkpoint(
    path: str | Path, base: DecoderConfig, base_name: str, run_args: str | Path | None = None, **config_changes: Any
) -> tuple[HypernetConfig, dict]:
    """(config, parameters) of a reference ``pytorch_model.bin`` for the base model ``base`` named ``base_name``.

    The file is read by the restricted unpickler (``torch_checkpoint.load``). Every tensor is placed
    through :func:`reference_table`; the parameters are float32 jax arrays in this project's tree
    (``D2L.create(...).params``). The fields the checkpoint does not hold (``max_chunk_len``, ``max_chunks``)
    come from the run's ``args.yaml`` (``run_args``; by default the one the reference's training wrote one
    directory above ``checkpoint-<step>/``, when present; :func:`config_changes_from_run_args`), then from
    ``config_changes``, which win.

    Raises UnsafeCheckpointError for a pickle naming anything outside the allow-list (nothing runs),
    TorchCheckpointError for an unreadable file, CheckpointMismatchError for another base model,
    ReferenceFormatError naming the key for a missing or unexpected key or a shape other than the
    table's, naming the field for a configuration this project does not implement, and naming the
    args.yaml for one that is malformed or belongs to a run on another base model.
    """
    path = Path(path)
    state = torch_checkpoint.load(path)
    if not isinstance(state, dict):
        raise ReferenceFormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = dict(state)
    entries = {k: state.pop(k) for k in EXTRA_ENTRIES if k in state}
    config = config_from_reference(entries, base, base_name, str(path))
    args_file = Path(run_args) if run_args is not None else run_args_path(path)
    if args_file is not None:
        args = read_run_args(args_file)
        trained_on = args.get("model_name_or_path")
        if isinstance(trained_on, str) and _base_key(trained_on) != _base_key(entries["base_model_name_or_path"]):
            raise ReferenceFormatError(
                f"{args_file}: model_name_or_path={trained_on!r}, but {path} was trained on {entries['base_model_name_or_path']!r}; "
                "the args.yaml belongs to another run"
            )
        config_changes = {**config_changes_from_run_args(args, base, str(args_file)), **config_changes}
    if config_changes:
        try:
            config = config.replace(**config_changes)
        except (TypeError, ValueError) as error:
            raise ReferenceFormatError(f"config_changes {config_changes}: {error}") from error
    tensors = {(k[len(COMPILED_PREFIX) :] if k.startswith(COMPILED_PREFIX) else k): v for k, v in state.items()}
    table = reference_table(config, base)
    expected = {row.key for row in table}
    missing, extra = [r.key for r in table if r.key not in tensors], sorted(set(tensors) - expected)
    if missing or extra:
        raise ReferenceFormatError(f"{path}: keys missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for row in table:
        value = tensors[row.key]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ReferenceFormatError(f"{path}: {row.key} must be a floating-point tensor, got {getattr(value, 'dtype', type(value).__name__)}")
        if tuple(value.shape) != row.reference_shape:
            raise ReferenceFormatError(f"{path}: {row.key} has shape {tuple(value.shape)}, expected {row.reference_shape} for its config")
        value = row.from_reference(value.astype(np.float32))
        if row.index is None:
            flat[row.path] = value
        else:
            stacks.setdefault(row.path, {})[row.index] = value
    for key, rows in stacks.items():
        flat[key] = np.stack([rows[i] for i in range(len(rows))])
    params: dict = {}
    for key, value in flat.items():
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = jnp.asarray(value)
    abstract = abstract_hypernet(config, base)
    if jax.tree.structure(abstract) != jax.tree.structure(params):  # the table covers the whole tree
        raise AssertionError(f"reference table does not cover the parameter tree: {jax.tree.structure(abstract)} vs {jax.tree.structure(params)}")
    return config, params


def write_reference_checkpoint(path: str | Path, config: HypernetConfig, base: DecoderConfig, params: dict, base_name: str) -> Path:
    """Writes ``params`` (this project's tree for ``config`` on ``base``) as the reference's ``pytorch_model.bin``:
    float32 tensors under the reference's keys and shapes in its order, then the three non-tensor entries
    pickled with the reference's class paths (``ctx_to_lora.modeling.hypernet.HypernetConfig`` ...) and a real
    PEFT ``LoraConfig``, so ``ModulatedPretrainedModel.from_state_dict(torch.load(path, weights_only=False))`` loads it.
    ``path`` may be a directory (the file is then ``path/pytorch_model.bin``). Needs torch and peft.

    Raises ReferenceFormatError naming the field when ``config`` is not expressible, or a parameter whose
    shape is not the table's. Returns the file written.
    """
    import peft
    import torch

    table = reference_table(config, base)
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "pytorch_model.bin"
    state: dict[str, Any] = collections.OrderedDict()  # as Module.state_dict() returns it
    for row in table:
        leaf = params
        for part in row.path:
            leaf = leaf[part]
        leaf = np.asarray(jax.device_get(leaf), np.float32)
        if leaf.shape[int(row.index is not None) :] != row.shape:
            raise ReferenceFormatError(f"parameter {'/'.join(row.path)} has shape {leaf.shape}, expected {row.shape} for its config")
        state[row.key] = torch.from_numpy(row.to_reference(leaf).copy())
    entries = reference_entries(config, base, base_name)
    hyper = dict(entries["hypernet_config"])
    hyper["lora_config"] = peft.LoraConfig(**hyper["lora_config"])
    hyper["layer_indices"] = torch.from_numpy(hyper["layer_indices"])
    with torch_checkpoint.importable(_REFERENCE_CLASSES) as classes:
        hyper["aggregator_config"] = torch_checkpoint.instance(classes[_REFERENCE_CLASSES[1]], hyper["aggregator_config"])
        state["base_model_name_or_path"] = entries["base_model_name_or_path"]
        state["hypernet_config"] = torch_checkpoint.instance(classes[_REFERENCE_CLASSES[0]], hyper)
        state["ctx_encoder_args"] = torch_checkpoint.instance(classes[_REFERENCE_CLASSES[2]], entries["ctx_encoder_args"])
        return torch_checkpoint.save(state, path)


def hub_name(name: str) -> str:
    """The Hugging Face id the reference loads for a base model this project names ``name`` (else ``name``)."""
    return HUB_NAMES.get(str(name), str(name))
