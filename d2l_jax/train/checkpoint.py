"""Orbax checkpoints of a meta-training run: hypernetwork parameters, optimizer state, data-iterator
state, the run's configuration and the identity of the base model they belong to.

Items of one step (each a subdirectory, written atomically by Orbax: a step appears only once complete):
  params     the hypernetwork parameters (all that inference needs)
  optimizer  ``{"step", "opt_state"}``
  data       the Grain iterator state (optional)
  config     the run configuration (JSON)
  base       the base model's identity (JSON; checked on restore)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from d2l_jax.hypernet.hypernet import join_stats, split_stats
from d2l_jax.models.families import EXECUTION_FIELDS, DecoderConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another base model (or is not a d2l-jax checkpoint)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files cannot be read back."""


def base_identity(name: str, config: DecoderConfig, params) -> dict[str, Any]:
    """What identifies a base model: its name, architecture and a fingerprint of its embedding weights
    (rounded to bfloat16 first, so a float32 and a bfloat16 copy of the same model agree)."""
    embedding = np.asarray(jax.device_get(params["embedding"][:64].astype(jnp.bfloat16)), np.float64)
    return {
        "name": str(name),
        "architecture": {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS},
        "fingerprint": float(np.abs(embedding).sum()),
    }


def check_base(saved: dict[str, Any], current: dict[str, Any], directory) -> None:
    """Raises CheckpointMismatchError unless ``current`` is the base model ``saved`` was trained on."""
    if saved["architecture"] != _jsonable(current["architecture"]) or not math.isclose(
        saved["fingerprint"], current["fingerprint"], rel_tol=1e-5
    ):
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} was trained on base model {saved['name']!r}, which differs from "
            f"the loaded {current['name']!r} (architecture or weights)"
        )


def _jsonable(tree):
    return json.loads(json.dumps(tree))


class Checkpointer:
    """Saves and restores training checkpoints in ``directory`` (keeps the last ``keep`` steps)."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "optimizer": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "base": ocp.JsonCheckpointHandler(),
            },
        )

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "Checkpointer":
        """The checkpoints of a training workdir (or of its ``checkpoints`` folder), for reading.
        Raises FileNotFoundError when ``run_dir`` is not a directory (and creates none)."""
        directory = Path(run_dir)
        if (directory / "checkpoints").is_dir():
            directory = directory / "checkpoints"
        if not directory.is_dir():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a directory (a training workdir or its checkpoints folder)")
        return cls(directory, async_save=False)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config: dict, base: dict, data_iterator=None, force: bool = False) -> bool:
        """Starts saving ``state`` (a TrainState) at ``step``; returns whether a save started. The ``params``
        item holds the hypernetwork's variables (parameters and statistics: all that inference reads)."""
        items = dict(
            params=ocp.args.StandardSave(join_stats(state.params, state.stats)),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            config=ocp.args.JsonSave(config),
            base=ocp.args.JsonSave(_jsonable(base)),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory}")
        return step

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise CheckpointCorruptError(f"cannot read {sorted(items)} of the checkpoint at step {step} in {self.directory}: {error}") from error

    def read_json(self, item: str, step: int | None = None) -> dict:
        step = self._step(step)
        return self._restore(step, **{item: ocp.args.JsonRestore()})[item]

    def restore_params(self, abstract_variables, base: dict, step: int | None = None):
        """The hypernetwork's variables at ``step`` (latest by default), placed like ``abstract_variables``
        (``jax.ShapeDtypeStruct`` leaves with shardings). Checks the base model first.

        Checkpoints written while the head's input mean was a parameter (``head/input_mean``) are read too.
        """
        step = self._step(step)
        check_base(self.read_json("base", step), base, self.directory)
        try:
            return self._restore(step, params=ocp.args.StandardRestore(abstract_variables))["params"]
        except CheckpointCorruptError:
            params, stats = split_stats(abstract_variables)
            if "input_mean" not in stats:
                raise
        legacy = dict(params, head=dict(params["head"], input_mean=stats["input_mean"]))
        restored = self._restore(step, params=ocp.args.StandardRestore(legacy))["params"]
        head = dict(restored["head"])
        return join_stats(dict(restored, head=head), {"input_mean": head.pop("input_mean")})

    def restore(self, abstract_state, base: dict, data_iterator=None, step: int | None = None):
        """(TrainState, step) restored onto the shardings of ``abstract_state``; the data iterator, if
        given, is moved to where it was. Checks the base model first."""
        step = self._step(step)
        check_base(self.read_json("base", step), base, self.directory)
        items = dict(
            params=ocp.args.StandardRestore(join_stats(abstract_state.params, abstract_state.stats)),
            optimizer=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._restore(step, **items)
        params, stats = split_stats(restored["params"])
        state = abstract_state.replace(params=params, stats=stats, step=restored["optimizer"]["step"], opt_state=restored["optimizer"]["opt_state"])
        return state, step

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
