"""Faults injected on purpose: corrupted checkpoints, non-finite steps, two writers, signals, changed configs.
Each test asserts the clear error or the recovery, and that no good checkpoint was removed."""

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax import D2L
from d2l_jax.train import loop
from d2l_jax.train.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError, base_identity
from d2l_jax.train.loop import train
from d2l_jax.train.step import Trainer
from d2l_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError
from tests.train.test_loop import RUN, base, files, losses  # noqa: F401 (base: the tiny base model fixture)

KEEP_TWO = dataclasses.replace(RUN, checkpoint_every=3)  # checkpoints at steps 3 and 6


@pytest.fixture(scope="module")
def two_checkpoints(base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two")
    train(KEEP_TWO, workdir, base=base)
    return workdir


def steps(workdir):
    return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir() if p.name[0].isdigit())


def flip_bytes(workdir, step: int, count: int = 64) -> None:
    """Flips ``count`` bytes in the middle of the largest data file of ``step``'s parameters."""
    data = [p for p in (Path(workdir) / "checkpoints" / str(step) / "params").rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + count] = bytes(b ^ 0xFF for b in raw[middle : middle + count])
    target.write_bytes(bytes(raw))


def copy_of(workdir, destination):
    return Path(shutil.copytree(workdir, destination / "run"))


def test_a_corrupt_newest_checkpoint_is_refused_by_name_and_load_falls_back(base, two_checkpoints, tmp_path, caplog):
    workdir = copy_of(two_checkpoints, tmp_path)
    flip_bytes(workdir, 6)
    before = files(workdir)
    # flipped bytes fail the checksum, or (where they land in a compressed chunk) the read itself
    with pytest.raises(CheckpointCorruptError, match=r"^(cannot read \['params'\] of the checkpoint at step 6 |the checkpoint at step 6 .* is corrupt: array params)"):
        D2L.load(workdir, step=6, base=base)  # a given step is that step or an error
    with caplog.at_level(logging.WARNING):
        fallen_back = D2L.load(workdir, base=base)
    assert "using step 3, the newest checkpoint" in caplog.text
    chex.assert_trees_all_equal(fallen_back.params, D2L.load(two_checkpoints, step=3, base=base).params)
    assert files(workdir) == before  # loading changes nothing


def test_resuming_past_a_corrupt_checkpoint_sets_it_aside_and_trains_on(base, two_checkpoints, tmp_path, caplog):
    workdir = copy_of(two_checkpoints, tmp_path)
    flip_bytes(workdir, 6)
    with caplog.at_level(logging.WARNING):
        result = train(KEEP_TWO, workdir, base=base)
    assert "set aside the corrupt checkpoint" in caplog.text and result["step"] == 6
    assert steps(workdir) == ["3", "6", "6.corrupt"]
    # Steps 4-6 were trained again from step 3 on the same data: the same losses as the first time.
    assert {k: v for k, v in losses(workdir).items() if k in (4, 5, 6)} == {k: losses(two_checkpoints)[k] for k in (4, 5, 6)}
    with pytest.raises(CheckpointCorruptError, match="no checkpoint verifies"):
        broken = copy_of(two_checkpoints, tmp_path / "second")  # every step corrupt: nothing to fall back to
        flip_bytes(broken, 3)
        flip_bytes(broken, 6)
        train(KEEP_TWO, broken, base=base)


def test_non_finite_steps_are_skipped_then_the_run_stops_and_saves_nothing(base, tmp_path, monkeypatch):
    original = Trainer.init_state

    def poisoned(self, key=None):
        state = original(self, key)
        head = dict(state.params["head"], head=state.params["head"]["head"].at[0, 0, 0].set(jnp.nan))
        return state.replace(params=dict(state.params, head=head))

    monkeypatch.setattr(Trainer, "init_state", poisoned)
    run = dataclasses.replace(RUN, train=RUN.train.replace(max_nonfinite_steps=3))
    with pytest.raises(FloatingPointError, match=r"step 3: 3 steps in a row had non-finite .* train.max_nonfinite_steps=3"):
        train(run, tmp_path / "stops", base=base)
    assert steps(tmp_path / "stops") == []
    # Nor is a non-finite state ever written, whoever asks.
    state = Trainer(RUN.hypernet, base.config, RUN.train).init_state()
    checkpoints = Checkpointer(tmp_path / "direct", async_save=False)
    with pytest.raises(FloatingPointError, match="step 1: the hypernetwork has non-finite values; not saving it"):
        checkpoints.save(1, state, RUN.to_json(), base_identity(RUN.model, base.config, base.params))
    checkpoints.close()
    assert not [p for p in (tmp_path / "direct").iterdir() if p.name[0].isdigit()]


def test_a_skipped_step_leaves_the_state_as_it_was(base):
    trainer = Trainer(RUN.hypernet, base.config, RUN.train)
    state = trainer.init_state()
    head = dict(state.params["head"], head=state.params["head"]["head"].at[0, 0, 0].set(jnp.inf))
    state = state.replace(params=dict(state.params, head=head))
    before = jax.tree.map(np.asarray, state)
    batch = next(iter(loop.training_batch_stream(RUN, base)))
    state, metrics = trainer.step(state, trainer.put_base_params(base.params), trainer.put_batch(batch))
    assert (int(metrics["nonfinite_steps_in_a_row"]), int(metrics["nonfinite_steps"])) == (1, 1)
    chex.assert_trees_all_equal(state.params, before.params)
    assert int(state.step) == 1  # the batch is consumed; only the update is skipped


def test_a_second_run_on_the_same_workdir_fails_at_once_naming_the_holder(base, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from d2l_jax.train.workdir_lock import WorkdirLock\nimport time\nwith WorkdirLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(pid {holder.pid} on "):
            train(RUN, tmp_path, base=base)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    with WorkdirLock(tmp_path):  # the holder died without releasing: its lock is stale and taken over
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit


def test_ctrl_c_saves_stops_and_says_so(base, tmp_path):
    """SIGINT as SIGTERM (tests/train/test_loop.py) does: a checkpoint, then a stop the caller can tell apart."""
    signum = signal.SIGINT
    run = dataclasses.replace(RUN, train=RUN.train.replace(steps=200))
    writes = {"n": 0}
    original = loop.MetricsWriter.write

    def write(self, step, metrics):
        original(self, step, metrics)
        writes["n"] += 1
        if writes["n"] == 3:
            os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)  # SIG_IGN when the tests run in a background job
    loop.MetricsWriter.write = write
    try:
        result = train(run, tmp_path, base=base)
    finally:
        loop.MetricsWriter.write = original
    assert result["stopped_by"] == signal.Signals(signum).name and 3 <= result["step"] < 200
    assert steps(tmp_path) == [str(result["step"])]
    assert signal.getsignal(signum) == before  # the loop's handler is removed again


def test_resuming_with_another_hypernetwork_names_the_field(base, two_checkpoints, caplog):
    wider = dataclasses.replace(RUN, hypernet=RUN.hypernet.replace(latent_size=48))
    before = files(two_checkpoints)
    with pytest.raises(CheckpointMismatchError, match=r"different hypernetwork: latent_size is 32 there, 48 here"):
        train(wider, two_checkpoints, base=base)
    assert files(two_checkpoints) == before


def test_resuming_with_another_schedule_warns(base, two_checkpoints, tmp_path, caplog):
    workdir = copy_of(two_checkpoints, tmp_path)
    longer = dataclasses.replace(KEEP_TWO, train=KEEP_TWO.train.replace(steps=7))
    with caplog.at_level(logging.WARNING):
        assert train(longer, workdir, base=base)["step"] == 7
    assert "resuming with another schedule (train.steps 6 -> 7)" in caplog.text
