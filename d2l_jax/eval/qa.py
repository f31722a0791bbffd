"""Question answering: token F1 and exact match with the reference's answer normalisation, and the
evaluation of a method (a function from one document's questions to replies) over ``context, prompt,
response`` records.

Normalisation (the reference's ``normalize_answer``): typographic clean-up (hidden characters removed;
no-break spaces, en/em dashes, curly quotes and the ellipsis character replaced by their ASCII forms),
lowercase, every ASCII punctuation character except the backslash turned into a word break (the
reference builds a regex class from ``string.punctuation`` in which ``\\]`` escapes the bracket, so the
backslash itself is not matched), the articles ``a``/``an``/``the`` removed, whitespace collapsed. Words
are then split on whitespace and hyphens.

As in the reference, F1 is 0.0 whenever the prediction or the gold answer normalises to nothing (it finds
no common token), even when both do. Exact match compares the normalised words, so two empty answers match.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from d2l_jax.data.examples import student_messages

# A method answers one document's questions: (document, questions, max_new_tokens) -> one reply each.
AnswerFn = Callable[[str, list[str], int], Sequence[str]]

_HIDDEN = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
_TYPOGRAPHY = [
    (re.compile("\u00a0"), " "),
    (re.compile("[\u2014\u2013]+"), "-"),
    (re.compile("[\u201c\u201d\u00ab\u00bb\u201e]"), '"'),
    (re.compile("[\u2018\u2019\u02bc]"), "'"),
    (re.compile("\u2026"), "..."),
]
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace("\\", "")) + "]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD_BREAK = re.compile(r"[-\s]")


def normalize_answer(text: str) -> str:
    """Lowercased text without punctuation, articles and extra whitespace (the reference's rule)."""
    text = _HIDDEN.sub("", text)
    for pattern, replacement in _TYPOGRAPHY:
        text = pattern.sub(replacement, text)
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The words F1 compares: the normalised text split on whitespace and hyphens."""
    return [w for w in _WORD_BREAK.split(normalize_answer(text)) if w]


def _as_answers(ground_truths: str | Iterable[str]) -> list[str]:
    answers = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not answers:
        raise ValueError("no gold answers given")
    return answers


def f1_precision_recall(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """Token-level (F1, precision, recall) of one prediction against one gold answer.

    Tokens are counted with multiplicity; an empty prediction or gold answer gives (0, 0, 0).
    """
    predicted, gold = answer_tokens(prediction), answer_tokens(ground_truth)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:  # also when either side is empty
        return 0.0, 0.0, 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall), precision, recall


def token_f1(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """Token F1 of ``prediction``: the best over the gold answers (one string or several)."""
    return max(f1_precision_recall(prediction, answer)[0] for answer in _as_answers(ground_truths))


def exact_match(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """1.0 if ``prediction`` equals one of the gold answers after normalisation, else 0.0."""
    predicted = answer_tokens(prediction)
    return float(any(answer_tokens(answer) == predicted for answer in _as_answers(ground_truths)))


def gold_answers(record: dict[str, Any]) -> list[str]:
    """A record's gold answers: its ``answers`` list when present, else its ``response``."""
    answers = record.get("answers")
    if answers is None:
        return [record["response"]]
    return _as_answers(answers)


@dataclasses.dataclass(frozen=True)
class QAResult:
    """Scores of one method on a set of records.

    Attributes:
      records: one dict per input record, in input order: ``document`` (index of its distinct context,
        in order of first appearance), ``prompt``, ``reply``, ``answers``, ``f1``, ``precision``,
        ``recall`` (of the gold answer with the best F1) and ``em``.
      f1, em: means over the records (0.0 for no records).
    """

    records: list[dict[str, Any]]
    f1: float
    em: float

    def as_dict(self) -> dict[str, Any]:
        return {"f1": self.f1, "em": self.em, "num_records": len(self.records), "records": self.records}


def score_reply(reply: str, answers: Sequence[str]) -> dict[str, float]:
    """F1 (with the precision and recall of the best-F1 answer) and exact match of one reply."""
    f1, precision, recall = max((f1_precision_recall(reply, a) for a in _as_answers(answers)), key=lambda s: s[0])
    return {"f1": f1, "precision": precision, "recall": recall, "em": exact_match(reply, answers)}


def evaluate_qa(
    records: Sequence[dict[str, Any]],
    answer_fn: AnswerFn,
    max_new_tokens: int = 256,
    *,
    progress: bool = True,
    desc: str = "QA",
) -> QAResult:
    """Scores a method on ``context, prompt, response`` records (``answers`` may list several gold answers).

    Records are grouped by context; ``answer_fn(document, questions, max_new_tokens)`` is called once per
    distinct document, in order of first appearance, with that document's prompts in record order, and
    must return one reply per question (so a method that updates per document, such as context
    distillation or D2L, pays its update once per document). A progress bar counts answered records.

    Raises ValueError when a record lacks a field or the method returns the wrong number of replies.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    documents: dict[str, list[int]] = {}
    for number, record in enumerate(records):
        missing = [k for k in ("context", "prompt") if k not in record]
        if missing or ("response" not in record and "answers" not in record):
            raise ValueError(f"record {number} lacks {missing or ['response or answers']}")
        documents.setdefault(record["context"], []).append(number)

    scored: list[dict[str, Any] | None] = [None] * len(records)
    with tqdm(total=len(records), desc=desc, disable=not progress) as bar:
        for index, (document, members) in enumerate(documents.items()):
            questions = [records[i]["prompt"] for i in members]
            replies = list(answer_fn(document, questions, max_new_tokens))
            if len(replies) != len(questions):
                raise ValueError(f"the method returned {len(replies)} replies for {len(questions)} questions")
            for i, reply in zip(members, replies):
                answers = gold_answers(records[i])
                scored[i] = {"document": index, "prompt": records[i]["prompt"], "reply": reply, "answers": answers}
                scored[i].update(score_reply(reply, answers))
            bar.update(len(members))
    count = max(len(scored), 1)
    return QAResult(
        records=scored,
        f1=sum(r["f1"] for r in scored) / count,
        em=sum(r["em"] for r in scored) / count,
    )


# Methods for evaluate_qa --------------------------------------------------------------------------------


def in_context_answers(base, with_context: bool = True, batch_size: int = 16) -> AnswerFn:
    """Greedy replies of the base model with the document before each question in the prompt (the
    reference's in-context baseline), or without the document (``with_context=False``)."""
    def answer(document: str, questions: list[str], max_new_tokens: int) -> list[str]:
        replies = []
        for i in range(0, len(questions), batch_size):
            batch = questions[i : i + batch_size]
            messages = [student_messages(q, context=document if with_context else None) for q in batch]
            replies += base.generate(messages, max_new_tokens=max_new_tokens)
        return replies

    return answer


def d2l_answers(d2l, batch_size: int = 16) -> AnswerFn:
    """Greedy replies of a D2L student: the document is internalized once, then every question is asked
    without it in the prompt."""
    def answer(document: str, questions: list[str], max_new_tokens: int) -> list[str]:
        [adapter] = d2l.adapters([document])
        replies = []
        for i in range(0, len(questions), batch_size):
            messages = [student_messages(q) for q in questions[i : i + batch_size]]
            replies += d2l.generate(messages, adapter=adapter, max_new_tokens=max_new_tokens)
        return replies

    return answer
