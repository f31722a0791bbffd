"""Decoder configuration: one dataclass whose fields express every family difference.

The Llama family (SmolLM2, Llama 2/3, Mistral) uses the defaults. Fields marked as family seams are
the switches later families need (Gemma-2: embedding scaling, (1 + w) norms, sandwich norms, logit
soft-capping, alternating sliding windows; Qwen3: q/k RMSNorm). ``config_from_hf`` maps a Hugging Face
``config.json`` onto it and rejects architectures this package does not implement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Hugging Face config.json fields without which a decoder's shapes are unknown.
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# DecoderConfig fields that say how a model runs, not what it computes.
EXECUTION_FIELDS = ("dtype", "remat_policy", "scan_unroll")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (``model_type``) is not implemented."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face ``rope_parameters`` / ``rope_scaling``.

    kind: ``"linear"`` (positions divided by ``factor``) or ``"llama3"`` (wavelength-dependent).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a decoder-only transformer. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # Family seams (Gemma-2 / Qwen3); the Llama family keeps the defaults.
    embedding_multiplier: float = 1.0
    norm_weight_offset: float = 0.0
    use_post_norms: bool = False
    use_qk_norm: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # Execution.
    dtype: str = "float32"  # matmul compute dtype; norms, softmax and logits stay in float32
    remat_policy: str = "none"
    # Layers per iteration of the loops over layers (jax.lax.scan's unroll). XLA's CPU backend runs the
    # matmuls of a loop body on one thread, so unrolling pays there; TPUs and GPUs want the loop.
    scan_unroll: int = 1

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be >= 1, got {self.scan_unroll}")

    def replace(self, **changes: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every projection a LoRA may target, by Hugging Face module name."""
        d, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedArchitectureError(
        f"RoPE scaling type {kind!r} is not supported; supported: default, linear, llama3"
    )


def config_from_hf(hf: dict, dtype: str = "float32", source: str = "config.json") -> DecoderConfig:
    """Builds a DecoderConfig from a Hugging Face ``config.json`` dict (read from ``source``, for messages).

    Raises:
      UnsupportedArchitectureError: ``model_type`` is not one of SUPPORTED_MODEL_TYPES, or the config
        uses a feature (activation, biases, RoPE type) this decoder does not implement.
      ValueError: naming ``source`` and the fields, when a field of REQUIRED_HF_FIELDS is missing or is
        not a positive integer.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} (architectures={hf.get('architectures')}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"hidden_act {act!r} is not supported for {model_type}; expected 'silu'")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{model_type} checkpoints with attention/MLP biases are not supported")
    missing = [k for k in REQUIRED_HF_FIELDS if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source} lacks the required field(s) {missing}")
    wrong = [f"{k}={hf[k]!r}" for k in REQUIRED_HF_FIELDS if isinstance(hf[k], bool) or not isinstance(hf[k], int) or hf[k] < 1]
    if wrong:
        raise ValueError(f"{source}: {', '.join(wrong)}; these fields must be positive integers")
    theta, scaling = _rope_from_hf(hf)
    num_heads = hf["num_attention_heads"]
    return DecoderConfig(
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        dtype=dtype,
    )


# Published architectures, for planning and ahead-of-time compilation without the weights (the numbers
# are those of each model's Hugging Face ``config.json``). Loading weights still needs a file or directory.
PUBLISHED_CONFIGS: dict[str, DecoderConfig] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default model).
    "smollm2-135m-instruct": DecoderConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 (no sliding window, RoPE theta 1e6).
    "mistral-7b-instruct-v0.2": DecoderConfig(
        family="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
    ),
}


def published_config(name: str) -> DecoderConfig:
    """The DecoderConfig of a published model by name (shapes only). Raises ValueError listing the names."""
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"no published configuration named {name!r}; known: {sorted(PUBLISHED_CONFIGS)}")
    return PUBLISHED_CONFIGS[name]
