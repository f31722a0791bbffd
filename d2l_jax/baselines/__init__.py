"""Baselines D2L is compared with. Context distillation: a fresh LoRA trained per document."""

from d2l_jax.baselines.context_distillation import (
    CDResult,
    ContextDistillation,
    PeakMemory,
    distill_document,
    distill_oracle,
    generate_qa_pairs,
    init_cd_lora,
    parse_qa_pairs,
)

__all__ = [
    "CDResult",
    "ContextDistillation",
    "PeakMemory",
    "distill_document",
    "distill_oracle",
    "generate_qa_pairs",
    "init_cd_lora",
    "parse_qa_pairs",
]
