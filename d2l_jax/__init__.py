"""Doc-to-LoRA in JAX/Flax."""

from d2l_jax.models.base_model import BaseModel, load_base_model
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import LoRA, lora_alpha

__all__ = ["BaseModel", "DecoderConfig", "LoRA", "load_base_model", "lora_alpha"]
