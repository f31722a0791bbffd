"""Meta-training configuration. The defaults are the reference's (reference-facts section 6)."""

from __future__ import annotations

import dataclasses
from typing import Any

from d2l_jax.train.losses import LOSS_TYPES

TEACHERS = ("online", "offline")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the hypernetwork is meta-trained.

    Loss: ``loss`` is ``top_k_kl`` (cross-entropy to the teacher's unrenormalised top-``top_k`` mass),
      ``full_kl`` (KL over the vocabulary; online teacher only) or ``ce`` (labels only, no teacher);
      ``teacher`` is ``online`` (the frozen base with the document in its prompt, inside the step) or
      ``offline`` (top-k log-probabilities and ids stored in the batch); ``l1_coef`` weighs the L1 of
      the combined adapters.
    Optimiser: AdamW (``learning_rate``, ``b1``, ``b2``, ``eps``, ``weight_decay`` except on norms,
      scalers, biases and latent queries), linear warmup over ``warmup_steps`` then cosine to
      ``min_learning_rate`` at ``steps``, global-norm clipping at ``max_grad_norm``; the Perceiver's
      updates are multiplied by ``perceiver_lr_scale`` (0 freezes it at its initialisation).
    Batch: ``batch_size`` (query, context) rows per micro-batch, ``grad_accum_steps`` micro-batches per
      update (gradients averaged, one optimizer step).
    Encoder: ``chunk_group_size`` chunks of a micro-batch go through the context encoder and Perceiver at
      a time (0: all at once); groups holding only padding chunks (batches put them last) are skipped,
      which saves the work on padding when contexts have fewer chunks than the batch reserves.
    Head centring (``HypernetConfig.center_head_input``): the head centres its inputs on the batch's mean
      and keeps a running mean for inference; ``freeze_head_input_mean`` centres on the stored mean and
      leaves it as it is, for fine-tuning on batches whose chunk mix differs from the first run's (batches
      of long documents alone, whose mean lacks the needle share the stored mean was learned with).
    Mesh: ``mesh`` maps ``data``/``fsdp``/``tensor`` to sizes (``data`` defaults to the remaining devices).
    """

    loss: str = "top_k_kl"
    teacher: str = "online"
    top_k: int = 16
    l1_coef: float = 0.1
    learning_rate: float = 4e-5
    min_learning_rate: float = 1e-7
    warmup_steps: int = 100
    steps: int = 80_000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    perceiver_lr_scale: float = 1.0
    batch_size: int = 1
    grad_accum_steps: int = 1
    chunk_group_size: int = 0
    freeze_head_input_mean: bool = False
    seed: int = 42
    mesh: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss={self.loss!r}; expected one of {LOSS_TYPES}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r}; expected one of {TEACHERS}")
        if self.loss == "full_kl" and self.teacher == "offline":
            raise ValueError("loss='full_kl' needs the online teacher (offline targets store only the top-k)")
        for name in ("top_k", "steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.perceiver_lr_scale < 0:
            raise ValueError(f"perceiver_lr_scale must be >= 0 (0 freezes the Perceiver), got {self.perceiver_lr_scale}")
        if self.chunk_group_size < 0:
            raise ValueError(f"chunk_group_size must be >= 0 (0: all chunks at once), got {self.chunk_group_size}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if isinstance(self.mesh, dict):
            object.__setattr__(self, "mesh", tuple(sorted(self.mesh.items())))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_teacher(self) -> bool:
        return self.loss != "ce"
