"""The distillation core shared by D2L meta-training (``train.step``) and per-document context distillation
(``baselines.context_distillation``): the frozen teacher's targets, and the loss between them and the
student's logits at the label positions (``models.decoder.label_logits``) as one strategy object handed to
both trainers.

Targets travel as a dict whose names are those of the train-step batch, so a batch carrying offline
targets or labels is itself a valid ``targets`` argument:

  top_k_kl  teacher_log_probs, teacher_ids  [B, P, K]  the teacher's top-k log-probabilities and token ids
  full_kl   teacher_logits                  [B, P, V]  the teacher's float32 logits
  ce        labels                          [B, P]     the label token ids (no teacher)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
from jaxtyping import Array, Float, Int

from d2l_jax.models.decoder import label_logits
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import LoRA
from d2l_jax.train import losses


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
    """Which loss the student is trained with (hashable: a static argument of jitted steps).

    Attributes:
      kind: one of ``losses.LOSS_TYPES``: ``top_k_kl`` (cross-entropy to the teacher's unrenormalised
        top-``top_k`` mass, the reference's), ``full_kl`` (KL over the vocabulary) or ``ce`` (labels only).
      top_k: teacher entries kept per label token for ``top_k_kl``.

    Raises:
      ValueError: unknown ``kind``, or ``top_k < 1`` with ``top_k_kl``.
    """

    kind: str = "top_k_kl"
    top_k: int = 16

    def __post_init__(self):
        if self.kind not in losses.LOSS_TYPES:
            raise ValueError(f"loss={self.kind!r}; expected one of {losses.LOSS_TYPES}")
        if self.kind == "top_k_kl" and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 for the top_k_kl loss, got {self.top_k}")

    @property
    def uses_teacher(self) -> bool:
        return self.kind != "ce"

    def targets(self, teacher_logits: Float[Array, "B P V"]) -> dict[str, Array]:
        """What the loss needs of the teacher's logits at the label positions (names in the module
        docstring); ``{}`` for ``ce``."""
        if self.kind == "top_k_kl":
            log_probs, ids = losses.top_k_targets(teacher_logits, self.top_k)
            return {"teacher_log_probs": log_probs, "teacher_ids": ids}
        if self.kind == "full_kl":
            return {"teacher_logits": teacher_logits}
        return {}

    def loss(self, logits: Float[Array, "B P V"], targets: Mapping[str, Array], mask: Int[Array, "B P"]) -> Float[Array, ""]:
        """The loss of the student's ``logits`` at the label positions against ``targets`` (a dict holding
        at least the entries of this kind; extra entries are ignored), averaged as ``losses`` does: per row
        over its ``mask``ed label tokens, then over rows with labels.

        Raises:
          KeyError: ``targets`` lacks an entry this kind needs.
        """
        if self.kind == "top_k_kl":
            return losses.top_k_kl(logits, targets["teacher_log_probs"], targets["teacher_ids"], mask)
        if self.kind == "full_kl":
            return losses.full_kl(logits, targets["teacher_logits"], mask)
        return losses.cross_entropy(logits, targets["labels"], mask)


def teacher_targets(
    base: DecoderConfig,
    base_params,
    tokens: Int[Array, "B T"],
    mask: Int[Array, "B T"],
    label_positions: Int[Array, "B P"],
    distillation: DistillationLoss,
) -> dict[str, Array]:
    """The teacher's targets: the frozen base model (no LoRA) reading the teacher sequences (the document in
    the prompt), at the positions predicting the labels, as ``distillation.targets`` gives them.

    No gradient flows through them. For ``ce`` this is ``{}`` and the base model does not run.
    """
    if not distillation.uses_teacher:
        return {}
    logits = label_logits(base, base_params, tokens, mask, label_positions)
    return distillation.targets(jax.lax.stop_gradient(logits))
