"""Orbax checkpoints of a meta-training run: hypernetwork parameters, optimizer state, data-iterator
state, the run's configuration and the identity of the base model they belong to.

Items of one step (each a subdirectory, written atomically by Orbax: a step appears only once complete):
  params     the hypernetwork's variables: parameters and statistics (all that inference needs)
  optimizer  ``{"step", "opt_state"}``
  data       the Grain iterator state (optional)
  config     the run configuration (JSON)
  base       the base model's identity (JSON; checked on restore)
  checksums  two 32-bit sums of every array of ``params`` and ``optimizer`` (JSON; checked on restore)

A step whose arrays do not match their checksums, or cannot be read, is corrupt. Restoring without a
step falls back to the newest step that verifies (and says so); restoring a given step fails instead.
The checksums catch corrupted files, not deliberate tampering.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
    """A checkpoint's files cannot be read back, or its arrays do not match their checksums."""


log = logging.getLogger(__name__)
_MESSAGE_CHARS = 300  # of a third-party error quoted in ours (Orbax's can be pages of TensorStore spec)


@jax.jit
def _fingerprints(tree):
    """Per array: ``[sum of its words, sum of its words times their 1-based position]`` as uint32 (wrapping),
    computed where the array lives (sharded arrays included), so a flipped byte or moved block changes it."""

    def one(x):
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).reshape(-1)
        position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
        return jnp.stack([words.sum(dtype=jnp.uint32), (words * position).sum(dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def checksums(tree) -> dict[str, list[int]]:
    """``{array path: [two 32-bit sums]}`` of a tree of arrays (see ``_fingerprints``)."""
    sums = jax.device_get(_fingerprints(tree))
    return {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([True] + [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]))


def all_finite(tree) -> bool:
    """Whether every floating-point array of ``tree`` is finite (compiled once per tree structure)."""
    return bool(_all_finite(tree))


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
    """Raises CheckpointMismatchError unless ``current`` is the base model ``saved`` was trained on.

    Architecture fields added to ``DecoderConfig`` after ``saved`` was written count as their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(DecoderConfig) if f.default is not dataclasses.MISSING}
    current_architecture = _jsonable(current["architecture"])
    added = {k: defaults[k] for k in current_architecture.keys() - saved["architecture"].keys() if k in defaults}
    if _jsonable({**added, **saved["architecture"]}) != current_architecture or not math.isclose(
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
        self.rejected_steps: list[int] = []  # corrupt steps the last restore without a step fell back past
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "optimizer": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "base": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler(),
                "record_stats": ocp.JsonCheckpointHandler(),
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

    def save(self, step: int, state, config: dict, base: dict, data_iterator=None, record_stats: dict | None = None, force: bool = False) -> bool:
        """Starts saving ``state`` (a TrainState) at ``step``, with the checksums of its arrays; returns
        whether a save started. The ``params`` item holds the hypernetwork's variables (parameters and
        statistics: all that inference reads); ``record_stats`` (JSON) the data stream's counters at that
        point (``read_record_stats``).

        Raises FloatingPointError, saving nothing, when a parameter or statistic is not finite."""
        variables = join_stats(state.params, state.stats)
        if not all_finite(variables):
            raise FloatingPointError(f"step {step}: the hypernetwork has non-finite values; not saving it (the last checkpoint stays)")
        optimizer = {"step": state.step, "opt_state": state.opt_state}
        items = dict(
            params=ocp.args.StandardSave(variables),
            optimizer=ocp.args.StandardSave(optimizer),
            config=ocp.args.JsonSave(config),
            base=ocp.args.JsonSave(_jsonable(base)),
            checksums=ocp.args.JsonSave({"params": checksums(variables), "optimizer": checksums(optimizer)}),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if record_stats is not None:
            items["record_stats"] = ocp.args.JsonSave(record_stats)
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
            message = str(error).strip().splitlines()[0][:_MESSAGE_CHARS] if str(error).strip() else type(error).__name__
            raise CheckpointCorruptError(f"cannot read {sorted(items)} of the checkpoint at step {step} in {self.directory}: {message}") from error

    def _verify(self, step: int, item: str, tree) -> None:
        """Raises CheckpointCorruptError naming the first array of ``item`` that does not match its checksum
        (checkpoints written before checksums existed are not checked)."""
        if not (self.directory / str(step) / "checksums").is_dir():
            return
        saved = self.read_json("checksums", step)[item]
        for path, value in checksums(tree).items():
            if saved.get(path) != value:
                raise CheckpointCorruptError(
                    f"the checkpoint at step {step} in {self.directory} is corrupt: array {item}{path} does not match its checksum"
                )

    def _newest_verified(self, step: int | None, restore_step):
        """``(restore_step(s), s)`` for ``step``, or without one for the newest step that verifies, falling
        back past corrupt ones with a warning (their numbers are kept in ``self.rejected_steps``)."""
        if step is not None:
            return restore_step(self._step(step)), step
        self.rejected_steps = []
        candidates = sorted(self.manager.all_steps(), reverse=True)
        if not candidates:
            self._step(None)  # raises FileNotFoundError
        errors = []
        for candidate in candidates:
            try:
                result = restore_step(candidate)
            except CheckpointCorruptError as error:
                log.warning("%s; trying the step before it", error)
                self.rejected_steps.append(candidate)
                errors.append(str(error))
                continue
            if self.rejected_steps:
                log.warning("using step %d, the newest checkpoint in %s that verifies", candidate, self.directory)
            return result, candidate
        raise CheckpointCorruptError(f"no checkpoint verifies: {'; '.join(errors)}")

    def read_json(self, item: str, step: int | None = None) -> dict:
        step = self._step(step)
        return self._restore(step, **{item: ocp.args.JsonRestore()})[item]

    def read_record_stats(self, step: int) -> dict:
        """The data stream's counters saved with ``step``; ``{}`` for a checkpoint saved without them."""
        if not (self.directory / str(step) / "record_stats").is_dir():
            return {}
        return self.read_json("record_stats", step)

    def restore_params(self, abstract_variables, base: dict, step: int | None = None):
        """The hypernetwork's variables at ``step`` (by default the newest step that verifies), placed like
        ``abstract_variables`` (``jax.ShapeDtypeStruct`` leaves with shardings). Checks the base model first.

        Checkpoints written while the head's input mean was a parameter (``head/input_mean``) are read too.
        """

        def restore_step(step):
            check_base(self.read_json("base", step), base, self.directory)
            try:
                variables = self._restore(step, params=ocp.args.StandardRestore(abstract_variables))["params"]
            except CheckpointCorruptError:
                params, stats = split_stats(abstract_variables)
                if "input_mean" not in stats:
                    raise
                legacy = dict(params, head=dict(params["head"], input_mean=stats["input_mean"]))
                restored = self._restore(step, params=ocp.args.StandardRestore(legacy))["params"]
                head = dict(restored["head"])
                return join_stats(dict(restored, head=head), {"input_mean": head.pop("input_mean")})
            self._verify(step, "params", variables)
            return variables

        return self._newest_verified(step, restore_step)[0]

    def restore(self, abstract_state, base: dict, data_iterator=None, step: int | None = None):
        """(TrainState, step) restored onto the shardings of ``abstract_state`` (the newest step that verifies
        unless ``step`` is given); the data iterator, if given, is moved to where it was. Checks the base
        model first."""
        def restore_step(step):
            check_base(self.read_json("base", step), base, self.directory)
            items = dict(
                params=ocp.args.StandardRestore(join_stats(abstract_state.params, abstract_state.stats)),
                optimizer=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            )
            restored = self._restore(step, **items)
            self._verify(step, "params", restored["params"])
            self._verify(step, "optimizer", restored["optimizer"])
            if data_iterator is not None:  # only once the arrays verify: it moves the iterator
                self._restore(step, data=grain.checkpoint.CheckpointRestore(data_iterator))
            params, stats = split_stats(restored["params"])
            optimizer = restored["optimizer"]
            return abstract_state.replace(params=params, stats=stats, step=optimizer["step"], opt_state=optimizer["opt_state"])

        return self._newest_verified(step, restore_step)

    def set_aside(self, steps: list[int]) -> list[Path]:
        """Renames the given steps' folders to ``<step>.corrupt`` (nothing is deleted), so that retention and
        resuming no longer see them; returns the new paths."""
        moved = []
        for step in steps:
            target = self.directory / f"{step}.corrupt"
            (self.directory / str(step)).rename(target)
            moved.append(target)
        self.manager.reload()
        return moved

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
