"""The meta-training loop: data, sharded steps, metrics, periodic NIAH evaluation, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
from tqdm.auto import tqdm

from d2l_jax.api import D2L
from d2l_jax.data.chunking import document_affixes
from d2l_jax.data.examples import BatchShapes, ChunkSampling, TrainExampleBuilder
from d2l_jax.data.niah import NIAHSource
from d2l_jax.data.pipeline import RecordSource, training_batches
from d2l_jax.eval import niah
from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.hypernet.hypernet import init_hypernet
from d2l_jax.models.base_model import BaseModel, load_base_model
from d2l_jax.train.checkpoint import Checkpointer, base_identity
from d2l_jax.train.config import TrainConfig
from d2l_jax.train.step import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training records come from and the static batch shapes.

    source: ``"niah"`` (generated needle-in-a-haystack contexts, mixed equally from the token-length bins
      ``niah_bins``; evaluated on ``niah_eval_bin``) or a ``.jsonl`` / ``.parquet`` file of
      ``context, prompt, response`` records.
    niah_warmup_bins / niah_warmup_steps: a curriculum; the first (about: examples that do not fit the
      shapes are skipped) ``niah_warmup_steps`` steps draw from these bins instead of ``niah_bins``.
    chunk_probs / min_chunk_len: the reference's training-time chunk-count sampling (empty: no splitting).
    The rest are ``BatchShapes`` fields; ``max_chunk_len`` comes from the hypernetwork config.
    """

    source: str = "niah"
    niah_bins: tuple[tuple[int, int], ...] = ((32, 256),)
    niah_eval_bin: tuple[int, int] = (32, 256)
    niah_records: int = 1_000_000
    niah_warmup_bins: tuple[tuple[int, int], ...] = ()
    niah_warmup_steps: int = 0
    chunk_probs: tuple[tuple[int, float], ...] = ()
    min_chunk_len: int = 25
    chunks_per_context: int = 1
    max_student_len: int = 48
    max_labels: int = 8
    max_teacher_len: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a meta-training run needs (``eval_every``/``checkpoint_every``/``log_every`` in steps,
    0 disables; ``time_limit_minutes`` stops training, evaluation excluded, after that long; 0 = none).

    ``init_from``: a training workdir (or its ``checkpoints`` folder) whose latest hypernetwork parameters
    start this run, with a fresh optimizer and schedule (fine-tuning on other data, e.g. longer contexts);
    ignored once this run has checkpoints of its own, which resume it.
    """

    model: str
    hypernet: HypernetConfig
    train: TrainConfig
    data: DataConfig
    eval_every: int = 200
    eval_contexts: int = 48
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    time_limit_minutes: float = 0.0
    init_from: str = ""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def batch_shapes(self) -> BatchShapes:
        """The static shapes every training batch of this run is padded to."""
        return BatchShapes(
            max_chunk_len=self.hypernet.max_chunk_len,
            chunks_per_context=self.data.chunks_per_context,
            max_student_len=self.data.max_student_len,
            max_labels=self.data.max_labels,
            max_teacher_len=self.data.max_teacher_len,
            top_k=self.train.top_k,
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunConfig":
        def tuples(x):
            return tuple(tuples(v) for v in x) if isinstance(x, list) else x

        parts = dict(hypernet=HypernetConfig, train=TrainConfig, data=DataConfig)
        fields = {k: v for k, v in d.items() if k not in parts}
        for name, kind in parts.items():
            fields[name] = kind(**{k: tuples(v) for k, v in d[name].items()})
        return cls(**fields)


def training_sources(data: DataConfig, tokenizer, seed: int) -> list:
    if data.source == "niah":
        return [NIAHSource(tokenizer, "train", lo, hi, data.niah_records, seed=seed) for lo, hi in data.niah_bins]
    return [RecordSource(data.source)]


def warmup_sources(data: DataConfig, tokenizer, seed: int) -> list:
    if data.niah_warmup_steps and (data.source != "niah" or not data.niah_warmup_bins):
        raise ValueError(f"niah_warmup_steps={data.niah_warmup_steps} needs source='niah' and niah_warmup_bins")
    return [NIAHSource(tokenizer, "train", lo, hi, data.niah_records, seed=seed) for lo, hi in data.niah_warmup_bins]


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files (``tb/``), from process 0 only."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


class _StopOnSignal:
    """Turns SIGTERM (TPU preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def evaluate(base: BaseModel, hyper: HypernetConfig, params, records) -> dict[str, float]:
    """NIAH exact match of the student without the document in the prompt."""
    replies = niah.student_replies(D2L(base, hyper, params), records)
    return {"eval/student_exact_match": niah.exact_match(replies, records), "eval/example_reply": replies[0]}


def training_batch_stream(run: RunConfig, base: BaseModel):
    """This process's Grain stream of training batches for ``run`` (static shapes, checkpointable)."""
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
    return training_batches(
        training_sources(run.data, tokenizer, run.train.seed),
        builder,
        shapes,
        rows,
        run.train.grad_accum_steps,
        seed=run.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        warmup_sources=warmup_sources(run.data, tokenizer, run.train.seed),
        warmup_records=run.data.niah_warmup_steps * rows * run.train.grad_accum_steps,
    )


def initial_params(init_from: str | Path, trainer: Trainer, identity: dict[str, Any]):
    """The latest hypernetwork parameters of the run in ``init_from``, placed on ``trainer``'s mesh.

    Raises FileNotFoundError without checkpoints, CheckpointMismatchError for another base model and
    ValueError when that run's hypernetwork has other parameter shapes than ``trainer``'s.
    """
    checkpoints = Checkpointer.of_run(init_from)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"init_from={str(init_from)!r} holds no checkpoint")
        saved = RunConfig.from_json(checkpoints.read_json("config", step)).hypernet
        shapes = lambda hyper: jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: nn.unbox(init_hypernet(hyper, trainer.base, jax.random.key(0)))))
        if shapes(saved) != shapes(trainer.hyper):
            raise ValueError(f"init_from={str(init_from)!r}: its hypernetwork's parameter shapes differ from this run's hypernet config")
        abstract = trainer.abstract_state().params
        return checkpoints.restore_params(abstract, identity, step)
    finally:
        checkpoints.close()


def train(run: RunConfig, workdir: str | Path, base: BaseModel | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) meta-training in ``workdir``; returns the final metrics.

    ``base`` defaults to loading ``run.model``; ``stop_after`` ends this call (with a checkpoint) after
    that many steps, so training can continue later from the same workdir.
    Writes ``config.json``, ``metrics.jsonl``, TensorBoard events under ``tb/`` and checkpoints under
    ``checkpoints/`` (resumed from the latest one when present).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = base or load_base_model(run.model)
    tokenizer = base._require_tokenizer()
    trainer = Trainer(run.hypernet, base.config, run.train)
    base_params = trainer.put_base_params(base.params)
    identity = base_identity(run.model, base.config, base.params)

    batches = iter(training_batch_stream(run, base))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=run.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, step = checkpoints.restore(trainer.abstract_state(), identity, batches)
        log.info("resumed from step %d", step)
    elif run.init_from:
        # A fresh optimizer state is zeros whatever the parameters' values, so only the parameters change.
        state, step = trainer.init_state().replace(params=initial_params(run.init_from, trainer, identity)), 0
        log.info("initialised the hypernetwork from %s", run.init_from)
    else:
        state, step = trainer.init_state(), 0
    (workdir / "config.json").write_text(json.dumps(run.to_json(), indent=2))
    writer = MetricsWriter(workdir)

    eval_records = []
    if run.eval_every and run.data.source == "niah":
        val = NIAHSource(tokenizer, "val", *run.data.niah_eval_bin, run.eval_contexts, seed=run.train.seed)
        eval_records = [val[i] for i in range(len(val))]
        if step == 0:
            floor = niah.exact_match(niah.base_replies(base, eval_records, with_context=False), eval_records)
            writer.write(0, {"eval/base_without_document_exact_match": floor})

    saved_at = checkpoints.latest_step()

    def save(force: bool = False) -> None:
        nonlocal saved_at
        if saved_at != step:  # the last step may also be a periodic checkpoint's
            checkpoints.save(step, state, run.to_json(), identity, data_iterator=batches, force=force)
            saved_at = step

    limit = run.time_limit_minutes * 60 or float("inf")
    last_step = run.train.steps if stop_after is None else min(run.train.steps, step + stop_after)
    trained_seconds, window_start, window_steps, window_tokens = 0.0, time.perf_counter(), 0, 0
    summary: dict[str, Any] = {}
    evaluated_at = None

    def run_eval() -> None:
        nonlocal evaluated_at
        result = evaluate(base, run.hypernet, state.params, eval_records)
        writer.write(step, {k: v for k, v in result.items() if isinstance(v, float)})
        log.info("step %d: %s", step, result)
        summary.update(result)
        evaluated_at = step

    with _StopOnSignal() as stop, tqdm(total=run.train.steps, initial=step, desc="meta-training", disable=jax.process_index() != 0) as bar:
        while step < last_step and not stop.requested and trained_seconds < limit:
            batch = next(batches)
            window_steps += 1
            window_tokens += int(batch["ctx_mask"].sum() + batch["mask"].sum())
            state, metrics = trainer.step(state, base_params, trainer.put_batch(batch))
            step += 1
            bar.update()
            if step % run.log_every == 0 or step == last_step:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - window_start
                trained_seconds += seconds
                metrics.update(
                    step_seconds=seconds / window_steps,
                    tokens_per_second=window_tokens / seconds,
                    train_minutes=trained_seconds / 60,
                )
                if trainer.flops_per_step:
                    metrics["flops_per_second"] = trainer.flops_per_step * window_steps / seconds
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                summary.update(metrics)
                window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
            if eval_records and step % run.eval_every == 0:
                eval_start = time.perf_counter()
                run_eval()
                window_start += time.perf_counter() - eval_start  # evaluation is not training time
            if run.checkpoint_every and step % run.checkpoint_every == 0:
                save()
        if eval_records and evaluated_at != step:
            run_eval()
        save(force=True)
        checkpoints.wait()
    writer.close()
    checkpoints.close()
    summary["step"] = step
    return summary
