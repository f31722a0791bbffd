"""Hypernetwork configuration: what a checkpoint is (``HypernetConfig``, defaults = the reference's main
experiment) and how it runs (``HypernetExecution``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import TARGET_MODULES, lora_alpha

ENCODER_TYPES = ("per_layer_activations", "early_exit", "embed_only")
B_INITS = ("zero_scaler", "zero_head")
DTYPES = ("float32", "bfloat16")


# Fields of HypernetConfig that this project adds to the reference; each is off (the reference's behaviour) by default.
ADDITIONS = ("per_rank_head", "b_init", "shared_a", "center_head_input", "adapted_layers", "l2_eps")
# Execution fields that older checkpoints stored inside their hypernet config (now HypernetExecution's).
_LEGACY_EXECUTION_FIELDS = ("chunk_group_size", "iterative", "dtype", "scan_unroll")


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
    """What a trained hypernetwork is: the fields that define its weights and what they compute (saved with
    a checkpoint and checked on load). How it runs is :class:`HypernetExecution`.

    Context encoder:
      encoder_type: ``per_layer_activations`` (one feature set per base layer, the Perceiver maps layer l's
        features to layer l's adapter), ``early_exit`` (final-normed output of layer ``early_exit_layer``)
        or ``embed_only`` (scaled token embeddings).
      early_exit_layer: defaults to ``num_layers // 4`` of the base model.
    Perceiver: ``latent_size`` (H), ``n_latent_queries`` encoder latents, ``num_blocks`` cross-attention
      layers, attention with ``num_heads`` x ``head_dim`` queries and ``num_kv_heads`` key/value heads,
      MLPs ``intermediate_factor`` x wider, RMSNorm ``rms_norm_eps``.
    Head: ``num_pre_head_layers`` ResMLP blocks (per layer if ``per_layer_processing``), L2 normalisation,
      a per-layer linear head to every target module's ``d_in + d_out``, generating rank ``lora_rank``
      adapters for ``target_modules``; ``use_bias`` appends a learned context-independent "bias LoRA".
    Chunking: templated documents are split into chunks of at most ``max_chunk_len`` tokens (chat affixes
      included; the reference bounds the pieces before re-wrapping them). One pass combines at most
      ``max_chunks`` chunks (adapter rank at most ``(max_chunks + 1) * lora_rank``, the static rank of
      training); ``D2L.internalize`` takes longer documents segment by segment.

    This project's additions (:data:`ADDITIONS`, all off by default, i.e. the reference):
      adapted_layers: adapters for the last that many base layers only (0: every layer); the other layers
        get zero rows, so adapters keep the base model's layer count, and a training step runs them outside
        the gradient.
      per_rank_head: every rank gets its own head weights (the reference shares one head across ranks, so a
        rank differs from another only through its latent).
      b_init: how a fresh hypernetwork generates ``B = 0``: ``zero_scaler`` (the reference: ``scaler_B``
        zeros and a random head) or ``zero_head`` (``scaler_B`` ones and the head's B weights zero, so those
        weights get gradients from the first step, as a plain LoRA's B does).
      shared_a: every chunk's A is one learned matrix per layer and rank, independent of the document (the
        head then emits B only): the document is written into B alone.
      center_head_input: the head's inputs are centred on a running mean over training documents (kept by
        the train step beside the parameters, as batch normalisation's statistics are) before the L2 norm;
        a document's own part of the latents is otherwise a small fraction of them.
      l2_eps: guards the L2 normalisation at the zero vector (the reference divides by the bare norm).
    """

    # The reference's fields.
    encoder_type: str = "per_layer_activations"
    early_exit_layer: int | None = None
    latent_size: int = 512
    n_latent_queries: int = 8
    num_blocks: int = 9
    num_heads: int = 16
    head_dim: int = 128
    num_kv_heads: int = 4
    intermediate_factor: int = 4
    rms_norm_eps: float = 1e-6
    lora_rank: int = 8
    target_modules: tuple[str, ...] = ("down_proj",)
    num_pre_head_layers: int = 1
    per_layer_processing: bool = True
    use_bias: bool = True
    max_chunk_len: int = 1024
    max_chunks: int = 64
    # This project's additions (ADDITIONS).
    adapted_layers: int = 0
    per_rank_head: bool = False
    b_init: str = "zero_scaler"
    shared_a: bool = False
    center_head_input: bool = False
    l2_eps: float = 1e-12

    def __post_init__(self):
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type={self.encoder_type!r}; expected one of {ENCODER_TYPES}")
        unknown = set(self.target_modules) - set(TARGET_MODULES)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; known: {TARGET_MODULES}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        for name in ("latent_size", "n_latent_queries", "num_blocks", "lora_rank", "max_chunk_len", "max_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.b_init not in B_INITS:
            raise ValueError(f"b_init={self.b_init!r}; expected one of {B_INITS}")
        if self.adapted_layers < 0:
            raise ValueError(f"adapted_layers must be >= 0 (0: every layer), got {self.adapted_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    def replace(self, **changes: Any) -> "HypernetConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> tuple["HypernetConfig", dict[str, Any]]:
        """(the config, the execution fields found among ``values``): checkpoints written before the split
        stored ``dtype``, ``scan_unroll``, ``iterative`` and ``chunk_group_size`` here."""
        tuples = lambda x: tuple(tuples(v) for v in x) if isinstance(x, list) else x
        fields = {k: tuples(v) for k, v in values.items() if k not in _LEGACY_EXECUTION_FIELDS}
        return cls(**fields), {k: v for k, v in values.items() if k in _LEGACY_EXECUTION_FIELDS}

    @property
    def layer_to_layer(self) -> bool:
        return self.encoder_type == "per_layer_activations"

    @property
    def alpha(self) -> float:
        return lora_alpha(self.lora_rank)

    def exit_layer(self, base: DecoderConfig) -> int:
        return self.early_exit_layer if self.early_exit_layer is not None else base.num_layers // 4

    def num_adapted(self, base: DecoderConfig) -> int:
        """How many (final) base layers receive generated adapters."""
        return self.adapted_layers or base.num_layers

    def check_base(self, base: DecoderConfig) -> None:
        """Raises ValueError if this hypernetwork cannot drive ``base``."""
        if self.num_adapted(base) > base.num_layers:
            raise ValueError(f"adapted_layers={self.adapted_layers} exceeds the base model's {base.num_layers} layers")
        if self.encoder_type == "early_exit" and not 1 <= self.exit_layer(base) <= base.num_layers:
            raise ValueError(f"early_exit_layer={self.exit_layer(base)} outside 1..{base.num_layers}")
        if self.layer_to_layer and base.num_layers < 2:
            raise ValueError("per_layer_activations needs a base model with at least 2 layers")

    @classmethod
    def niah(cls, **changes: Any) -> "HypernetConfig":
        """The reference's NIAH experiment: early exit, 208 latents, 8 blocks."""
        return cls(**{"encoder_type": "early_exit", "n_latent_queries": 208, "num_blocks": 8, **changes})

    @classmethod
    def niah_cpu(cls, **changes: Any) -> "HypernetConfig":
        """The NIAH hypernetwork that trains on a CPU (``experiments/niah_smollm2.py``; results/niah_smollm2/):
        a narrow, shallow early-exit Perceiver reading 64-token chunks, adapters on the last 4 layers, one
        head per rank, A shared by documents, centred head inputs."""
        defaults = dict(
            encoder_type="early_exit",
            latent_size=256,
            n_latent_queries=32,
            num_blocks=2,
            num_heads=4,
            head_dim=64,
            num_kv_heads=2,
            max_chunk_len=64,
            max_chunks=8,
            adapted_layers=4,
            per_rank_head=True,
            b_init="zero_head",
            shared_a=True,
            center_head_input=True,
        )
        return cls(**{**defaults, **changes})


@dataclasses.dataclass(frozen=True)
class HypernetExecution:
    """How a hypernetwork runs, whatever checkpoint it runs (never saved as part of the weights' definition).

    dtype: compute dtype of the hypernetwork's matmuls (parameters stay float32; norms and softmax float32).
      On a CPU, XLA computes a float32 weight cast to bfloat16 inside a program in float32 (excess
      precision), so training in bfloat16 runs the hypernetwork's matmuls in float32 there; ``D2L``
      (inference) stores its matmul weights in bfloat16 (``hypernet.matmul_weights_in``) and runs them in it.
    scan_unroll: Perceiver blocks per iteration of their loop (``num_blocks``: no loop); XLA's CPU backend
      runs a loop's body on one thread, so CPUs want it unrolled, TPUs and GPUs want 1.
    iterative: run the Perceiver one base layer at a time (same outputs, lower peak memory).
    chunk_group_size: chunks that go through the context encoder and Perceiver at a time when
      internalizing, so memory does not grow with the document.
    """

    dtype: str = "float32"
    scan_unroll: int = 1
    iterative: bool = False
    chunk_group_size: int = 4

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {DTYPES}")
        for name in ("scan_unroll", "chunk_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes: Any) -> "HypernetExecution":
        return dataclasses.replace(self, **changes)
