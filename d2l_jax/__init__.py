"""Doc-to-LoRA in JAX/Flax."""

from d2l_jax.api import D2L, Adapter, stack_adapters
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.models.base_model import BaseExecution, BaseModel, load_base_model
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import LoRA, lora_alpha

__all__ = [
    "D2L",
    "Adapter",
    "BaseExecution",
    "BaseModel",
    "DecoderConfig",
    "HypernetConfig",
    "HypernetExecution",
    "LoRA",
    "load_base_model",
    "lora_alpha",
    "stack_adapters",
]
