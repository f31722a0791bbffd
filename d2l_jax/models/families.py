"""Decoder configuration: one dataclass whose fields express every family difference.

The Llama family (SmolLM2, Llama 2/3, Mistral) uses the defaults. Fields marked as family seams are
the switches the other families need (Gemma-2: embedding scaling, (1 + w) norms, sandwich norms, GeGLU,
logit soft-capping, alternating sliding-window and global layers; Qwen3: q/k RMSNorm per head).
``config_from_hf`` maps a Hugging Face ``config.json`` onto it and rejects architectures this package
does not implement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma2", "qwen3")
# MLP gate activations: SwiGLU (Llama, Mistral, Qwen3) and GeGLU with the tanh-approximated GELU (Gemma-2).
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
# Hugging Face activation names (ACT2FN keys) -> MLP_ACTIVATIONS.
_HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Hugging Face ``layer_types`` entries.
_FULL_ATTENTION, _SLIDING_ATTENTION = "full_attention", "sliding_attention"
# The defaults of each family's transformers config class, for config.json files that omit a field.
_FAMILY_DEFAULTS = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False, "head_dim": 128},
    "gemma2": {
        "tie_word_embeddings": True,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    },
}
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
    # Layers whose attention is limited to ``sliding_window``; None: every layer (when it is set).
    sliding_window_layers: tuple[int, ...] | None = None
    mlp_activation: str = "silu"  # one of MLP_ACTIVATIONS
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
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of {MLP_ACTIVATIONS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_window_layers is not None:
            layers = tuple(int(i) for i in self.sliding_window_layers)  # a list read back from JSON stays hashable
            object.__setattr__(self, "sliding_window_layers", layers)
            if self.sliding_window is None:
                raise ValueError(f"sliding_window_layers={layers} needs a sliding_window")
            if any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(
                    f"sliding_window_layers={layers} must be distinct layer indices in 0..{self.num_layers - 1}"
                )

    def replace(self, **changes: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def sliding_layer_flags(self) -> tuple[bool, ...] | None:
        """Per layer, whether its attention uses ``sliding_window``; None when all layers attend alike."""
        if self.sliding_window is None or self.sliding_window_layers is None:
            return None
        return tuple(i in self.sliding_window_layers for i in range(self.num_layers))

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


def _sliding_window_from_hf(hf: dict, model_type: str, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding_window, sliding_window_layers) as the DecoderConfig fields, from ``layer_types`` when the
    file has it, else from each family's rule in transformers."""
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {_FULL_ATTENTION, _SLIDING_ATTENTION})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{source}: layer_types {unknown} are not supported; expected {_FULL_ATTENTION!r} or {_SLIDING_ATTENTION!r}"
            )
        if len(layer_types) != num_layers:
            raise ValueError(f"{source}: layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}")
    window = hf.get("sliding_window", _FAMILY_DEFAULTS[model_type].get("sliding_window"))
    if model_type == "llama" or (model_type == "qwen3" and not hf.get("use_sliding_window", False)):
        window = None
    if window is None:
        return None, None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{source}: sliding_window={window!r}; expected a positive integer or null")
    if layer_types is not None:
        sliding = [i for i, kind in enumerate(layer_types) if kind == _SLIDING_ATTENTION]
    elif model_type == "gemma2":
        sliding = list(range(0, num_layers, 2))  # layer 0 slides, layer 1 is global, and so on
    elif model_type == "qwen3":
        sliding = list(range(hf.get("max_window_layers", 28), num_layers))
    else:  # mistral: every layer
        sliding = list(range(num_layers))
    if not sliding:
        return None, None
    return window, None if len(sliding) == num_layers else tuple(sliding)


def config_from_hf(hf: dict, dtype: str = "float32", source: str = "config.json") -> DecoderConfig:
    """Builds a DecoderConfig from a Hugging Face ``config.json`` dict (read from ``source``, for messages).

    Fields the file omits take the defaults of the family's transformers config class (Gemma-2: tied
    embeddings, soft-capping 50 / 30, ``query_pre_attn_scalar`` 256, window 4096 on even layers).

    Raises:
      UnsupportedArchitectureError: ``model_type`` is not one of SUPPORTED_MODEL_TYPES, or the config
        uses a feature (activation, biases, RoPE type, layer type) this decoder does not implement.
      ValueError: naming ``source`` and the fields, when a field of REQUIRED_HF_FIELDS is missing or is
        not a positive integer, or ``layer_types`` / ``sliding_window`` do not fit the model.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} (architectures={hf.get('architectures')}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    defaults = _FAMILY_DEFAULTS[model_type]
    field = lambda name, default=None: hf.get(name, defaults.get(name, default))
    # Gemma-2's MLP reads `hidden_activation`; the other families' read `hidden_act`.
    act = field("hidden_activation", hf.get("hidden_act")) if model_type == "gemma2" else hf.get("hidden_act", "silu")
    if act not in _HF_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"hidden activation {act!r} is not supported for {model_type}; expected one of {sorted(_HF_ACTIVATIONS)}"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{model_type} checkpoints with attention/MLP biases are not supported")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedArchitectureError(f"{source}: bidirectional attention is not supported; this is a causal decoder")
    missing = [k for k in REQUIRED_HF_FIELDS if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source} lacks the required field(s) {missing}")
    wrong = [f"{k}={hf[k]!r}" for k in REQUIRED_HF_FIELDS if isinstance(hf[k], bool) or not isinstance(hf[k], int) or hf[k] < 1]
    if wrong:
        raise ValueError(f"{source}: {', '.join(wrong)}; these fields must be positive integers")
    theta, scaling = _rope_from_hf(hf)
    num_heads, num_layers, hidden = hf["num_attention_heads"], hf["num_hidden_layers"], hf["hidden_size"]
    window, window_layers = _sliding_window_from_hf(hf, model_type, num_layers, source)
    family_fields: dict[str, Any] = {}
    if model_type == "gemma2":
        softcap = lambda name: None if field(name) is None else float(field(name))
        family_fields = dict(
            embedding_multiplier=hidden**0.5,
            norm_weight_offset=1.0,
            use_post_norms=True,
            attn_logit_softcap=softcap("attn_logit_softcapping"),
            final_logit_softcap=softcap("final_logit_softcapping"),
            query_pre_attn_scalar=float(field("query_pre_attn_scalar")),
        )
    elif model_type == "qwen3":
        family_fields = dict(use_qk_norm=True)
    return DecoderConfig(
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=field("head_dim") or hidden // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(field("tie_word_embeddings")),
        sliding_window=window,
        sliding_window_layers=window_layers,
        mlp_activation=_HF_ACTIVATIONS[act],
        dtype=dtype,
        **family_fields,
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
    # google/gemma-2-2b-it (the reference's main base model): window 4096 on even layers, global odd ones.
    "gemma-2-2b-it": DecoderConfig(
        family="gemma2",
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        sliding_window=4096,
        sliding_window_layers=tuple(range(0, 26, 2)),
        mlp_activation="gelu_tanh",
        embedding_multiplier=2304**0.5,
        norm_weight_offset=1.0,
        use_post_norms=True,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_pre_attn_scalar=256.0,
    ),
}


def published_config(name: str) -> DecoderConfig:
    """The DecoderConfig of a published model by name (shapes only). Raises ValueError listing the names."""
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"no published configuration named {name!r}; known: {sorted(PUBLISHED_CONFIGS)}")
    return PUBLISHED_CONFIGS[name]
