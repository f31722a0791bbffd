"""NIAH exact-match accuracy: the student (adapter from the document, document not in the prompt),
the base model without the document, and the base model with the document in its prompt."""

from __future__ import annotations

from typing import Sequence

from d2l_jax.api import D2L, stack_adapters
from d2l_jax.data.examples import student_messages
from d2l_jax.data.niah import first_number
from d2l_jax.models.base_model import BaseModel

# Replies name the number in a sentence ("The special magic number is 0042."); score the first 4-digit number.
MAX_NEW_TOKENS = 16


def exact_match(replies: Sequence[str], records: Sequence[dict]) -> float:
    """Share of replies whose first 4-digit number is the record's response."""
    return sum(first_number(r) == rec["response"] for r, rec in zip(replies, records, strict=True)) / len(records)


def student_replies(d2l: D2L, records: Sequence[dict], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy replies of the base model with each record's internalized context and no context in the prompt."""
    replies = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        adapters = d2l.internalize([r["context"] for r in batch])
        lora = stack_adapters(adapters)
        replies += d2l.base.generate([student_messages(r["prompt"]) for r in batch], max_new_tokens=max_new_tokens, lora=lora)
    d2l.reset()
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
