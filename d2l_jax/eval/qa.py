"""Question answering scores: token F1 and exact match with the reference's answer normalisation, and the
teacher-forced log-likelihood of the gold answer.

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
import functools
import re
import string
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2l_jax.data.examples import sequence_with_labels, student_messages
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.decoder import label_logits
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.generate import bucket_length
from d2l_jax.models.lora import LoRA

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


def score_reply(reply: str, answers: Sequence[str]) -> dict[str, float]:
    """F1 (with the precision and recall of the best-F1 answer) and exact match of one reply."""
    f1, precision, recall = max((f1_precision_recall(reply, a) for a in _as_answers(answers)), key=lambda s: s[0])
    return {"f1": f1, "precision": precision, "recall": recall, "em": exact_match(reply, answers)}


# Teacher-forced likelihood of the gold answer --------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _mean_label_log_probs(config: DecoderConfig, params, tokens, mask, positions, labels, label_mask, lora):
    log_probs = jax.nn.log_softmax(label_logits(config, params, tokens, mask, positions, lora), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return (picked * label_mask).sum(-1) / jnp.maximum(label_mask.sum(-1), 1)


def _lora_rows(lora: LoRA, rows: Sequence[int], height: int) -> LoRA:
    """The adapter rows of ``rows`` (row 0 for every row of a one-row adapter), padded to ``height`` rows."""
    index = np.asarray(list(rows) + [rows[-1]] * (height - len(rows)))
    if next(iter(lora.A.values())).shape[0] == 1:
        index = np.zeros_like(index)
    take = lambda x: jnp.take(x, index, axis=0)
    return LoRA(A={k: take(v) for k, v in lora.A.items()}, B={k: take(v) for k, v in lora.B.items()}, alpha=lora.alpha)


def gold_log_likelihoods(
    base: BaseModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    contexts: Sequence[str | None] | None = None,
    lora: LoRA | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Per question, the best over its gold answers of the mean log-probability per token (nats) that the
    model gives the answer when it is forced as the reply: the answer's tokens and the end-of-turn token,
    after the student prompt (with the question's context before it when ``contexts`` gives one, as
    in-context answering sees it), with ``lora`` when given (one row shared by every question, or a row
    per question).

    A finer signal than F1 for a small model whose free replies are verbose: it rises when the adapter
    makes the gold answer more likely even if the greedy reply does not change.
    Raises ValueError when ``prompts``, ``answers`` and ``contexts`` differ in length or a question has no
    answer.
    """
    contexts = [None] * len(prompts) if contexts is None else list(contexts)
    if not len(prompts) == len(answers) == len(contexts):
        raise ValueError(f"{len(prompts)} prompts, {len(answers)} answer lists and {len(contexts)} contexts")
    tokenizer = base._require_tokenizer()
    rows = []  # (question index, ids, label start, label end)
    for i, (prompt, golds, context) in enumerate(zip(prompts, answers, contexts)):
        for gold in _as_answers(golds):
            ids, start, end = sequence_with_labels(tokenizer, student_messages(prompt, gold, context), base.stop_token_ids)
            base.check_length(len(ids), f"question {i} with its gold answer")
            rows.append((i, ids, start, end))
    best = np.full(len(prompts), -np.inf)
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        height = 1 << (len(batch) - 1).bit_length()
        width = bucket_length(max(len(ids) for _, ids, _, _ in batch))
        labels_width = bucket_length(max(end - start for _, _, start, end in batch), minimum=8)
        tokens, mask = np.zeros((height, width), np.int32), np.zeros((height, width), np.int32)
        positions, labels = np.zeros((height, labels_width), np.int32), np.zeros((height, labels_width), np.int32)
        label_mask = np.zeros((height, labels_width), np.int32)
        for r, (_, ids, start, end) in enumerate(batch):
            tokens[r, : len(ids)], mask[r, : len(ids)] = ids, 1
            positions[r, : end - start] = np.arange(start, end) - 1
            labels[r, : end - start], label_mask[r, : end - start] = ids[start:end], 1
        rows_lora = None if lora is None else _lora_rows(lora, [i for i, *_ in batch], height)
        means = np.asarray(_mean_label_log_probs(base.config, base.params, tokens, mask, positions, labels, label_mask, rows_lora))
        for r, (i, _, _, _) in enumerate(batch):
            best[i] = max(best[i], float(means[r]))
    return best.tolist()
