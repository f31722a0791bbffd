"""Context distillation (CD): per document, a fresh LoRA trained to make the base model answer without
the document as it answers with it (reference-facts §8.2).

For every document a rank-``rank`` LoRA on ``target_modules`` of every layer is initialised as PEFT does
(``A ~ U(±1/sqrt(d_in))``, ``B = 0``, scaling ``lora_alpha / rank``) and trained with AdamW (decoupled
weight decay, cosine learning rate to 0) on the document's questions. The student is the base model with
the LoRA and only the question in its prompt; the teacher is the same frozen base model with the document
before the question. The loss (``d2l_jax.train.losses``) is the top-16 cross-entropy to the teacher, as
in the reference, averaged over the label tokens of a minibatch; the full-vocabulary KL and plain
cross-entropy on the responses are options. Student logits, teacher targets, the loss and AdamW are
meta-training's (``d2l_jax.train.distillation``, ``d2l_jax.train.optimizer``).

The responses distilled on are the teacher's greedy replies (the reference discards the answers of its
question generator), or the given answers of question-answer pairs (``response_source="given"``). The
teacher's targets depend only on the frozen base model, so they are computed once per document (the
reference recomputes the same values every minibatch).

The trained LoRA has the layout of a D2L adapter (``A[1, L, R, d_in]``, ``B[1, L, R, d_out]``) and is
returned as a :class:`d2l_jax.api.Adapter`, so ``D2L.generate``/``D2L.logits`` and
``BaseModel.generate(lora=...)`` take it unchanged.

Differences from the reference: the student prompt is this project's student format (empty system turn,
then the question; the reference keeps the instruction's trailing blank lines before the question), and
inputs longer than the base model's window raise instead of being truncated in the middle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from d2l_jax.api import Adapter
from d2l_jax.data.chunking import document_affixes, tokenize_document
from d2l_jax.data.examples import sequence_with_labels, student_messages
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.decoder import label_logits
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.generate import bucket_length
from d2l_jax.models.lora import LoRA, TARGET_MODULES
from d2l_jax.train.distillation import DistillationLoss, teacher_targets
from d2l_jax.train.optimizer import adamw, cosine_schedule

# The reference's CD budget: 300 epochs over the document's questions, minibatches of 16, AdamW at 1e-4
# (weight decay 0.01), PEFT LoRA of rank 8 on down_proj with lora_alpha 16, top-16 teacher targets.
REFERENCE_EPOCHS = 300
RESPONSE_SOURCES = ("teacher", "given")

# The reference's instruction between the document and the question in its CD teacher prompt
# ("{document}\n\n{SELF_QA_INSTRUCTION}\n\n{question}"), used with ``teacher_instruction=True``.
SELF_QA_INSTRUCTION = (
    "# System Instruction\n"
    "- The information provided is up-to-date information and/or the user instruction.\n"
    "- When the provided information is not relevant to the question, ***ignore*** it and answer the question "
    "based on your knowledge.\n"
    "- If the provided information is related to the question, incorporate it in your response.\n"
    "- If the provided information is an instruction, follow the instruction carefully.\n\n"
    "---\n\n"
    "# User Input\n"
)


# Memory --------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak resident memory of this process while its block runs.

    A background thread samples the resident set size every ``interval`` seconds (host memory, which
    is where a CPU backend keeps its arrays). ``device_peak_gb`` is the accelerator's own high-water
    mark (``peak_bytes_in_use`` since the process started) where the backend reports it, else None.

    Attributes (after the block): ``baseline_gb`` (resident memory on entry), ``peak_gb``.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline_gb = self.peak_gb = 0.0
        self.device_peak_gb: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self._peak = _rss_bytes()
        self.baseline_gb = self._peak / 1e9
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_gb = self._peak / 1e9
        try:
            stats = jax.local_devices()[0].memory_stats() or {}
        except Exception:  # backends without memory statistics
            stats = {}
        self.device_peak_gb = stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


# The LoRA and its training step ----------------------------------------------------------------------------


def init_cd_lora(config: DecoderConfig, target_modules: Sequence[str], rank: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """A fresh LoRA as PEFT initialises one: ``{"A": {module: [L, rank, d_in]}, "B": {module: [L, rank, d_out]}}``
    with A uniform in ``±1/sqrt(d_in)`` (Kaiming-uniform with a = sqrt(5)) and B zero, in float32."""
    shapes = config.projection_shapes()
    params: dict[str, dict[str, jax.Array]] = {"A": {}, "B": {}}
    for index, module in enumerate(sorted(target_modules)):
        d_in, d_out = shapes[module]
        bound = 1.0 / math.sqrt(d_in)
        params["A"][module] = jax.random.uniform(
            jax.random.fold_in(key, index), (config.num_layers, rank, d_in), jnp.float32, -bound, bound
        )
        params["B"][module] = jnp.zeros((config.num_layers, rank, d_out), jnp.float32)
    return params


def _as_lora(params: dict[str, dict[str, jax.Array]], alpha: float, rows: int) -> LoRA:
    """The trained tensors as a LoRA with ``rows`` identical batch rows."""
    expand = lambda x: jnp.broadcast_to(x[None], (rows, *x.shape))
    return LoRA(A={m: expand(a) for m, a in params["A"].items()}, B={m: expand(b) for m, b in params["B"].items()}, alpha=alpha)


@dataclasses.dataclass(frozen=True)
class _StepSpec:
    """What the compiled train step depends on besides array shapes (hashable, a static argument)."""

    alpha: float
    distillation: DistillationLoss
    b1: float
    b2: float
    eps: float
    weight_decay: float

    def optimizer(self, learning_rate) -> optax.GradientTransformation:
        """AdamW at ``learning_rate`` (traced inside the step; the optimizer state does not depend on it)."""
        return adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)


@functools.partial(jax.jit, static_argnames=("config", "spec"), donate_argnames=("lora_params", "opt_state"))
def _cd_train_step(config: DecoderConfig, spec: _StepSpec, base_params, lora_params, opt_state, batch, learning_rate):
    """One AdamW step on a minibatch ``[rows, ...]``; returns (params, optimizer state, loss before the step).

    ``learning_rate`` is traced, so neither the schedule's steps nor a new step budget recompile."""

    def loss_fn(params):
        lora = _as_lora(params, spec.alpha, batch["tokens"].shape[0])
        logits = label_logits(config, base_params, batch["tokens"], batch["mask"], batch["label_positions"], lora)
        # All label tokens of the minibatch as one row: the reference averages the loss over tokens.
        flat = lambda x: x.reshape(1, -1, *x.shape[2:])
        return spec.distillation.loss(flat(logits), jax.tree.map(flat, batch), flat(batch["label_mask"]))

    loss, grads = jax.value_and_grad(loss_fn)(lora_params)
    updates, opt_state = spec.optimizer(learning_rate).update(grads, opt_state, lora_params)
    return optax.apply_updates(lora_params, updates), opt_state, loss


_teacher_targets = jax.jit(teacher_targets, static_argnames=("base", "distillation"))


# Examples ----------------------------------------------------------------------------------------------------


def _teacher_messages(document: str, question: str, response: str | None, instruction: bool):
    prompt = f"{SELF_QA_INSTRUCTION}\n\n{question.strip()}" if instruction else question
    return student_messages(prompt, response, context=document)


def _split_questions(questions, response_source: str) -> tuple[list[str], list[str | None]]:
    asked, given = [], []
    for number, item in enumerate(questions):
        if isinstance(item, str):
            question, answer = item, None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            question, answer = item
        else:
            raise TypeError(f"question {number} must be a str or a (question, answer) pair, got {item!r}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {number} is empty")
        if response_source == "given" and not isinstance(answer, str):
            raise ValueError(f"response_source='given' needs (question, answer) pairs; question {number} has no answer")
        asked.append(question)
        given.append(answer)
    if not asked:
        raise ValueError("no questions given: context distillation needs at least one question about the document")
    return asked, given


def _pad(rows: Sequence[Sequence[int]], count: int, length: int) -> np.ndarray:
    out = np.zeros((count, length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _next_power_of_two(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _build_examples(base: BaseModel, document: str, questions: list[str], responses: list[str], instruction: bool):
    """Student sequences as right-padded arrays with one extra all-padding row at the end (minibatches are
    filled up to their static size with it), and the teacher's sequences, one row per example."""
    tokenizer = base._require_tokenizer()
    students, teachers = [], []
    for number, (question, response) in enumerate(zip(questions, responses)):
        s_ids, s_start, s_end = sequence_with_labels(tokenizer, student_messages(question, response), base.stop_token_ids)
        t_ids, t_start, t_end = sequence_with_labels(
            tokenizer, _teacher_messages(document, question, response, instruction), base.stop_token_ids
        )
        if s_ids[s_start:s_end] != t_ids[t_start:t_end]:
            raise ValueError(f"question {number}: the response tokenises differently after the teacher's prompt")
        base.check_length(len(t_ids), f"the teacher sequence of question {number} (document, question and response)")
        students.append((s_ids, s_start, s_end))
        teachers.append((t_ids, t_start))

    n, window = len(students), base.config.max_position_embeddings
    bucket = lambda k: min(bucket_length(k), max(k, window))
    student_len = bucket(max(len(s) for s, _, _ in students))
    teacher_len = bucket(max(len(t) for t, _ in teachers))
    labels = bucket_length(max(end - start for _, start, end in students))
    data = {
        "tokens": _pad([s for s, _, _ in students], n + 1, student_len),
        "mask": _pad([[1] * len(s) for s, _, _ in students], n + 1, student_len),
        "label_positions": _pad([list(range(start - 1, end - 1)) for _, start, end in students], n + 1, labels),
        "labels": _pad([s[start:end] for s, start, end in students], n + 1, labels),
        "label_mask": _pad([[1] * (end - start) for _, start, end in students], n + 1, labels),
    }
    teacher = {
        "tokens": _pad([t for t, _ in teachers], n, teacher_len),
        "mask": _pad([[1] * len(t) for t, _ in teachers], n, teacher_len),
        "label_positions": _pad(
            [list(range(t_start - 1, t_start - 1 + end - start)) for (_, t_start), (_, start, end) in zip(teachers, students)],
            n,
            labels,
        ),
    }
    return data, teacher


def _compute_teacher(base: BaseModel, teacher: dict[str, np.ndarray], loss: str, top_k: int, rows: int) -> dict[str, jax.Array]:
    """Teacher targets (``DistillationLoss(loss, top_k).targets``) for every example, ``rows`` sequences at
    a time, and zeros for the padding row (its labels are masked out, so the teacher does not read it)."""
    distillation = DistillationLoss(loss, top_k)
    if not distillation.uses_teacher:
        return {}
    total = teacher["tokens"].shape[0]
    groups = math.ceil(total / rows)
    padded = {k: np.concatenate([v, np.zeros((groups * rows - total, *v.shape[1:]), v.dtype)]) for k, v in teacher.items()}
    parts = []
    for g in range(groups):
        tokens, mask, positions = (padded[name][g * rows : (g + 1) * rows] for name in ("tokens", "mask", "label_positions"))
        parts.append(_teacher_targets(base.config, base.params, tokens, mask, positions, distillation))
    with_padding_row = lambda x: jnp.concatenate([x[:total], jnp.zeros((1, *x.shape[1:]), x.dtype)])
    return {name: with_padding_row(jnp.concatenate([p[name] for p in parts])) for name in parts[0]}


# The public entry points ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CDResult:
    """One document's context distillation.

    Attributes:
      adapter: the trained LoRA as a D2L adapter (``A[1, L, rank, d_in]``, ``B[1, L, rank, d_out]``,
        scaling ``lora_alpha / rank``); ``num_chunks`` is 1 and ``num_tokens`` the document's templated
        token count, as D2L counts it.
      losses: ``[steps]`` minibatch loss before each step.
      questions, responses: the examples distilled on (responses are the teacher's replies or the given answers).
      update_seconds: wall-clock time of the whole update (teacher replies, teacher targets, training),
        including any compilation of programs not compiled before for these shapes.
      response_seconds, teacher_seconds, train_seconds: its parts.
      peak_memory_gb / baseline_memory_gb: peak and initial resident memory of the process during the
        update; device_peak_gb: the accelerator's high-water mark where reported (else None).
    """

    adapter: Adapter
    losses: np.ndarray
    questions: list[str]
    responses: list[str]
    update_seconds: float
    response_seconds: float
    teacher_seconds: float
    train_seconds: float
    peak_memory_gb: float
    baseline_memory_gb: float
    device_peak_gb: float | None

    @property
    def steps(self) -> int:
        return len(self.losses)

    def summary(self) -> dict[str, Any]:
        """The numbers of this result (no arrays), for a results file."""
        return {
            "steps": self.steps,
            "num_examples": len(self.questions),
            "rank": self.adapter.rank,
            "first_loss": float(self.losses[0]) if self.steps else None,
            "final_loss": float(self.losses[-1]) if self.steps else None,
            "update_seconds": self.update_seconds,
            "response_seconds": self.response_seconds,
            "teacher_seconds": self.teacher_seconds,
            "train_seconds": self.train_seconds,
            "peak_memory_gb": self.peak_memory_gb,
            "baseline_memory_gb": self.baseline_memory_gb,
            "device_peak_gb": self.device_peak_gb,
        }


def distill_document(
    base: BaseModel,
    document: str,
    questions: Sequence[str | tuple[str, str]],
    *,
    steps: int | None = None,
    learning_rate: float = 1e-4,
    rank: int = 8,
    lora_alpha: float = 16.0,
    target_modules: Sequence[str] = ("down_proj",),
    batch_size: int = 16,
    loss: str = "top_k_kl",
    top_k: int = 16,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    response_source: str = "teacher",
    max_response_tokens: int = 256,
    teacher_instruction: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> CDResult:
    """Trains a fresh LoRA on ``document``'s questions so that the base model answers without the document
    as it does with it.

    Args:
      base: the frozen base model (with its tokenizer).
      document: the text the teacher sees before each question.
      questions: questions (str) or (question, answer) pairs.
      steps: optimizer steps; None gives the reference's budget of ``REFERENCE_EPOCHS`` epochs
        (``300 * ceil(len(questions) / batch_size)`` steps). Each epoch visits every question once in a
        fresh random order; 0 returns the initial LoRA (which leaves the base model unchanged).
      learning_rate: peak AdamW learning rate, annealed to 0 with a cosine over ``steps``.
      rank, lora_alpha, target_modules: the LoRA (PEFT convention: scaling ``lora_alpha / rank``); the
        modules are Hugging Face projection names and every layer is adapted, as D2L adapts them.
      batch_size: questions per minibatch. A minibatch is padded to a power of two (at most
        ``batch_size``) with masked rows, so the step compiles once per shape bucket.
      loss: ``"top_k_kl"`` (the reference), ``"full_kl"`` (keeps ``[questions, labels, vocab]`` teacher
        logits in memory) or ``"ce"`` (cross-entropy on the responses; no teacher forward).
      top_k: teacher entries per label token for ``top_k_kl``.
      weight_decay, b1, b2, eps: AdamW (torch's defaults, as the reference uses).
      response_source: ``"teacher"``: the teacher (document in the prompt) replies greedily with at most
        ``max_response_tokens`` tokens and those replies are distilled on (answers in pairs are ignored);
        ``"given"``: the answers of (question, answer) pairs are.
      teacher_instruction: put the reference's CD instruction between document and question in the
        teacher's prompt (default: the document, a blank line, the question, as the D2L teacher sees it).
      seed: LoRA initialisation and minibatch order.
      progress: show a progress bar over the steps.

    Returns:
      A :class:`CDResult` with the adapter, per-step losses, latency and memory.

    Raises:
      ValueError: empty document or question list, unknown loss / response source / target module, a
        ``"given"`` question without an answer, or a teacher sequence longer than the model's window.
    """
    distillation = DistillationLoss(loss, top_k)
    if response_source not in RESPONSE_SOURCES:
        raise ValueError(f"response_source={response_source!r}; expected one of {RESPONSE_SOURCES}")
    unknown = sorted(set(target_modules) - set(TARGET_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"target_modules={tuple(target_modules)}: unknown or empty; known modules: {TARGET_MODULES}")
    if rank < 1 or batch_size < 1 or (steps is not None and steps < 0):
        raise ValueError(f"need rank >= 1, batch_size >= 1 and steps >= 0; got {rank}, {batch_size}, {steps}")
    tokenizer = base._require_tokenizer()
    num_tokens = len(tokenize_document(tokenizer, document, document_affixes(tokenizer)))
    asked, given = _split_questions(questions, response_source)
    n = len(asked)
    rows = min(_next_power_of_two(n), batch_size)
    batches_per_epoch = math.ceil(n / rows)
    steps = REFERENCE_EPOCHS * batches_per_epoch if steps is None else steps
    spec = _StepSpec(alpha=lora_alpha / rank, distillation=distillation, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    with PeakMemory() as memory:
        start = time.perf_counter()
        if response_source == "teacher":
            responses = []
            for i in range(0, n, rows):
                messages = [_teacher_messages(document, q, None, teacher_instruction) for q in asked[i : i + rows]]
                responses += base.generate(messages, max_new_tokens=max_response_tokens)
        else:
            responses = list(given)
        responded = time.perf_counter()

        data, teacher = _build_examples(base, document, asked, responses, teacher_instruction)
        data = {k: jnp.asarray(v) for k, v in data.items()}
        data.update(_compute_teacher(base, teacher, loss, top_k, rows))
        jax.block_until_ready(data)
        taught = time.perf_counter()

        key = jax.random.key(seed)
        params = init_cd_lora(base.config, target_modules, rank, key)
        opt_state = spec.optimizer(learning_rate).init(params)
        schedule = cosine_schedule(learning_rate, max(steps, 1))
        order_rng = np.random.default_rng(seed)
        losses, order = [], np.arange(n)
        bar = tqdm(range(steps), desc="context distillation", disable=not progress, leave=False)
        for step in bar:
            position = step % batches_per_epoch
            if position == 0:
                order = order_rng.permutation(n)
            members = order[position * rows : (position + 1) * rows]
            index = jnp.asarray(np.pad(members, (0, rows - len(members)), constant_values=n))  # n = the padding row
            batch = {name: jnp.take(value, index, axis=0) for name, value in data.items()}
            rate = jnp.asarray(schedule(step), jnp.float32)
            params, opt_state, step_loss = _cd_train_step(base.config, spec, base.params, params, opt_state, batch, rate)
            losses.append(step_loss)
            if progress and (step + 1) % max(1, steps // 20) == 0:
                bar.set_postfix(loss=f"{float(step_loss):.4f}")
        params = jax.block_until_ready(params)
        done = time.perf_counter()

    adapter = Adapter(
        lora=LoRA(A={m: a[None] for m, a in params["A"].items()}, B={m: b[None] for m, b in params["B"].items()}, alpha=spec.alpha),
        rank=rank,
        num_tokens=num_tokens,
        num_chunks=1,
    )
    return CDResult(
        adapter=adapter,
        losses=np.asarray(jax.device_get(losses), np.float32).reshape(-1),
        questions=asked,
        responses=responses,
        update_seconds=done - start,
        response_seconds=responded - start,
        teacher_seconds=taught - responded,
        train_seconds=done - taught,
        peak_memory_gb=memory.peak_gb,
        baseline_memory_gb=memory.baseline_gb,
        device_peak_gb=memory.device_peak_gb,
    )


def distill_oracle(base: BaseModel, document: str, question: str, **kwargs) -> CDResult:
    """The reference's oracle CD: distil on the test question alone, with the teacher's reply to it.

    ``kwargs`` are those of :func:`distill_document` (``steps`` defaults to the reference's 300 epochs,
    i.e. 300 steps for one question).
    """
    if kwargs.get("response_source", "teacher") != "teacher":
        raise ValueError("oracle context distillation distils on the teacher's reply to the test question")
    return distill_document(base, document, [question], **{**kwargs, "response_source": "teacher"})
