"""The meta-training step: document chunks -> adapters -> student loss against the teacher, jitted once.

A batch is a dict of arrays whose first two axes are ``[A, B]``: A micro-batches (gradient
accumulation) of B (context, query) rows. Per micro-batch:

  ctx_tokens, ctx_mask        [N, Tc]  the chunks of the B contexts (right-padded; N >= chunks in use)
  chunk_document, chunk_slot  [N]      owning context (B marks a padding chunk) and position in it
  num_chunks                  [B]      chunks per context
  tokens, mask                [B, Ts]  student sequence without the context (right-padded)
  label_positions             [B, P]   positions whose logits predict the labels (label index - 1)
  labels, label_mask          [B, P]   label token ids and which are real
  online teacher:  teacher_tokens, teacher_mask [B, Tt], teacher_label_positions [B, P]
  offline teacher: teacher_log_probs, teacher_ids [B, P, K]

The query arrays (``tokens`` and those after it) may hold ``Q * B`` rows instead, Q questions per context
(``data.queries_per_context``): rows ``g * Q .. g * Q + Q - 1`` ask about context g and share its adapter.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from d2l_jax import sharding
from d2l_jax.data.examples import collate
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.hypernet.hypernet import batch_centered_document_adapters, document_adapters, init_hypernet, join_stats, split_stats
from d2l_jax.models.decoder import Decoder, label_logits
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layout import split_layers
from d2l_jax.train import losses
from d2l_jax.train.config import TrainConfig
from d2l_jax.train.distillation import teacher_targets
from d2l_jax.train.flops import train_step_flops
from d2l_jax.train.optimizer import apply_finite_update, init_skipping_state, learning_rate_schedule, make_optimizer


@struct.dataclass
class TrainState:
    """What a training step changes: the step count, the hypernetwork's parameters, its statistics (the
    head's running input mean, ``{}`` without ``center_head_input``; no optimizer sees them) and the
    optimizer state."""

    step: jax.Array
    params: Any
    stats: Any
    opt_state: Any


def micro_batch_loss(
    params, base_params, batch, *, hyper: HypernetConfig, base: DecoderConfig, train: TrainConfig, execution: HypernetExecution = HypernetExecution()
):
    """(total loss, metrics) of one micro-batch; ``params`` are the hypernetwork's variables (parameters and
    statistics, see ``hypernet.join_stats``); gradients flow into them only.

    With ``center_head_input`` (and the mean not frozen) the metrics carry ``head_input_mean``, the batch
    mean the head centred on."""
    base_params = jax.lax.stop_gradient(base_params)
    chunks, length = batch["ctx_tokens"].shape
    group = train.encoder_chunk_rows or chunks
    if chunks % group:
        raise ValueError(f"train.encoder_chunk_rows={group} does not divide the {chunks} chunk rows of a micro-batch")
    chunks = (
        batch["ctx_tokens"].reshape(-1, group, length),
        batch["ctx_mask"].reshape(-1, group, length),
        batch["chunk_document"],
        batch["chunk_slot"],
        batch["num_chunks"],
    )
    if hyper.center_head_input and not train.freeze_head_input_mean:
        lora, mean = batch_centered_document_adapters(hyper, base, base_params, params, *chunks, execution=execution)
        aux = {"head_input_mean": mean}
    else:
        lora, aux = document_adapters(hyper, base, base_params, params, *chunks, execution=execution), {}
    first_adapted = base.num_layers - hyper.num_adapted(base)
    queries = batch["tokens"].shape[0] // batch["num_chunks"].shape[0]
    rows_lora = jax.tree.map(lambda x: jnp.repeat(x, queries, axis=0), lora) if queries > 1 else lora
    logits = label_logits(base, base_params, batch["tokens"], batch["mask"], batch["label_positions"], rows_lora, first_adapted)
    mask = batch["label_mask"]
    distillation = train.distillation
    targets = batch  # labels, and the offline teacher's targets
    if train.teacher == "online" and distillation.uses_teacher:
        targets = teacher_targets(
            base, base_params, batch["teacher_tokens"], batch["teacher_mask"], batch["teacher_label_positions"], distillation
        )
    distill = distillation.loss(logits, targets, mask)
    l1 = losses.lora_l1(lora, batch["num_chunks"], hyper.lora_rank, hyper.use_bias)
    total = distill + train.l1_coef * l1
    return total, {"loss": total, "distill": distill, "l1": l1, "label_tokens": mask.sum(), **aux}


def train_step(state: TrainState, base_params, batch, *, hyper, base, train, optimizer, execution):
    """One optimizer update from ``A`` micro-batches (gradients and metrics averaged over them)."""
    loss = functools.partial(micro_batch_loss, hyper=hyper, base=base, train=train, execution=execution)
    grad_fn = jax.value_and_grad(lambda params, *args: loss(join_stats(params, state.stats), *args), has_aux=True)

    def grads_and_metrics(micro):
        (_, metrics), grads = grad_fn(state.params, base_params, micro)
        return grads, metrics

    micro_batches = next(iter(batch.values())).shape[0]
    if micro_batches == 1:
        grads, metrics = grads_and_metrics(jax.tree.map(lambda x: x[0], batch))
    else:
        shapes = jax.eval_shape(grads_and_metrics, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        add = lambda carry, micro: (jax.tree.map(jnp.add, carry, grads_and_metrics(micro)), None)
        (grads, metrics), _ = jax.lax.scan(add, zeros, batch)
        grads, metrics = jax.tree.map(lambda x: x / micro_batches, (grads, metrics))
    metrics["label_tokens"] = metrics["label_tokens"] * micro_batches
    grad_norm = optax.tree.norm(grads)
    params, opt_state = apply_finite_update(optimizer, grads, state.opt_state, state.params, grad_norm)
    stats = state.stats
    if "head_input_mean" in metrics:
        updated = _updated_head_input_mean(state, metrics.pop("head_input_mean"))
        stats = jax.tree.map(lambda new, old: jnp.where(opt_state.last_finite, new, old), updated, stats)
    metrics["nonfinite_steps_in_a_row"] = opt_state.notfinite_count
    metrics["nonfinite_steps"] = opt_state.total_notfinite
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = learning_rate_schedule(train)(state.step)
    return TrainState(step=state.step + 1, params=params, stats=stats, opt_state=opt_state), metrics


HEAD_INPUT_MOMENTUM = 0.9


def _updated_head_input_mean(state: TrainState, batch_mean) -> dict:
    """The statistics with ``input_mean`` <- its running mean (momentum ``HEAD_INPUT_MOMENTUM``) with this
    step's mean over real chunks (what the step centred on), for use after training; the first step sets it."""
    momentum = jnp.where(state.step == 0, 0.0, HEAD_INPUT_MOMENTUM)
    return dict(state.stats, input_mean=momentum * state.stats["input_mean"] + (1 - momentum) * batch_mean)


def _return_freed_heap() -> None:
    """Hands the heap memory that the process has freed back to the OS (glibc's ``malloc_trim``; nothing
    elsewhere). The compiler frees its many small allocations but glibc keeps them, while the step's large
    buffers are mapped afresh, so without this the two add up in the process's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Trainer:
    """The sharded, jitted meta-training step for one (hypernet, base model, training) configuration.

    ``init_state`` creates the training state directly on the mesh; ``step(state, batch)`` runs one
    update with the state donated. The step is compiled once, for the shapes of the first batch
    (batches have static shapes); a batch of other shapes is an error.
    """

    def __init__(
        self,
        hyper: HypernetConfig,
        base: DecoderConfig,
        train: TrainConfig,
        mesh: jax.sharding.Mesh | None = None,
        execution: HypernetExecution = HypernetExecution(),
    ):
        hyper.check_base(base)
        self.hyper, self.base, self.train, self.execution = hyper, base, train, execution
        self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(train.mesh))
        self.optimizer = make_optimizer(train)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if train.batch_size % rows:
            raise ValueError(f"batch_size={train.batch_size} must be a multiple of the data x fsdp mesh size {rows}")

        boxed_params, boxed_stats = split_stats(jax.eval_shape(lambda: init_hypernet(hyper, base, jax.random.key(0))))
        boxed_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=boxed_params,
            stats=boxed_stats,
            opt_state=jax.eval_shape(functools.partial(init_skipping_state, self.optimizer), boxed_params),
        )
        self.state_shardings = sharding.logical_shardings(boxed_state, self.mesh)
        boxed_base = jax.eval_shape(
            lambda: Decoder(base).init(jax.random.key(0), *(jnp.zeros((1, 1), jnp.int32),) * 3, compute_logits=True)
        )["params"]
        one_layer = lambda box, i: nn.Partitioned(jax.ShapeDtypeStruct(box.value.shape[1:], box.value.dtype), box.names[1:], box.mesh)
        boxed_base = split_layers(boxed_base, base.scan_unroll, one_layer, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        self.base_shardings = sharding.logical_shardings(boxed_base, self.mesh)
        self._base_shapes = nn.unbox(boxed_base)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        step = functools.partial(train_step, hyper=hyper, base=base, train=train, optimizer=self.optimizer, execution=execution)
        self._step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.base_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        # Parameters and optimizer state are made by two programs, so that the parameter initialisers'
        # temporaries are gone before the optimizer's moments exist (one program held both: +0.8 GB peak).
        param_shardings = (self.state_shardings.params, self.state_shardings.stats)
        self._init_params = jax.jit(self._fresh_params, out_shardings=param_shardings)
        self._init_opt_state = jax.jit(
            functools.partial(init_skipping_state, self.optimizer), out_shardings=self.state_shardings.opt_state
        )
        self._compiled = None
        self.flops_per_step: float | None = None

    def _fresh_params(self, key):
        return split_stats(nn.unbox(init_hypernet(self.hyper, self.base, key)))

    def _fresh_state(self, key) -> TrainState:
        params, stats = self._fresh_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, stats=stats, opt_state=init_skipping_state(self.optimizer, params))

    def init_state(self, key=None) -> TrainState:
        """A fresh training state (hypernetwork initialised from ``train.seed`` unless ``key`` is given)."""
        with sharding.mesh_rules(self.mesh):
            params, stats = self._init_params(key if key is not None else jax.random.key(self.train.seed))
            opt_state = self._init_opt_state(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step=step, params=params, stats=stats, opt_state=opt_state)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, without allocating it (the restore target)."""
        shapes = jax.eval_shape(self._fresh_state, jax.random.key(0))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings)

    def abstract_base_params(self, dtype: str | None = None):
        """The frozen base parameters' shapes (float32, or ``dtype``) and shardings, without allocating them."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype or x.dtype), sharding=s), self._base_shapes, self.base_shardings
        )

    def put_base_params(self, base_params):
        """The frozen base parameters placed on the mesh (sharded as the logical rules say; split by layer
        when the base's layer loop is unrolled fully, as ``BaseExecution.load`` holds them)."""
        return jax.device_put(split_layers(base_params, self.base.scan_unroll), self.base_shardings)

    def put_batch(self, batch: dict):
        """This process's part of a batch (``[A, B / processes, ...]`` numpy arrays) as global arrays.

        Each process collates its own rows, so its ``chunk_document`` counts its own rows (padding chunks
        = its row count); with several processes these become indices of the global rows.
        """
        if jax.process_count() > 1 and "chunk_document" in batch:
            batch = dict(batch, chunk_document=self._global_chunk_owners(batch["chunk_document"], batch["num_chunks"].shape[1]))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

    def _global_chunk_owners(self, chunk_document, local_rows: int):
        """Process-local row indices -> global ones: the local rows are, in order, the global rows this
        process's devices hold (``make_array_from_process_local_data``'s layout); padding -> all rows."""
        global_rows = local_rows * jax.process_count()
        slices = self.batch_sharding.addressable_devices_indices_map((1, global_rows)).values()
        rows = np.array(sorted({i for index in slices for i in range(*index[1].indices(global_rows))}))
        if len(rows) != local_rows:
            raise ValueError(f"this process holds {len(rows)} of {global_rows} rows but was given {local_rows}")
        local = np.asarray(chunk_document)
        return np.where(local < local_rows, rows[np.clip(local, 0, local_rows - 1)], global_rows).astype(local.dtype)

    def compile(self, state: TrainState, base_params, batch: dict):
        """Compiles the step for these argument shapes (done by the first ``step``); later batches must
        have the same shapes. Arguments may be ``jax.ShapeDtypeStruct`` with shardings (``abstract_state``):
        compiling before the state is allocated keeps the compiler's transient host memory (about 0.8 GB for
        the NIAH step on CPU) from adding to the training's peak. Sets ``flops_per_step`` (analytic, see
        ``d2l_jax.train.flops``)."""
        with sharding.mesh_rules(self.mesh):
            self._compiled = self._step.lower(state, base_params, batch).compile()
        _return_freed_heap()
        self.flops_per_step = train_step_flops(self.hyper, self.base, self.train, batch)
        return self._compiled

    def step(self, state: TrainState, base_params, batch: dict) -> tuple[TrainState, dict]:
        """One update; ``state`` is donated (do not reuse it). Metrics are device scalars."""
        compiled = self._compiled or self.compile(state, base_params, batch)
        return compiled(state, base_params, batch)


def abstract_batch(run, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch of ``run`` as ShapeDtypeStructs: the pipeline's own ``collate`` is run on
    placeholder examples, so the keys, shapes and dtypes are exactly those training feeds."""
    shapes = run.batch_shapes()
    example: dict[str, Any] = {"chunks": [[1]], "tokens": [1, 2], "label_start": 1, "label_end": 2}
    if run.train.uses_teacher and run.train.teacher == "online":
        example.update(teacher_tokens=[1, 2], teacher_label_start=1)
    if run.train.uses_teacher and run.train.teacher == "offline":
        example.update(teacher_log_probs=np.zeros((1, shapes.top_k), np.float32), teacher_ids=np.zeros((1, shapes.top_k), np.int32))
    count = run.train.batch_size * run.train.grad_accum_steps
    batch = collate([example] * count, shapes, run.train.grad_accum_steps)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
