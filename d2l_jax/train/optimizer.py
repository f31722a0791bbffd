"""The optimiser: AdamW with the reference's weight-decay exclusions, warmup + cosine, clipping."""

from __future__ import annotations

import jax
import optax
from flax import traverse_util

from d2l_jax.train.config import TrainConfig

# Parameters whose path contains one of these (lowercased) get no weight decay.
NO_DECAY = ("norm", "scaler", "bias", "latents_q", "input_mean")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over the warmup, then cosine down to ``min_learning_rate`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.min_learning_rate,
    )


def weight_decay_mask(params) -> dict:
    """True for the parameters that are decayed (perceiver and head weights), False for the exclusions."""
    flat = traverse_util.flatten_dict(params)
    decayed = {path: not any(word in "/".join(path).lower() for word in NO_DECAY) for path in flat}
    return traverse_util.unflatten_dict(decayed)


def perceiver_mask(params) -> dict:
    """True for the Perceiver's parameters (``params["perceiver"]``), False for the head's."""
    return {name: jax.tree.map(lambda _: name == "perceiver", tree) for name, tree in params.items()}


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping, AdamW, then the Perceiver's updates scaled by ``perceiver_lr_scale``."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
        optax.masked(optax.scale(config.perceiver_lr_scale), perceiver_mask),
    )
