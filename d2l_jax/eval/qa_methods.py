"""Every way of answering questions about a held-out document, scored on the same questions: D2L, the D2L
control, in-context answering, no document, and context distillation (CD) with generated or oracle
questions; the resumable run over documents, its summary with 95% intervals, and the QA evaluator a
training run calls.

A method turns one document into a *condition* per question: the adapter the base model answers with (or
None) and the document in the prompt (or None). The method's update (internalization, distillation) is
timed and its peak memory measured; then every question is answered greedily under its condition and
scored (token F1, precision, recall and exact match against every gold answer; the teacher-forced mean
log-likelihood of the best gold answer).

  no_document   the base model, question only                          (the floor)
  in_context    the base model, document before the question          (the ceiling, reference §8.2 ICL)
  d2l           the base model with the document's D2L adapter, question only
  d2l_control   the same with the adapter of an *unrelated* document of similar length: a gain here is
                style, not knowledge of the document
  cd_generated  a fresh rank-8 LoRA distilled per document on questions the base model wrote about it
                (``data.self_gen``; the reference's non-oracle CD: 4 rounds of 5 questions, the teacher's
                replies, AdamW 1e-4, 300 epochs unless ``cd_steps`` says otherwise)
  cd_oracle     a fresh LoRA per test question, distilled on that question alone (reference's oracle CD)
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics as stats
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from d2l_jax.api import D2L, Adapter, stack_adapters
from d2l_jax.baselines.context_distillation import PeakMemory, distill_document, distill_oracle
from d2l_jax.data.examples import student_messages
from d2l_jax.data.qa_sets import QASource, closed_qa_prompt
from d2l_jax.data.self_gen import generate_questions
from d2l_jax.eval.qa import gold_log_likelihoods, score_reply
from d2l_jax.eval.results_store import ResultsFile
from d2l_jax.eval.statistics import gap_ratio, mean_and_interval, paired_bootstrap_interval
from d2l_jax.models.base_model import BaseModel

METHODS = ("no_document", "in_context", "d2l", "d2l_control", "cd_generated", "cd_oracle")
D2L_METHODS = ("d2l", "d2l_control")
CD_METHODS = ("cd_generated", "cd_oracle")
METRICS = ("f1", "recall", "em", "gold_log_likelihood")
_VALIDATION_METRICS = ("f1", "gold_log_likelihood")
CD_QUESTION_ROUNDS = 4  # the reference's CD writes questions in 4 rounds for SQuAD, DROP and ROPES

# (adapter or None, document in the prompt or None) under which one question is answered.
Condition = tuple[Adapter | None, str | None]


@dataclasses.dataclass(frozen=True)
class QADocument:
    """A held-out document and its questions.

    Attributes:
      index: its position in the evaluation (results refer to it by this number).
      context: the document text.
      group: its article (SQuAD) or background (ROPES) key; the control comes from another group.
      control: an unrelated document of similar length (another group's), for ``d2l_control``.
      questions: the prompts as the model sees them (closed-QA template applied).
      answers: every gold answer of each question.
      ids: the questions' ids in their data set.
    """

    index: int
    context: str
    group: str
    control: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    ids: tuple[str, ...]


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def plan_documents(records: Sequence[Mapping[str, Any]], questions: int, seed: int = 0, template: str = "closed_qa") -> list[QADocument]:
    """Whole documents, drawn in a fixed pseudo-random order (``seed``), until they hold at least
    ``questions`` questions; each with the unrelated document of the closest length from another group.

    ``records`` are QA records (``context``, ``prompt``, ``answers``, ``id``, ``group``; ``data.qa_sets``);
    ``template`` is ``"closed_qa"`` (the reference's instruction around each question) or ``"none"``.
    Raises ValueError when the records hold fewer questions, or a single group (no control possible).
    """
    if template not in ("closed_qa", "none"):
        raise ValueError(f"template={template!r}; expected 'closed_qa' or 'none'")
    if len(records) < questions:
        raise ValueError(f"the records hold {len(records)} questions; {questions} were asked for")
    by_context: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_context.setdefault(record["context"], []).append(record)
    groups = {members[0]["group"] for members in by_context.values()}
    if len(groups) < 2:
        raise ValueError("the records come from one group; the control needs documents of another")
    order = sorted(by_context, key=lambda c: _order_key(seed, c))
    chosen, count = [], 0
    for context in order:
        if count >= questions:
            break
        chosen.append(context)
        count += len(by_context[context])
    by_length = sorted(by_context, key=lambda c: (len(c), c))
    documents = []
    for index, context in enumerate(chosen):
        members = by_context[context]
        group = members[0]["group"]
        others = [c for c in by_length if by_context[c][0]["group"] != group]
        control = min(others, key=lambda c: (abs(len(c) - len(context)), _order_key(seed, c)))
        prompt = closed_qa_prompt if template == "closed_qa" else (lambda q: q)
        documents.append(
            QADocument(
                index=index,
                context=context,
                group=group,
                control=control,
                questions=tuple(prompt(r["prompt"]) for r in members),
                answers=tuple(tuple(r["answers"]) for r in members),
                ids=tuple(str(r.get("id", f"{index}.{i}")) for i, r in enumerate(members)),
            )
        )
    return documents


# Methods ------------------------------------------------------------------------------------------------------

# A method's update: (document) -> (one condition per question, details for the results file).
Update = Callable[[QADocument], tuple[list[Condition], dict[str, Any]]]


def _adapter_update(d2l: D2L, control: bool) -> Update:
    def update(document: QADocument):
        [adapter] = jax.block_until_ready(d2l.adapters([document.control if control else document.context]))
        return [(adapter, None)] * len(document.questions), {"chunks": adapter.num_chunks, "document_tokens": adapter.num_tokens}

    return update


def _cd_generated_update(base: BaseModel, rounds: int, cd_steps: int | None, max_response_tokens: int) -> Update:
    def update(document: QADocument):
        start = time.perf_counter()
        [pairs] = generate_questions(base, [document.context], rounds=rounds)
        generated = time.perf_counter() - start
        details: dict[str, Any] = {"question_seconds": generated, "generated": [list(p) for p in pairs]}
        if not pairs:  # the reference falls back to answering without the document
            return [(None, None)] * len(document.questions), details
        result = distill_document(
            base, document.context, [q for q, _ in pairs], steps=cd_steps, max_response_tokens=max_response_tokens, progress=False
        )
        details.update(result.summary(), teacher_replies=result.responses)
        return [(result.adapter, None)] * len(document.questions), details

    return update


def _cd_oracle_update(base: BaseModel, cd_steps: int | None, max_response_tokens: int) -> Update:
    def update(document: QADocument):
        conditions, summaries = [], []
        for question in document.questions:
            result = distill_oracle(base, document.context, question, steps=cd_steps, max_response_tokens=max_response_tokens, progress=False)
            conditions.append((result.adapter, None))
            summaries.append(result.summary())
        return conditions, {"per_question": summaries}

    return update


def method_updates(
    base: BaseModel,
    d2l: D2L | None,
    methods: Sequence[str],
    cd_steps: int | None = None,
    cd_rounds: int = CD_QUESTION_ROUNDS,
    max_response_tokens: int = 256,
) -> dict[str, Update]:
    """The update of each named method (see the module docstring). Raises ValueError for an unknown
    method, or a D2L method without ``d2l``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {METHODS}")
    if d2l is None and set(methods) & set(D2L_METHODS):
        raise ValueError(f"methods {sorted(set(methods) & set(D2L_METHODS))} need a trained D2L")
    constant = lambda context_in_prompt: lambda doc: ([(None, doc.context if context_in_prompt else None)] * len(doc.questions), {})
    builders = {
        "no_document": lambda: constant(False),
        "in_context": lambda: constant(True),
        "d2l": lambda: _adapter_update(d2l, control=False),
        "d2l_control": lambda: _adapter_update(d2l, control=True),
        "cd_generated": lambda: _cd_generated_update(base, cd_rounds, cd_steps, max_response_tokens),
        "cd_oracle": lambda: _cd_oracle_update(base, cd_steps, max_response_tokens),
    }
    return {name: builders[name]() for name in methods}


def answer_questions(
    base: BaseModel,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    conditions: Sequence[Condition],
    max_new_tokens: int,
    batch_size: int = 16,
) -> tuple[list[dict[str, Any]], float]:
    """Every question answered greedily under its own condition (so questions of several documents, and
    adapters of several documents, share one batch) and scored against its gold answers; returns one row
    per question (``reply``, ``f1``, ``precision``, ``recall``, ``em``, ``gold_log_likelihood``) and the
    answering seconds per question (generation only)."""
    rows: list[dict[str, Any]] = [{} for _ in questions]
    seconds = 0.0
    adapted = [i for i, (adapter, _) in enumerate(conditions) if adapter is not None]
    plain = [i for i, (adapter, _) in enumerate(conditions) if adapter is None]
    for members in (adapted, plain):
        for first in range(0, len(members), batch_size):
            batch = members[first : first + batch_size]
            lora = stack_adapters([conditions[i][0] for i in batch]) if members is adapted else None
            start = time.perf_counter()
            replies = base.generate(
                [student_messages(questions[i], context=conditions[i][1]) for i in batch], max_new_tokens=max_new_tokens, lora=lora
            )
            seconds += time.perf_counter() - start
            likelihoods = gold_log_likelihoods(
                base, [questions[i] for i in batch], [answers[i] for i in batch], [conditions[i][1] for i in batch], lora
            )
            for i, reply, likelihood in zip(batch, replies, likelihoods):
                rows[i] = {"reply": reply, **score_reply(reply, answers[i]), "gold_log_likelihood": likelihood}
    return rows, seconds / max(len(questions), 1)


def variant_name(method: str, cd_steps: int | None = None) -> str:
    """What results are filed under: the method, and for CD its step budget (``cd_oracle@300`` or
    ``cd_oracle@reference`` for the reference's 300 epochs), so several budgets sit side by side."""
    if method not in CD_METHODS:
        return method
    return f"{method}@{'reference' if cd_steps is None else cd_steps}"


def evaluate_documents(
    base: BaseModel, variant: str, update: Update, documents: Sequence[QADocument], max_new_tokens: int, batch_size: int = 16
) -> list[dict[str, Any]]:
    """One method (``variant``: :func:`variant_name`) on some documents: each document's update, timed
    with the process's peak memory during it, then all their questions answered together
    (:func:`answer_questions`). One record per document."""
    updates = []
    for document in documents:
        with PeakMemory() as memory:
            start = time.perf_counter()
            conditions, details = update(document)
            updates.append((conditions, details, time.perf_counter() - start, memory))
    flat = [(d, i) for d in documents for i in range(len(d.questions))]
    rows, answer_seconds = answer_questions(
        base,
        [d.questions[i] for d, i in flat],
        [d.answers[i] for d, i in flat],
        [c for conditions, *_ in updates for c in conditions],
        max_new_tokens,
        batch_size,
    )
    records, first = [], 0
    for document, (conditions, details, seconds, memory) in zip(documents, updates):
        mine = rows[first : first + len(conditions)]
        first += len(conditions)
        questions = [
            {"id": document.ids[i], "prompt": document.questions[i], "answers": list(document.answers[i]), **row}
            for i, row in enumerate(mine)
        ]
        records.append({
            "method": variant.split("@")[0],
            "variant": variant,
            "document": document.index,
            "group": document.group,
            "update_seconds": seconds,
            "answer_seconds_per_question": answer_seconds,
            "peak_memory_gb": memory.peak_gb,
            "questions": questions,
            "details": details,
        })
    return records


def result_key(record: Mapping[str, Any]) -> tuple:
    """A finished cell of the QA comparison: (variant, document index)."""
    return record["variant"], record["document"]


def _blocks(documents: Sequence[QADocument], questions: int) -> list[list[QADocument]]:
    """Consecutive documents grouped until a group holds at least ``questions`` questions (one answer batch)."""
    blocks, block = [], []
    for document in documents:
        block.append(document)
        if sum(len(d.questions) for d in block) >= questions:
            blocks.append(block)
            block = []
    return blocks + ([block] if block else [])


def run_comparison(
    base: BaseModel,
    d2l: D2L | None,
    documents: Sequence[QADocument],
    methods: Sequence[str],
    workdir,
    *,
    settings: Mapping[str, Any],
    identity: Mapping[str, Any] | None = None,
    cd_documents: int = 50,
    cd_steps: int | None = None,
    cd_rounds: int = CD_QUESTION_ROUNDS,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Runs every method on every document (CD methods on the first ``cd_documents`` only), method by
    method, writing ``workdir/results.json`` after each document; finished (variant, document) cells are
    skipped, so a rerun resumes, and CD at another ``cd_steps`` adds a variant beside the others.
    Returns every record of the file."""
    results = ResultsFile(workdir, settings, identity, key=result_key)
    updates = method_updates(base, d2l, methods, cd_steps, cd_rounds, max_new_tokens)
    for method in methods:
        variant = variant_name(method, cd_steps)
        chosen = documents[:cd_documents] if method in CD_METHODS else documents
        todo = [d for d in chosen if (variant, d.index) not in results.done]
        with tqdm(total=len(todo), desc=variant, unit="document", disable=not progress or not todo) as bar:
            for block in _blocks(todo, batch_size):
                for record in evaluate_documents(base, variant, updates[method], block, max_new_tokens, batch_size):
                    results.add(record)
                bar.update(len(block))
    return results.data["records"]


def joined_base_records(earlier: Mapping[str, Any], identity: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records of ``earlier`` (another run's results file as read from JSON) to summarise beside
    ``records``: those of methods that need no D2L checkpoint (no document, in-context, CD), whose answers do
    not depend on the hypernetwork evaluated, and only of variants that ``records`` lack.

    Raises:
      ValueError: the earlier run planned other documents or questions: its identity differs from
        ``identity`` in anything but the checkpoint and step, or one of its documents holds other questions.
    """
    theirs = earlier.get("identity") or {}
    differing = [
        f"{k} is {theirs.get(k)!r} there, {v!r} here" for k, v in identity.items() if k not in ("checkpoint", "step") and theirs.get(k) != v
    ]
    if differing:
        raise ValueError(f"the earlier results are of another plan: {'; '.join(differing)}")
    present = {r["variant"] for r in records}
    planned = {r["document"]: [q["id"] for q in r["questions"]] for r in records}
    joined = [dict(r) for r in earlier["records"] if r["method"] not in D2L_METHODS and r["variant"] not in present]
    for r in joined:
        if r["document"] in planned and [q["id"] for q in r["questions"]] != planned[r["document"]]:
            raise ValueError(f"document {r['document']} holds other questions in the earlier results ({r['variant']}) than here")
    return joined


# Summary ------------------------------------------------------------------------------------------------------


def _question_rows(records: Sequence[Mapping[str, Any]], variant: str, documents: set[int] | None = None) -> list[dict]:
    rows = []
    for record in sorted((r for r in records if r["variant"] == variant), key=lambda r: r["document"]):
        if documents is None or record["document"] in documents:
            rows += record["questions"]
    return rows


def method_summary(records: Sequence[Mapping[str, Any]], variant: str, documents: set[int] | None = None) -> dict[str, Any]:
    """Means with 95% bootstrap intervals of every metric over the variant's questions (of ``documents``
    when given), and its update latency (median seconds per document), answer latency (median seconds
    per question) and the largest peak memory."""
    mine = [r for r in records if r["variant"] == variant and (documents is None or r["document"] in documents)]
    rows = _question_rows(mine, variant)
    if not rows:
        return {"questions": 0, "documents": 0}
    summary: dict[str, Any] = {"questions": len(rows), "documents": len(mine)}
    for metric in METRICS:
        summary[metric] = mean_and_interval([r[metric] for r in rows])
    summary["update_seconds"] = stats.median(r["update_seconds"] for r in mine)
    summary["answer_seconds_per_question"] = stats.median(r["answer_seconds_per_question"] for r in mine)
    summary["peak_memory_gb"] = max(r["peak_memory_gb"] for r in mine)
    return summary


def gap_summary(records: Sequence[Mapping[str, Any]], variant: str = "d2l", metric: str = "f1", documents: set[int] | None = None) -> dict[str, Any] | None:
    """The share of the no-document-to-in-context gap ``variant`` closes in ``metric``, with its paired 95%
    bootstrap interval over the questions all three answered; None when one of them has no results."""
    done = [{r["document"] for r in records if r["variant"] == v} for v in (variant, "no_document", "in_context")]
    common = set.intersection(*done) & (documents if documents is not None else set.union(*done))
    if not common:
        return None
    columns = {name: [row[metric] for row in _question_rows(records, v, common)] for name, v in
               (("method", variant), ("none", "no_document"), ("in_context", "in_context"))}
    point = float(gap_ratio(np.mean(columns["method"]), np.mean(columns["none"]), np.mean(columns["in_context"])))
    low, high = paired_bootstrap_interval(lambda method, none, in_context: gap_ratio(method, none, in_context), columns)
    return {"variant": variant, "metric": metric, "ratio": point, "low": low, "high": high, "questions": len(columns["method"])}


def paired_lead(own: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """The mean of ``own - other`` over the same questions, with its paired 95% bootstrap interval."""
    low, high = paired_bootstrap_interval(lambda own, other: own - other, {"own": own, "other": other})
    return {"mean": float(np.mean(own) - np.mean(other)), "low": low, "high": high, "n": len(own)}


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"all": {variant: summary}, "cd_documents": {variant: summary}, "gap": {...}, "lead": {...}}``: every
    variant over its documents; every variant over the documents every CD variant has finished (a
    same-documents comparison; empty without CD results); the gap ratios of every adapting variant in F1 and
    gold log-likelihood over both scopes (``"<variant>/<metric>/<scope>"``); and D2L's lead over its control
    in both metrics (:func:`paired_lead`) on the documents both answered (empty without them)."""
    variants = sorted({r["variant"] for r in records}, key=lambda v: (METHODS.index(v.split("@")[0]), v))
    cd = [{r["document"] for r in records if r["variant"] == v} for v in variants if v.split("@")[0] in CD_METHODS]
    subset = set.intersection(*cd) if cd else set()
    summary = {
        "all": {v: method_summary(records, v) for v in variants},
        "cd_documents": {v: method_summary(records, v, subset) for v in variants} if subset else {},
        "gap": {},
    }
    for variant in (v for v in variants if v not in ("no_document", "in_context")):
        for scope, documents in (("all", None), ("cd_documents", subset)):
            for metric in ("f1", "gold_log_likelihood"):
                gap = gap_summary(records, variant, metric, documents) if documents is None or documents else None
                if gap is not None:
                    summary["gap"][f"{variant}/{metric}/{scope}"] = gap
    both = set.intersection(*({r["document"] for r in records if r["variant"] == v} for v in D2L_METHODS))
    summary["lead"] = {
        metric: paired_lead(*([row[metric] for row in _question_rows(records, v, both)] for v in D2L_METHODS))
        for metric in ("f1", "gold_log_likelihood")
    } if both else {}
    return summary


_LABELS = {
    "no_document": "no document",
    "in_context": "in-context (document in prompt)",
    "d2l": "D2L (adapter, no document)",
    "d2l_control": "D2L control (unrelated document's adapter)",
    "cd_generated": "CD, generated questions",
    "cd_oracle": "CD, oracle (test question)",
}


def _cell(s: Mapping[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} [{s['low'] * scale:.{digits}f}, {s['high'] * scale:.{digits}f}]"


def variant_label(variant: str) -> str:
    """A reader's name for a variant: ``"CD, oracle (test question), 300 steps"``."""
    method, _, budget = variant.partition("@")
    label = _LABELS.get(method, method)
    if not budget:
        return label
    return f"{label}, {'300 epochs (reference)' if budget == 'reference' else budget + ' steps'}"


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of one scope of :func:`summarize` (variant → summary): F1, recall and exact match in
    percent and the gold log-likelihood, each with its 95% interval; questions, documents, latencies, memory."""
    lines = [
        "| method | F1 | recall | EM | gold log-lik. (nats/token) | questions | documents | update s (median) | answer s / question | peak GB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant, s in summary.items():
        if not s.get("questions"):
            continue
        lines.append(
            f"| {variant_label(variant)} | {_cell(s['f1'], 100)} | {_cell(s['recall'], 100)} | {_cell(s['em'], 100)} | "
            f"{_cell(s['gold_log_likelihood'], 1, 3)} | {s['questions']} | {s['documents']} | {s['update_seconds']:.3g} | "
            f"{s['answer_seconds_per_question']:.3g} | {s['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines)


def gap_lines(gaps: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown bullet per gap ratio of :func:`summarize`."""
    return "\n".join(
        f"- {key}: {g['ratio']:.3f} [{g['low']:.3f}, {g['high']:.3f}] over {g['questions']} questions" for key, g in gaps.items()
    )


def lead_lines(leads: Mapping[str, Mapping[str, float]]) -> str:
    """One markdown bullet per metric of :func:`summarize`'s D2L-minus-control lead."""
    return "\n".join(f"- {metric}: {x['mean']:.4f} [{x['low']:.4f}, {x['high']:.4f}] over {x['n']} questions" for metric, x in leads.items())


# The evaluator a training run calls ----------------------------------------------------------------------------


class QAEvaluator:
    """QA token F1 (and the gold answer's log-likelihood) on held-out documents during training: the
    student without the document and the control (an unrelated document's adapter); ``baseline`` gives
    the base model with the document (ceiling) and without it (floor).

    Each ``eval/{method}_{metric}`` mean comes with its 95% bootstrap interval over the questions
    (``..._low``, ``..._high``) and the question count (``eval/questions``); the student's lead over the
    control, ``eval/d2l_minus_control_{metric}``, with its paired bootstrap interval (the same questions
    drawn for both): the paragraph's own adapter helps where that interval lies above 0.

    Args:
      base: the frozen base model.
      path, format: a QA data file and its format (``data.qa_sets``; None: detected).
      split: which part of it (``"validation"``: the held-out articles / backgrounds, ``data.qa_sets.split_records``).
      questions: at least this many questions, whole documents (:func:`plan_documents`).
      max_new_tokens: reply budget (short replies keep validation cheap).
      seed: which documents.
      context: what a document is (``data.qa_sets.CONTEXT_KINDS``): the passage, or the passage's sentences
        that hold the answer (a diagnostic of whether single facts are carried).
    """

    def __init__(
        self, base: BaseModel, path: str, format: str | None = None, split: str = "validation", questions: int = 64,
        max_new_tokens: int = 64, seed: int = 0, context: str = "passage",
    ):
        self.base, self.max_new_tokens = base, max_new_tokens
        self.documents = plan_documents(QASource(path, format, split, template="none", context=context).records, questions, seed)

    def _scores(self, method: str, update: Update) -> dict[str, list[float]]:
        records = evaluate_documents(self.base, method, update, self.documents, self.max_new_tokens)
        rows = [row for record in records for row in record["questions"]]
        return {metric: [r[metric] for r in rows] for metric in _VALIDATION_METRICS}

    def _run(self, d2l: D2L | None, methods: Sequence[str]) -> dict[str, Any]:
        updates = method_updates(self.base, d2l, methods)
        scores = {method: self._scores(method, updates[method]) for method in methods}
        metrics = {}
        for method, columns in scores.items():
            for metric, values in columns.items():
                summary = mean_and_interval(values)
                metrics |= {f"eval/{method}_{metric}": summary["mean"], f"eval/{method}_{metric}_low": summary["low"],
                            f"eval/{method}_{metric}_high": summary["high"]}  # fmt: skip
                metrics["eval/questions"] = float(summary["n"])
        if {"d2l", "d2l_control"} <= scores.keys():
            for metric in _VALIDATION_METRICS:
                lead, name = paired_lead(scores["d2l"][metric], scores["d2l_control"][metric]), f"eval/d2l_minus_control_{metric}"
                metrics |= {name: lead["mean"], f"{name}_low": lead["low"], f"{name}_high": lead["high"]}
        return metrics

    def baseline(self) -> dict[str, Any]:
        return self._run(None, ("no_document", "in_context"))

    def __call__(self, d2l: D2L) -> dict[str, Any]:
        return self._run(d2l, ("d2l", "d2l_control"))
