"""The meta-training loop: data, sharded steps, metrics, periodic evaluation, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import jax
from tqdm.auto import tqdm

from d2l_jax import pretrained
from d2l_jax.api import D2L
from d2l_jax.data.chunking import document_affixes
from d2l_jax.data.examples import ChunkSampling, TrainExampleBuilder
from d2l_jax.data.pipeline import RecordStats, training_batches
from d2l_jax.data.sources import make_sources
from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.hypernet.head import without_generated_b
from d2l_jax.hypernet.hypernet import abstract_hypernet, join_stats, split_stats
from d2l_jax.models.base_model import BaseModel
from d2l_jax.train.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError, base_identity, check_base
from d2l_jax.train.config import RunConfig
from d2l_jax.train.metrics import MetricsWriter, StopOnSignal
from d2l_jax.train.step import Trainer, TrainState, abstract_batch
from d2l_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """A run's periodic evaluation (``d2l_jax.eval.evaluators`` builds them from ``RunConfig.evaluator``)."""

    def baseline(self) -> dict[str, float]:
        """Metrics of the base model alone (floors and ceilings), written once at step 0."""

    def __call__(self, d2l: D2L) -> dict[str, Any]:
        """Metrics of the hypernetwork being trained; floats are written, other values only returned."""


def training_batch_stream(run: RunConfig, base: BaseModel, stats: RecordStats | None = None):
    """This process's Grain stream of training batches for ``run`` (static shapes, checkpointable); ``stats``
    counts the records read, skipped as bad and dropped for not fitting."""
    tokenizer = base._require_tokenizer()
    builder = TrainExampleBuilder(
        tokenizer,
        document_affixes(tokenizer),
        base.stop_token_ids,
        run.hypernet.max_chunk_len,
        ChunkSampling(run.data.chunk_probs, run.data.min_chunk_len),
        with_teacher=run.train.uses_teacher and run.train.teacher == "online",
    )
    shapes = run.batch_shapes()
    rows = run.train.batch_size // jax.process_count()
    warmup = run.data.warmup_source
    queries = run.data.queries_per_context
    return training_batches(
        make_sources(run.data.source, tokenizer, run.train.seed, queries),
        builder,
        shapes,
        rows,
        run.train.grad_accum_steps,
        seed=run.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        warmup_sources=make_sources(warmup, tokenizer, run.train.seed, queries) if warmup else (),
        warmup_records=run.data.warmup_steps * rows * run.train.grad_accum_steps,
        bad_records=run.data.bad_records,
        max_bad_share=run.data.max_bad_share,
        max_dropped_share=run.data.max_dropped_share,
        stats=stats,
    )


def initial_params(init_from: str | Path, trainer: Trainer, identity: dict[str, Any], fresh: TrainState | None = None):
    """The hypernetwork variables (parameters and statistics) that ``init_from`` names, placed on
    ``trainer``'s mesh: a pretrained hypernetwork (a shipped name or a ``save_pretrained`` directory) or the
    latest checkpoint of a training run's workdir (or its ``checkpoints`` folder). Given a ``fresh`` state (a
    partial start; a pretrained hypernetwork only), the variables of other names or shapes keep its values,
    and the names taken are logged.

    Raises FileNotFoundError for a run without checkpoints, CheckpointMismatchError for another base model
    and ValueError when that hypernetwork has other parameter shapes than ``trainer``'s (without ``partial``).
    """
    shapes = lambda hyper: jax.tree.map(lambda x: x.shape, abstract_hypernet(hyper, trainer.base))

    def require_same_shapes(saved: HypernetConfig):
        if shapes(saved) != shapes(trainer.hyper):
            raise ValueError(f"init_from={str(init_from)!r}: its hypernetwork's parameter shapes differ from this run's hypernet config")

    state = trainer.abstract_state()
    abstract = join_stats(state.params, state.stats)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    if (Path(init_from) / pretrained.WEIGHTS_FILE).is_file() or str(init_from) in pretrained.available():
        directory = pretrained.resolve(init_from)
        saved = pretrained.read_config(directory)
        check_base(saved["base_identity"], identity, directory)
        if fresh is not None:
            variables, taken = pretrained.load_matching(directory, saved, jax.device_get(join_stats(fresh.params, fresh.stats)))
            log.info("init_from %s: took %d of %d variables (%s)", init_from, len(taken), len(jax.tree.leaves(abstract)), ", ".join(taken))
            return jax.device_put(variables, shardings)
        require_same_shapes(HypernetConfig.from_dict(saved["hypernet"])[0])
        return jax.device_put(pretrained.load_variables(directory, saved, abstract), shardings)
    if fresh is not None:
        raise ValueError(f"init_partial needs init_from to name a pretrained hypernetwork, not the run {str(init_from)!r}")
    checkpoints = Checkpointer.of_run(init_from)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"init_from={str(init_from)!r} holds no checkpoint")
        require_same_shapes(RunConfig.from_json(checkpoints.read_json("config", step)).hypernet)
        return checkpoints.restore_params(abstract, identity, step)
    finally:
        checkpoints.close()


def train(
    run: RunConfig,
    workdir: str | Path,
    base: BaseModel | None = None,
    evaluator: Evaluator | None = None,
    stop_after: int | None = None,
    resume_step: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) meta-training in ``workdir``; returns the final metrics, with ``stopped_by`` naming
    the signal that stopped the run early (SIGTERM or SIGINT; a checkpoint is saved first) or None.

    ``base`` defaults to loading ``run.model`` as ``run.base_execution`` says; ``evaluator`` (None: no
    evaluation) runs every ``run.eval_every`` steps and at the end; ``stop_after`` ends this call (with a
    checkpoint) after that many steps, so training can continue later from the same workdir.
    Writes ``config.json``, ``metrics.jsonl``, TensorBoard events under ``tb/`` and checkpoints under
    ``checkpoints/``. A run resumes from its newest checkpoint that verifies (or ``resume_step``); corrupt
    newer ones are set aside as ``checkpoints/<step>.corrupt``, never deleted.

    Raises:
      WorkdirLockedError: another live run trains in ``workdir``.
      CheckpointMismatchError: the checkpoints belong to another base model or hypernetwork config.
      CheckpointCorruptError: no checkpoint verifies (or ``resume_step``'s does not).
      FloatingPointError: ``train.max_nonfinite_steps`` steps in a row had non-finite gradients (they were
        skipped; the last checkpoint is intact).
      ValueError: a bad record under ``data.bad_records="stop"``, or more bad records or dropped examples
        than ``data.max_bad_share`` / ``data.max_dropped_share`` allow (the message names the record or limit).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(run, workdir, base, evaluator, stop_after, resume_step)


def _check_resumable(run: RunConfig, checkpoints: Checkpointer) -> None:
    """Raises CheckpointMismatchError when the run in the checkpoints has another hypernetwork config; warns
    when its schedule differs (the learning rate then jumps)."""
    try:
        saved = RunConfig.from_json(checkpoints.read_json("config"))
    except CheckpointCorruptError:
        return  # the restore then says which step is corrupt
    differing = [f"{f.name} is {getattr(saved.hypernet, f.name)!r} there, {getattr(run.hypernet, f.name)!r} here"
                 for f in dataclasses.fields(run.hypernet) if getattr(saved.hypernet, f.name) != getattr(run.hypernet, f.name)]
    if differing:
        raise CheckpointMismatchError(
            f"the checkpoints in {checkpoints.directory} were trained with a different hypernetwork: {'; '.join(differing)}; "
            "use another workdir, or init_from to start from them"
        )
    schedule = ("learning_rate", "min_learning_rate", "warmup_steps", "steps")
    changed = {k: (getattr(saved.train, k), getattr(run.train, k)) for k in schedule if getattr(saved.train, k) != getattr(run.train, k)}
    if changed:
        log.warning("resuming with another schedule (%s): the learning rate jumps at the resumed step",
                    ", ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changed.items()))


def _train(run: RunConfig, workdir: Path, base, evaluator, stop_after, resume_step) -> dict[str, Any]:
    base = base or run.base_execution.load(run.model)
    trainer = Trainer(run.hypernet, base.config, run.train, execution=run.execution)
    base_params = trainer.put_base_params(base.params)
    trainer.compile(trainer.abstract_state(), base_params, abstract_batch(run, trainer.batch_sharding))
    identity = base_identity(run.model, base.config, base.params)

    record_stats = RecordStats()
    batches = iter(training_batch_stream(run, base, record_stats))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=run.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        _check_resumable(run, checkpoints)
        state, step = checkpoints.restore(trainer.abstract_state(), identity, batches, step=resume_step)
        record_stats.restore(checkpoints.read_record_stats(step))
        if resume_step is None and checkpoints.rejected_steps and jax.process_index() == 0:
            for path in checkpoints.set_aside(checkpoints.rejected_steps):
                log.warning("set aside the corrupt checkpoint as %s", path)
        log.info("resumed from step %d", step)
    elif resume_step is not None:
        raise FileNotFoundError(f"resume_step={resume_step}: {workdir / 'checkpoints'} holds no checkpoint")
    elif run.init_from:
        # A fresh optimizer state is zeros whatever the parameters' values, so only the parameters change.
        fresh = trainer.init_state()
        params, stats = split_stats(initial_params(run.init_from, trainer, identity, fresh if run.init_partial else None))
        if run.init_without_b:
            params = dict(params, head=jax.jit(without_generated_b, static_argnums=(1, 2))(params["head"], run.hypernet, trainer.base))
        state, step = fresh.replace(params=params, stats=stats), 0
        log.info("initialised the hypernetwork from %s", run.init_from)
    else:
        state, step = trainer.init_state(), 0
    (workdir / "config.json").write_text(json.dumps(run.to_json(), indent=2))
    writer = MetricsWriter(workdir)

    evaluates = evaluator is not None and run.eval_every > 0
    if evaluates and step == 0:
        writer.write(0, evaluator.baseline())

    saved_at = step if checkpoints.latest_step() == step else None

    def save(force: bool = False) -> None:
        nonlocal saved_at
        if saved_at != step:  # the last step may also be a periodic checkpoint's
            checkpoints.save(step, state, run.to_json(), identity, data_iterator=batches, record_stats=record_stats.as_dict(), force=force)
            saved_at = step

    limit = run.time_limit_minutes * 60 or float("inf")
    last_step = run.train.steps if stop_after is None else min(run.train.steps, step + stop_after)
    trained_seconds, window_start, window_steps, window_tokens = 0.0, time.perf_counter(), 0, 0
    summary: dict[str, Any] = {}
    evaluated_at = None

    def run_eval() -> None:
        nonlocal evaluated_at
        result = evaluator(D2L(base, run.hypernet, join_stats(state.params, state.stats), run.execution))
        writer.write(step, {k: v for k, v in result.items() if isinstance(v, float)})
        log.info("step %d: %s", step, result)
        summary.update(result)
        evaluated_at = step

    try:
        with StopOnSignal() as stop, tqdm(total=run.train.steps, initial=step, desc="meta-training", disable=jax.process_index() != 0) as bar:
            while step < last_step and not stop.requested and trained_seconds < limit:
                batch = next(batches)
                window_steps += 1
                window_tokens += int(batch["ctx_mask"].sum() + batch["mask"].sum())
                state, metrics = trainer.step(state, base_params, trainer.put_batch(batch))
                step += 1
                bar.update()
                if step % run.log_every == 0 or step == last_step:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if metrics["nonfinite_steps_in_a_row"] >= run.train.max_nonfinite_steps:
                        last = checkpoints.latest_step()
                        kept = "no checkpoint was written" if last is None else f"the last checkpoint (step {last}) is intact"
                        raise FloatingPointError(
                            f"step {step}: {int(metrics['nonfinite_steps_in_a_row'])} steps in a row had non-finite loss or "
                            f"gradients (skipped; train.max_nonfinite_steps={run.train.max_nonfinite_steps}); {kept}: "
                            "lower train.learning_rate or check the data"
                        )
                    seconds = time.perf_counter() - window_start
                    trained_seconds += seconds
                    metrics.update(
                        step_seconds=seconds / window_steps,
                        tokens_per_second=window_tokens / seconds,
                        train_minutes=trained_seconds / 60,
                    )
                    if trainer.flops_per_step:
                        metrics["flops_per_second"] = trainer.flops_per_step * window_steps / seconds
                    metrics.update({f"data/{k}": v for k, v in record_stats.as_metrics().items()})
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                    summary.update(metrics)
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                if evaluates and step % run.eval_every == 0:
                    eval_start = time.perf_counter()
                    run_eval()
                    window_start += time.perf_counter() - eval_start  # evaluation is not training time
                if run.checkpoint_every and step % run.checkpoint_every == 0:
                    save()
            if evaluates and evaluated_at != step and not stop.requested:
                run_eval()
            save(force=True)
            checkpoints.wait()
    finally:
        writer.close()
        checkpoints.close()
    summary["step"] = step
    summary["stopped_by"] = stop.received
    return summary
