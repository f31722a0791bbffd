"""An experiment config file's contents as the library's typed objects.

An experiment (``experiments/*.py``) holds the ``RunConfig`` fields and, optionally, a ``base`` section
that says how the frozen base model is stored and run:

  param_dtype   dtype of the base weights in memory (``float32`` or ``bfloat16``)
  dtype         matmul compute dtype (defaults to ``param_dtype``); norms, softmax and logits stay float32
  remat_policy  rematerialisation of the scanned decoder layers (``DecoderConfig.remat_policy``)
  scan_unroll   layers per iteration of the loops over layers (``DecoderConfig.scan_unroll``)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from d2l_jax.models.families import REMAT_POLICIES, DecoderConfig, PUBLISHED_CONFIGS, config_from_hf

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BaseExecution:
    """How the frozen base model is stored and run (the ``base`` section of an experiment)."""

    param_dtype: str = "float32"
    dtype: str | None = None
    remat_policy: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"base.{name}={value!r}; expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"base.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.scan_unroll < 1:
            raise ValueError(f"base.scan_unroll must be >= 1, got {self.scan_unroll}")

    @property
    def compute_dtype(self) -> str:
        return self.dtype or self.param_dtype

    def apply(self, config: DecoderConfig) -> DecoderConfig:
        """``config`` with this compute dtype, remat policy and loop unrolling."""
        return config.replace(dtype=self.compute_dtype, remat_policy=self.remat_policy, scan_unroll=self.scan_unroll)


def parse_experiment(settings: dict[str, Any]):
    """``(RunConfig, BaseExecution)`` from an experiment's JSON-like dict (the ``base`` section is optional)."""
    from d2l_jax.train.loop import RunConfig

    settings = dict(settings)
    execution = BaseExecution(**(settings.pop("base", None) or {}))
    return RunConfig.from_json(settings), execution


def load_experiment_base(model: str, execution: BaseExecution):
    """Loads the base model ``model`` with the weights dtype, compute dtype and remat policy of ``execution``."""
    from d2l_jax.models.base_model import load_base_model

    base = load_base_model(model, execution.param_dtype, execution.compute_dtype)
    return dataclasses.replace(base, config=execution.apply(base.config))


def base_architecture(model: str | os.PathLike) -> DecoderConfig:
    """A base model's DecoderConfig without loading its weights.

    ``model`` is a published name (``PUBLISHED_CONFIGS``), an embedded model name, a Hugging Face directory
    (its ``config.json`` is read) or a ``.gguf`` file (its metadata is read).
    Raises ValueError naming the accepted forms when ``model`` is none of them.
    """
    from d2l_jax.models.base_model import EMBEDDED_MODELS, embedded_model_path

    name = os.fspath(model)
    if name in PUBLISHED_CONFIGS:
        return PUBLISHED_CONFIGS[name]
    path = embedded_model_path(name) if name in EMBEDDED_MODELS else Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        from d2l_jax.models.weights.gguf import config_from_gguf, gguf_metadata

        reader = gguf.GGUFReader(path)
        return config_from_gguf(gguf_metadata(reader), {t.name for t in reader.tensors})
    raise ValueError(
        f"cannot describe base model {name!r}: use a published name {sorted(PUBLISHED_CONFIGS)}, an embedded "
        f"model {sorted(EMBEDDED_MODELS)}, a Hugging Face directory with config.json, or a .gguf file"
    )
