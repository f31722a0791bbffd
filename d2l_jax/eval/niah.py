"""NIAH exact-match accuracy: the student (adapter from the document, document not in the prompt),
the base model without the document, and the base model with the document in its prompt; and the NIAH
evaluator a training run calls."""

from __future__ import annotations

from typing import Any, Sequence

from d2l_jax.api import D2L, stack_adapters
from d2l_jax.data.examples import student_messages
from d2l_jax.data.niah import NIAHSource, first_number
from d2l_jax.models.base_model import BaseModel

# Replies name the number in a sentence ("The special magic number is 0042."); score the first 4-digit number.
MAX_NEW_TOKENS = 16


def is_correct(reply: str, record: dict) -> bool:
    """Whether ``reply``'s first 4-digit number (``data.niah.first_number``) is ``record["response"]``."""
    return first_number(reply) == record["response"]


def correct(replies: Sequence[str], records: Sequence[dict]) -> int:
    """How many replies are correct (:func:`is_correct`). Raises ValueError when the lengths differ."""
    return sum(is_correct(reply, record) for reply, record in zip(replies, records, strict=True))


def exact_match(replies: Sequence[str], records: Sequence[dict]) -> float:
    """Share of replies that are correct (:func:`is_correct`), in [0, 1]. Raises ValueError when the
    lengths differ and ZeroDivisionError when there are no records."""
    return correct(replies, records) / len(records)


def student_replies(d2l: D2L, records: Sequence[dict], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy replies of the base model with each record's internalized context and no context in the prompt."""
    replies = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        lora = stack_adapters(d2l.adapters([r["context"] for r in batch]))
        replies += d2l.base.generate([student_messages(r["prompt"]) for r in batch], max_new_tokens=max_new_tokens, lora=lora)
    return replies


def base_replies(
    base: BaseModel, records: Sequence[dict], with_context: bool, batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """Greedy replies of the base model, with the context in the prompt or without it."""
    replies = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        messages = [student_messages(r["prompt"], context=r["context"] if with_context else None) for r in batch]
        replies += base.generate(messages, max_new_tokens=max_new_tokens)
    return replies


class NIAHEvaluator:
    """NIAH exact match on ``contexts`` validation records of ``lo <= tokens < hi`` (``bin``), drawn with ``seed``:
    the student without the document, and (``baseline``) the base model without it."""

    def __init__(self, base: BaseModel, bin: Sequence[int], contexts: int = 48, seed: int = 0):
        lo, hi = bin
        source = NIAHSource(base._require_tokenizer(), "val", int(lo), int(hi), contexts, seed=seed)
        self.base = base
        self.records = [source[i] for i in range(len(source))]

    def baseline(self) -> dict[str, float]:
        replies = base_replies(self.base, self.records, with_context=False)
        return {"eval/base_without_document_exact_match": exact_match(replies, self.records)}

    def __call__(self, d2l: D2L) -> dict[str, Any]:
        replies = student_replies(d2l, self.records)
        return {"eval/student_exact_match": exact_match(replies, self.records), "eval/example_reply": replies[0]}
