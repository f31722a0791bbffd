"""A meta-training run's configuration: how it trains (``TrainConfig``, defaults = the reference's,
reference-facts section 6), its data (``DataConfig``), its periodic evaluation (``EvaluatorConfig``) and
the whole run (``RunConfig``, what ``config.json`` holds and an experiment file describes)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from d2l_jax.data.examples import BatchShapes
from d2l_jax.data.pipeline import BAD_RECORD_POLICIES
from d2l_jax.data.sources import GROUPING_SOURCES, SourceConfig
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.models.base_model import BaseExecution
from d2l_jax.train.distillation import DistillationLoss

TEACHERS = ("online", "offline")
FIRST_MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the hypernetwork is meta-trained.

    Loss: ``loss`` is ``top_k_kl`` (cross-entropy to the teacher's unrenormalised top-``top_k`` mass),
      ``full_kl`` (KL over the vocabulary; online teacher only) or ``ce`` (labels only, no teacher);
      ``teacher`` is ``online`` (the frozen base with the document in its prompt, inside the step) or
      ``offline`` (top-k log-probabilities and ids stored in the batch); ``l1_coef`` weighs the L1 of
      the combined adapters.
    Optimiser: AdamW (``learning_rate``, ``b1``, ``b2``, ``eps``, ``weight_decay`` except on norms,
      scalers, biases and latent queries), linear warmup over ``warmup_steps`` then cosine to
      ``min_learning_rate`` at ``steps``, global-norm clipping at ``max_grad_norm``; the Perceiver's
      updates are multiplied by ``perceiver_lr_scale`` (0 freezes it at its initialisation).
      ``first_moment_dtype="bfloat16"`` keeps AdamW's first moment in bfloat16 (this project's addition,
      off by default: a sixth of the training state, but on the CPU the step's temporaries grow by more).
    Batch: ``batch_size`` (query, context) rows per micro-batch, ``grad_accum_steps`` micro-batches per
      update (gradients averaged, one optimizer step).
    Encoder: ``encoder_chunk_rows`` chunk rows of a micro-batch go through the context encoder and Perceiver
      at a time (0: all at once; it must divide the micro-batch's chunk rows); groups holding only padding
      chunks (batches put them last) are skipped, which saves the work on padding when contexts have fewer
      chunks than the batch reserves.
    Head centring (``HypernetConfig.center_head_input``): the head centres its inputs on the batch's mean
      and keeps a running mean for inference; ``freeze_head_input_mean`` centres on the stored mean and
      leaves it as it is, for fine-tuning on batches whose chunk mix differs from the first run's (batches
      of long documents alone, whose mean lacks the needle share the stored mean was learned with).
    Non-finite steps: a step whose gradients are not finite (their global norm is not; a norm beyond
      float32's range counts too) is skipped (parameters, moments and statistics stay as they were) and
      counted; after ``max_nonfinite_steps`` such steps in a row the run stops with an error, its last
      checkpoint intact.
    Mesh: ``mesh`` maps ``data``/``fsdp``/``tensor`` to sizes (``data`` defaults to the remaining devices).
    """

    loss: str = "top_k_kl"
    teacher: str = "online"
    top_k: int = 16
    l1_coef: float = 0.1
    learning_rate: float = 4e-5
    min_learning_rate: float = 1e-7
    warmup_steps: int = 100
    steps: int = 80_000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    perceiver_lr_scale: float = 1.0
    first_moment_dtype: str = "float32"
    batch_size: int = 1
    grad_accum_steps: int = 1
    encoder_chunk_rows: int = 0
    freeze_head_input_mean: bool = False
    max_nonfinite_steps: int = 10
    seed: int = 42
    mesh: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        self.distillation  # validates loss and top_k
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r}; expected one of {TEACHERS}")
        if self.loss == "full_kl" and self.teacher == "offline":
            raise ValueError("loss='full_kl' needs the online teacher (offline targets store only the top-k)")
        for name in ("top_k", "steps", "batch_size", "grad_accum_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.first_moment_dtype not in FIRST_MOMENT_DTYPES:
            raise ValueError(f"first_moment_dtype={self.first_moment_dtype!r}; expected one of {FIRST_MOMENT_DTYPES}")
        if self.perceiver_lr_scale < 0:
            raise ValueError(f"perceiver_lr_scale must be >= 0 (0 freezes the Perceiver), got {self.perceiver_lr_scale}")
        if self.encoder_chunk_rows < 0:
            raise ValueError(f"encoder_chunk_rows must be >= 0 (0: all chunks at once), got {self.encoder_chunk_rows}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if isinstance(self.mesh, dict):
            object.__setattr__(self, "mesh", tuple(sorted(self.mesh.items())))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def distillation(self) -> DistillationLoss:
        """The loss strategy this run trains with (shared with context distillation)."""
        return DistillationLoss(self.loss, self.top_k)

    @property
    def uses_teacher(self) -> bool:
        return self.distillation.uses_teacher


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training records come from, and the static batch shapes.

    source: the records (``data.sources``: a source name and its options).
    warmup_source / warmup_steps: a curriculum: about the first ``warmup_steps`` steps draw from
      ``warmup_source`` instead (about: examples that do not fit the shapes are skipped).
    chunk_probs / min_chunk_len: the reference's training-time chunk-count sampling (empty: no splitting).
    bad_records: ``"skip"`` (count and warn about a record that cannot be used, and go on) or ``"stop"``.
    max_bad_share / max_dropped_share: training stops with an error once the share of bad records, or of
      examples dropped for not fitting the batch shapes, passes this (judged from 100 records on).
    queries_per_context: questions of one context that share its internalization in a step (this project's
      addition; ``qa`` sources only): a batch holds ``train.batch_size`` contexts and that many query rows
      for each, the adapter generated once per context.
    The rest are ``BatchShapes`` fields; ``max_chunk_len`` comes from the hypernetwork config.
    """

    source: SourceConfig
    warmup_source: SourceConfig | None = None
    warmup_steps: int = 0
    chunk_probs: tuple[tuple[int, float], ...] = ()
    min_chunk_len: int = 25
    chunks_per_context: int = 1
    queries_per_context: int = 1
    max_student_len: int = 48
    max_labels: int = 8
    max_teacher_len: int = 0
    bad_records: str = "skip"
    max_bad_share: float = 0.01
    max_dropped_share: float = 0.5

    def __post_init__(self):
        if self.warmup_steps < 0 or bool(self.warmup_steps) != (self.warmup_source is not None):
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_source must be given together (steps >= 1)")
        if self.bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"data.bad_records={self.bad_records!r}; expected one of {BAD_RECORD_POLICIES}")
        for name in ("max_bad_share", "max_dropped_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a share in [0, 1]")
        if self.queries_per_context < 1:
            raise ValueError(f"data.queries_per_context={self.queries_per_context} must be >= 1")
        if self.queries_per_context > 1:
            others = sorted({s.name for s in (self.source, self.warmup_source) if s is not None} - set(GROUPING_SOURCES))
            if others:
                raise ValueError(
                    f"data.queries_per_context={self.queries_per_context} needs sources that group a context's questions "
                    f"({', '.join(GROUPING_SOURCES)}), not {others}"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = {k: _tuples(v) for k, v in d.items()}
        d["source"] = SourceConfig(**d["source"])
        if d.get("warmup_source") is not None:
            d["warmup_source"] = SourceConfig(**d["warmup_source"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    """The periodic evaluation of a run: ``name`` (a key of ``d2l_jax.eval.evaluators.EVALUATORS``) and its
    ``options``."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a meta-training run needs (``eval_every``/``checkpoint_every``/``log_every`` in steps,
    0 disables; ``time_limit_minutes`` stops training, evaluation excluded, after that long; 0 = none).

    ``hypernet`` is what the checkpoint is; ``execution`` and ``base_execution`` say how the hypernetwork
    and the frozen base model run (any checkpoint runs under any execution). ``evaluator`` (None: none)
    is evaluated every ``eval_every`` steps.

    ``init_from``: a pretrained hypernetwork (a shipped name such as ``"smollm2-135m-niah"`` or a
    ``save_pretrained`` directory) or a training workdir (or its ``checkpoints`` folder) whose latest
    hypernetwork parameters start this run, with a fresh optimizer and schedule (fine-tuning on other data, e.g. longer contexts);
    ignored once this run has checkpoints of its own, which resume it. ``init_partial``: take from a pretrained
    ``init_from`` only the variables of this run's names and shapes (e.g. a needle hypernetwork's Perceiver
    under a head of another layout); the rest start fresh. ``init_without_b``: start from
    ``init_from`` with the head's B outputs and the bias B at zero (``hypernet.head.without_generated_b``), so
    the student begins as the base model while the hypernetwork keeps how it reads documents.
    """

    model: str
    hypernet: HypernetConfig
    train: TrainConfig
    data: DataConfig
    execution: HypernetExecution = HypernetExecution()
    base_execution: BaseExecution = BaseExecution()
    evaluator: EvaluatorConfig | None = None
    eval_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    time_limit_minutes: float = 0.0
    init_from: str = ""
    init_partial: bool = False
    init_without_b: bool = False

    def __post_init__(self):
        if (self.init_partial or self.init_without_b) and not self.init_from:
            raise ValueError("init_partial and init_without_b change what init_from loads: give init_from too")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def batch_shapes(self) -> BatchShapes:
        """The static shapes every training batch of this run is padded to."""
        return BatchShapes(
            max_chunk_len=self.hypernet.max_chunk_len,
            chunks_per_context=self.data.chunks_per_context,
            queries_per_context=self.data.queries_per_context,
            max_student_len=self.data.max_student_len,
            max_labels=self.data.max_labels,
            max_teacher_len=self.data.max_teacher_len,
            top_k=self.train.top_k,
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunConfig":
        """From ``to_json``'s layout, or the one checkpoints had before the execution configs and named
        sources (read as the same run)."""
        d = _upgrade_legacy(dict(d))
        hypernet, legacy_execution = HypernetConfig.from_dict(d.pop("hypernet"))
        execution = HypernetExecution(**{**legacy_execution, **(d.pop("execution", None) or {})})
        evaluator = d.pop("evaluator", None)
        return cls(
            hypernet=hypernet,
            train=TrainConfig(**{k: _tuples(v) for k, v in d.pop("train").items()}),
            data=DataConfig.from_dict(d.pop("data")),
            execution=execution,
            base_execution=BaseExecution(**(d.pop("base_execution", None) or {})),
            evaluator=EvaluatorConfig(evaluator["name"], {k: _tuples(v) for k, v in evaluator.get("options", {}).items()}) if evaluator else None,
            **d,
        )


def _upgrade_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """The layout before named sources, evaluators and execution configs, in today's layout."""
    if "base" in d:  # experiments' base-model execution section
        d["base_execution"] = d.pop("base")
    if "chunk_group_size" in d.get("train", {}):
        d["train"] = dict(d["train"])
        d["train"]["encoder_chunk_rows"] = d["train"].pop("chunk_group_size")
    data = d.get("data", {})
    if "source" in data and isinstance(data["source"], str):
        data = dict(data)
        source = data.pop("source")
        bins, eval_bin, records = data.pop("niah_bins", None), data.pop("niah_eval_bin", None), data.pop("niah_records", None)
        warmup_bins, warmup_steps = data.pop("niah_warmup_bins", ()), data.pop("niah_warmup_steps", 0)
        contexts = d.pop("eval_contexts", 48)
        if source == "niah":
            data["source"] = {"name": "niah", "options": {"bins": bins, **({"records": records} if records not in (None, 1_000_000) else {})}}
            if warmup_steps:
                data["warmup_source"] = {"name": "niah", "options": {"bins": warmup_bins}}
                data["warmup_steps"] = warmup_steps
            if eval_bin is not None and d.get("eval_every"):
                d.setdefault("evaluator", {"name": "niah", "options": {"bin": eval_bin, "contexts": contexts}})
        else:
            data["source"] = {"name": "records", "options": {"path": source}}
        d["data"] = data
    d.pop("eval_contexts", None)
    return d


def parse_experiment(settings: dict[str, Any]) -> RunConfig:
    """The run an experiment file's JSON-like dict (``config.to_json()``) describes."""
    return RunConfig.from_json(settings)
