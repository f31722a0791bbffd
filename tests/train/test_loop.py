"""The training loop: exact resume, SIGTERM, checkpoints of another base model or corrupt ones, D2L.load."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax import D2L, BaseModel
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig
from d2l_jax.train.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError, base_identity
from d2l_jax.data.sources import SourceConfig
from d2l_jax.train.config import DataConfig, RunConfig, TrainConfig
from d2l_jax.train.loop import train
from d2l_jax.train.step import Trainer

BASE = DecoderConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
RUN = RunConfig(
    model="tiny",
    hypernet=HypernetConfig(
        encoder_type="early_exit", latent_size=32, n_latent_queries=4, num_blocks=1, num_heads=4, head_dim=8, num_kv_heads=2,
        lora_rank=2, max_chunk_len=64, max_chunks=2,
    ),
    train=TrainConfig(loss="ce", learning_rate=1e-3, warmup_steps=1, steps=6, batch_size=2, seed=0),
    data=DataConfig(SourceConfig("niah", {"bins": ((8, 37),)}), max_student_len=36, max_labels=8),
    eval_every=0,
    checkpoint_every=0,
    log_every=1,
)


def tiny_base(tokenizer, stop_ids, seed):
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(Decoder(BASE).init(jax.random.key(seed), tokens, tokens, tokens + 1))["params"]
    return BaseModel("tiny", BASE, params, tokenizer, stop_ids)


@pytest.fixture(scope="module")
def base(smollm2):
    return tiny_base(smollm2.tokenizer, smollm2.stop_token_ids, seed=1)


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    train(RUN, workdir, base=base)
    return workdir


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def record_counts(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["data/records_read"], r["data/dropped_examples"]) for r in rows if "data/records_read" in r}


def files(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in Path(directory).rglob("*") if p.is_file())


def test_resume_continues_exactly(base, straight, tmp_path):
    result = train(RUN, tmp_path, base=base, stop_after=3)
    assert result["step"] == 3
    result = train(RUN, tmp_path, base=base)
    assert result["step"] == 6
    assert losses(tmp_path) == losses(straight)  # same data order and same numbers, bitwise
    assert record_counts(tmp_path) == record_counts(straight)  # the stream's counters went on from the checkpoint
    resumed, reference = D2L.load(tmp_path, base=base), D2L.load(straight, base=base)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, reference.params)
    assert sorted(losses(straight)) == [1, 2, 3, 4, 5, 6]


def test_a_last_step_that_is_also_a_checkpoint_step_is_saved_once(base, straight, tmp_path):
    result = train(dataclasses.replace(RUN, checkpoint_every=3), tmp_path, base=base)
    assert result["step"] == 6 and losses(tmp_path) == losses(straight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_loaded_hypernet_internalizes(base, straight):
    d2l = D2L.load(straight, base=base)
    assert d2l.config == RUN.hypernet
    adapter = d2l.internalize("The special magic number is 1234.")
    assert adapter.num_chunks == 1 and np.all(np.isfinite(np.asarray(adapter.B["down_proj"])))
    assert np.abs(np.asarray(adapter.B["down_proj"])).max() > 0  # trained: B is no longer zero


def test_a_bfloat16_copy_of_the_base_model_is_the_same_base_model(base, straight):
    half = dataclasses.replace(
        base,
        params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), base.params),
        config=base.config.replace(dtype="bfloat16", scan_unroll=2),
    )
    d2l = D2L.load(straight, base=half)  # how the weights are stored and run is not what identifies them
    jax.tree.map(np.testing.assert_array_equal, d2l.params, D2L.load(straight, base=base).params)


def test_checkpoint_of_another_base_model_is_refused(smollm2, straight):
    before = files(straight)
    other = tiny_base(smollm2.tokenizer, smollm2.stop_token_ids, seed=2)
    with pytest.raises(CheckpointMismatchError, match="trained on base model 'tiny'"):
        D2L.load(straight, base=other)
    with pytest.raises(CheckpointMismatchError):
        train(RUN, straight, base=other)
    assert files(straight) == before


def test_corrupt_checkpoint_gives_a_clear_error_and_is_left_alone(base, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    for path in (workdir / "checkpoints" / "6" / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\0" * 7)
    before = files(workdir)
    with pytest.raises(CheckpointCorruptError, match="step 6"):
        D2L.load(workdir, base=base)
    with pytest.raises(CheckpointCorruptError):
        train(RUN, workdir, base=base)
    assert files(workdir) == before


def test_sigterm_saves_and_stops(base, tmp_path):
    run = dataclasses.replace(RUN, train=RUN.train.replace(steps=200))
    # Deliver SIGTERM from inside the loop, at the third metrics write (log_every=1: one per step).
    writes = {"n": 0}
    from d2l_jax.train import loop

    original = loop.MetricsWriter.write

    def write(self, step, metrics):
        original(self, step, metrics)
        writes["n"] += 1
        if writes["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    loop.MetricsWriter.write = write
    try:
        result = train(run, tmp_path, base=base)
    finally:
        loop.MetricsWriter.write = original
    assert 3 <= result["step"] < 200 and result["stopped_by"] == "SIGTERM"
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [result["step"]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is removed again


def test_init_from_starts_from_another_runs_parameters_with_a_fresh_optimizer(base, straight, tmp_path):
    run = dataclasses.replace(RUN, init_from=str(straight), train=RUN.train.replace(learning_rate=1e-4))
    assert train(run, tmp_path / "start", base=base, stop_after=0)["step"] == 0
    started = D2L.load(tmp_path / "start", base=base)
    jax.tree.map(np.testing.assert_array_equal, started.params, D2L.load(straight, base=base).params)

    result = train(run, tmp_path / "tuned", base=base, stop_after=2)
    assert result["step"] == 2  # its own step count and schedule, from 0
    tuned = D2L.load(tmp_path / "tuned", base=base)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), tuned.params, started.params)
    assert any(jax.tree.leaves(moved))


def test_init_from_a_pretrained_directory(base, straight, tmp_path):
    trained = D2L.load(straight, base=base)
    trained.save_pretrained(tmp_path / "pretrained", description="tiny")
    run = dataclasses.replace(RUN, init_from=str(tmp_path / "pretrained"))
    assert train(run, tmp_path / "start", base=base, stop_after=0)["step"] == 0
    jax.tree.map(np.testing.assert_array_equal, D2L.load(tmp_path / "start", base=base).params, trained.params)
    other = tiny_base(base.tokenizer, base.stop_token_ids, seed=2)
    with pytest.raises(CheckpointMismatchError):
        train(run, tmp_path / "other", base=other, stop_after=0)
    wider = dataclasses.replace(run, hypernet=dataclasses.replace(RUN.hypernet, lora_rank=4))
    with pytest.raises(ValueError, match="parameter shapes differ"):
        train(wider, tmp_path / "wider", base=base, stop_after=0)

    # Partial: the variables of the same name and shape come from the pretrained one, the rest start fresh.
    train(dataclasses.replace(wider, init_partial=True), tmp_path / "partial", base=base, stop_after=0)
    train(dataclasses.replace(wider, init_from="", init_partial=False), tmp_path / "fresh", base=base, stop_after=0)
    partial, fresh = (D2L.load(tmp_path / name, base=base).params for name in ("partial", "fresh"))
    taken = jax.tree.map(lambda p, f, t: np.array_equal(p, t) if p.shape == t.shape else np.array_equal(p, f), partial, fresh, _like(partial, trained.params))
    assert all(jax.tree.leaves(taken))
    same_shape = jax.tree.leaves(jax.tree.map(lambda p, t: p.shape == t.shape, partial, _like(partial, trained.params)))
    assert any(same_shape) and not all(same_shape)
    with pytest.raises(ValueError, match="give init_from too"):
        dataclasses.replace(RUN, init_without_b=True)
    with pytest.raises(ValueError, match="init_partial needs init_from to name a pretrained hypernetwork"):
        train(dataclasses.replace(RUN, init_from=str(straight), init_partial=True), tmp_path / "run", base=base, stop_after=0)


def _like(tree, other):
    """``other``'s leaves arranged as ``tree`` (a same-structured pytree whose leaves may differ in shape)."""
    return jax.tree.unflatten(jax.tree.structure(tree), jax.tree.leaves(other))


def test_init_from_refuses_a_run_without_checkpoints_or_of_another_shape(base, straight, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        train(dataclasses.replace(RUN, init_from=str(tmp_path / "missing")), tmp_path / "a", base=base)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(dataclasses.replace(RUN, init_from=str(tmp_path / "empty")), tmp_path / "a", base=base)
    wider = dataclasses.replace(RUN, init_from=str(straight), hypernet=dataclasses.replace(RUN.hypernet, lora_rank=4))
    before = files(straight)
    with pytest.raises(ValueError, match="parameter shapes differ"):
        train(wider, tmp_path / "b", base=base)
    assert files(straight) == before


class CountingEvaluator:
    """An evaluator that records what the loop hands it."""

    def __init__(self):
        self.calls = []

    def baseline(self):
        return {"eval/floor": 0.25}

    def __call__(self, d2l):
        self.calls.append(d2l)
        return {"eval/b_norm": float(np.abs(np.asarray(d2l.internalize("The number is 7.").B["down_proj"])).max()), "eval/note": "x"}


def test_the_loop_calls_the_evaluator_it_is_given(base, tmp_path):
    evaluator = CountingEvaluator()
    run = dataclasses.replace(RUN, eval_every=4)
    result = train(run, tmp_path, base=base, evaluator=evaluator)
    assert len(evaluator.calls) == 2  # at step 4 and at the end (step 6)
    assert all(d.config == run.hypernet and d.execution == run.execution for d in evaluator.calls)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], sorted(k for k in r if k.startswith("eval/"))) for r in rows if any(k.startswith("eval/") for k in r)]
    assert evaluated == [(0, ["eval/floor"]), (4, ["eval/b_norm"]), (6, ["eval/b_norm"])]  # strings are returned, not written
    assert result["eval/note"] == "x" and result["eval/b_norm"] > 0


@pytest.fixture(scope="module")
def bfloat16_run(base, tmp_path_factory):
    """A run whose hypernetwork trained with bfloat16 matmuls."""
    workdir = tmp_path_factory.mktemp("bf16")
    run = dataclasses.replace(RUN, train=RUN.train.replace(steps=3), execution=HypernetExecution(dtype="bfloat16"))
    train(run, workdir, base=base)
    return workdir


@pytest.mark.parametrize("trained_in", ["float32", "bfloat16"])
def test_a_checkpoint_runs_under_another_execution(base, straight, bfloat16_run, trained_in):
    workdir = straight if trained_in == "float32" else bfloat16_run
    other = "bfloat16" if trained_in == "float32" else "float32"
    as_trained = D2L.load(workdir, base=base)
    assert as_trained.execution == HypernetExecution(dtype=trained_in)  # by default as the run ran it
    switched = D2L.load(workdir, base=base, execution=HypernetExecution(dtype=other, chunk_group_size=1, scan_unroll=2))
    assert switched.config == as_trained.config and switched.execution.dtype == other
    chex.assert_trees_all_equal(switched.params, as_trained.params)  # the checkpoint itself is the same
    document = "The special magic number is 1234. " * 3
    [mine], [theirs] = switched.adapters([document]), as_trained.adapters([document])
    chex.assert_trees_all_close(mine.lora, theirs.lora, rtol=5e-2, atol=2e-3)  # bfloat16 rounding apart
    assert np.abs(np.asarray(mine.B["down_proj"])).max() > 0


def test_a_checkpoint_with_the_head_mean_stored_as_a_parameter_still_loads(base, tmp_path):
    """Checkpoints written while the head's running input mean was a parameter (``head/input_mean``)."""
    hyper = RUN.hypernet.replace(center_head_input=True)
    run = dataclasses.replace(RUN, hypernet=hyper)
    trainer = Trainer(hyper, base.config, run.train)
    state = trainer.init_state()
    mean = jnp.full(state.stats["input_mean"].shape, 0.5)
    legacy = SimpleNamespace(step=state.step, params=dict(state.params, head=dict(state.params["head"], input_mean=mean)), stats={}, opt_state={})
    checkpoints = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpoints.save(1, legacy, run.to_json(), base_identity(run.model, base.config, base.params))
    checkpoints.close()
    d2l = D2L.load(tmp_path, base=base)
    np.testing.assert_array_equal(d2l.params["stats"]["input_mean"], mean)
    assert "input_mean" not in d2l.params["head"]
    chex.assert_trees_all_equal(d2l.params["perceiver"], state.params["perceiver"])
