"""The periodic evaluations a training run can name (``RunConfig.evaluator``), built for its base model."""

from __future__ import annotations

from typing import Callable

from d2l_jax.eval.niah import NIAHEvaluator
from d2l_jax.eval.qa_methods import QAEvaluator
from d2l_jax.models.base_model import BaseModel
from d2l_jax.train.config import EvaluatorConfig
from d2l_jax.train.loop import Evaluator

# name -> constructor(base, seed=..., **options)
EVALUATORS: dict[str, Callable[..., Evaluator]] = {"niah": NIAHEvaluator, "qa": QAEvaluator}


def make_evaluator(config: EvaluatorConfig, base: BaseModel, seed: int = 0) -> Evaluator:
    """The evaluator ``config`` names, over ``base``. Raises ValueError for an unknown name or options."""
    if config.name not in EVALUATORS:
        raise ValueError(f"unknown evaluator {config.name!r}; known: {sorted(EVALUATORS)}")
    try:
        return EVALUATORS[config.name](base, seed=seed, **config.options)
    except TypeError as error:
        raise ValueError(f"evaluator {config.name!r}: bad options {dict(config.options)} ({error})") from error
