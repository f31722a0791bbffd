"""Baselines D2L is compared with. Context distillation: a fresh LoRA trained per document."""

from d2l_jax.baselines.context_distillation import (
    CDResult,
    PeakMemory,
    distill_document,
    distill_oracle,
    init_cd_lora,
)

__all__ = [
    "CDResult",
    "PeakMemory",
    "distill_document",
    "distill_oracle",
    "init_cd_lora",
]
