"""Hypernetwork configuration. The defaults are the reference's main experiment."""

from __future__ import annotations

import dataclasses
from typing import Any

from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import TARGET_MODULES, lora_alpha

ENCODER_TYPES = ("per_layer_activations", "early_exit", "embed_only")
B_INITS = ("zero_scaler", "zero_head")


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
    """How documents become LoRA adapters.

    Context encoder:
      encoder_type: ``per_layer_activations`` (one feature set per base layer, the Perceiver maps layer l's
        features to layer l's adapter), ``early_exit`` (final-normed output of layer ``early_exit_layer``)
        or ``embed_only`` (scaled token embeddings).
      early_exit_layer: defaults to ``num_layers // 4`` of the base model.
    Perceiver: ``latent_size`` (H), ``n_latent_queries`` encoder latents, ``num_blocks`` cross-attention
      layers, attention with ``num_heads`` x ``head_dim`` queries and ``num_kv_heads`` key/value heads,
      MLPs ``intermediate_factor`` x wider, RMSNorm ``rms_norm_eps``.
    Head: ``num_pre_head_layers`` ResMLP blocks (per layer if ``per_layer_processing``), L2 normalisation
      (``l2_eps`` guards the zero vector; the reference has none), a per-layer linear head to every target
      module's ``d_in + d_out``, generating rank ``lora_rank`` adapters for ``target_modules``;
      ``use_bias`` appends a learned context-independent "bias LoRA". ``per_rank_head`` gives every rank
      its own head weights (the reference shares one head across ranks, so a rank differs from another only
      through its latent). ``b_init`` is how a fresh hypernetwork generates ``B = 0``: ``zero_scaler`` (the
      reference: ``scaler_B`` zeros and a random head) or ``zero_head`` (``scaler_B`` ones and the head's B
      weights zero, so those weights get gradients from the first step, as a plain LoRA's B does).
      ``shared_a`` makes every chunk's A one learned matrix per layer and rank, independent of the
      document (the head then emits B only): the document is written into B alone.
      ``center_head_input`` subtracts a running mean of the head's inputs over training documents (kept
      by the train step, like batch normalisation's statistics) before the L2 norm; a document's own part
      of the latents is otherwise a small fraction of them.
    Adapted layers: ``adapted_layers`` limits the adapters to the last that many base layers (0: every
      layer, as the reference); the other layers get zero rows, so adapters keep the base model's layer count,
      and a training step runs them outside the gradient.
    Chunking: templated documents are split into chunks of at most ``max_chunk_len`` tokens (chat affixes
      included; the reference bounds the pieces before re-wrapping them); a document may
      have at most ``max_chunks`` chunks in one pass (adapter rank at most ``(max_chunks + 1) * lora_rank``;
      ``eval.long_context.internalize_long`` takes longer documents);
      the encoder runs at most ``chunk_group_size`` chunks at a time so memory does not grow with the document.
    iterative: run the Perceiver and head one base layer at a time (same outputs, lower peak memory).
    dtype: compute dtype of the hypernetwork's matmuls (parameters stay float32).
    scan_unroll: how many Perceiver blocks each iteration of their loop runs (``num_blocks``: no loop); XLA's
      CPU backend runs a loop's body on one thread, so CPUs want it unrolled, TPUs and GPUs want 1.
    """

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
    per_rank_head: bool = False
    b_init: str = "zero_scaler"
    shared_a: bool = False
    center_head_input: bool = False
    adapted_layers: int = 0
    l2_eps: float = 1e-12
    max_chunk_len: int = 1024
    max_chunks: int = 64
    chunk_group_size: int = 4
    iterative: bool = False
    dtype: str = "float32"
    scan_unroll: int = 1

    def __post_init__(self):
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type={self.encoder_type!r}; expected one of {ENCODER_TYPES}")
        unknown = set(self.target_modules) - set(TARGET_MODULES)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; known: {TARGET_MODULES}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        for name in ("latent_size", "n_latent_queries", "num_blocks", "lora_rank", "max_chunk_len", "max_chunks", "chunk_group_size", "scan_unroll"):
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
        """A CPU-sized NIAH hypernetwork (early exit, narrow and shallow Perceiver)."""
        defaults = dict(
            encoder_type="early_exit",
            latent_size=256,
            n_latent_queries=32,
            num_blocks=2,
            num_heads=4,
            head_dim=64,
            num_kv_heads=2,
            max_chunk_len=256,
            max_chunks=8,
        )
        return cls(**{**defaults, **changes})
