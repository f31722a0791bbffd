"""(context, prompt, response) records -> token ids for the context encoder, student and teacher, and
their collation into static-shape training batches (the layout ``d2l_jax.train.step`` documents)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from d2l_jax.data.chunking import chunk_document, tokenize_document

# A record's further questions about its context (``QASource(queries_per_context=...)``), each a dict of
# QUERY_FIELDS; an example built from it keeps their tokens under the same key.
EXTRA_QUERIES = "extra_queries"
QUERY_FIELDS = ("prompt", "response")


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    """Static shapes of a training batch, so the step compiles once.

    max_chunk_len: tokens per chunk row (chat affixes included).
    chunks_per_context: chunk rows reserved per context (the most chunks one context may have).
    queries_per_context: query rows per context (its questions that share its adapter).
    max_student_len / max_teacher_len: tokens of the student sequence (no context) and the teacher's.
    max_labels: response tokens scored per row (the response plus the end-of-turn token).
    top_k: teacher entries per label for offline targets.
    """

    max_chunk_len: int
    chunks_per_context: int
    max_student_len: int
    max_labels: int
    max_teacher_len: int = 0
    top_k: int = 16
    queries_per_context: int = 1


@dataclasses.dataclass(frozen=True)
class ChunkSampling:
    """The reference's training-time chunk count: k is drawn from ``probs`` (``{k: weight}``) among the
    k with ``ceil(len / max piece) <= k <= ceil(len / min_chunk_len)``. Empty ``probs``: fewest chunks."""

    probs: tuple[tuple[int, float], ...] = ()
    min_chunk_len: int = 25

    def draw(self, num_tokens: int, fewest: int, rng: np.random.Generator) -> int:
        if not self.probs:
            return fewest
        most = math.ceil(num_tokens / self.min_chunk_len)
        candidates = [(k, p) for k, p in self.probs if fewest <= k <= most and p > 0]
        if not candidates:
            return fewest
        ks, ps = zip(*candidates)
        return int(rng.choice(ks, p=np.asarray(ps) / sum(ps)))


def student_messages(prompt: str, response: str | None = None, context: str | None = None) -> list[dict[str, str]]:
    """The reference's student format (empty system turn, then the prompt), with the context before the
    prompt for the teacher (``context + "\\n\\n" + prompt``) and the response as the assistant turn."""
    user = prompt.strip() if context is None else context.strip() + "\n\n" + prompt.strip()
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sequence_with_labels(tokenizer, messages: list[dict[str, str]], stop_ids: Sequence[int]) -> tuple[list[int], int, int]:
    """(ids, start, end): the templated conversation ending with the assistant turn, and the span
    ``[start, end)`` of the labels = the response tokens through the first end-of-turn token."""
    prompt = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with and without the reply")
    stops = [i for i in range(len(prompt), len(full)) if full[i] in set(stop_ids)]
    if not stops:
        raise ValueError("the assistant turn has no end-of-turn token")
    return full[: stops[0] + 1], len(prompt), stops[0] + 1


class TrainExampleBuilder:
    """Tokenises one record for training; a grain ``random_map`` transform (the rng draws the chunk count).

    The output dict holds ``chunks`` (list of id lists), ``tokens``/``label_start``/``label_end`` for the
    student and, with ``with_teacher``, ``teacher_tokens``/``teacher_label_start``; records with
    ``teacher_log_probs``/``teacher_ids`` ([labels, K]) pass them through for the offline teacher. A record's
    ``extra_queries`` become a list of such query dicts (student and teacher keys) under the same key.
    """

    def __init__(self, tokenizer, affixes, stop_ids, max_chunk_len: int, sampling: ChunkSampling = ChunkSampling(), with_teacher: bool = False):
        self.tokenizer, self.affixes, self.stop_ids = tokenizer, affixes, tuple(stop_ids)
        self.max_chunk_len, self.sampling, self.with_teacher = max_chunk_len, sampling, with_teacher

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        ids = tokenize_document(self.tokenizer, record["context"], self.affixes)
        fewest = len(chunk_document(ids, self.affixes, self.max_chunk_len))
        pieces = self.sampling.draw(len(ids), fewest, rng)
        example = {"chunks": chunk_document(ids, self.affixes, self.max_chunk_len, pieces), **self._query(record, record["context"])}
        for key in ("teacher_log_probs", "teacher_ids"):
            if key in record:
                example[key] = np.asarray(record[key])
        extra = record.get(EXTRA_QUERIES)
        if extra:
            if "teacher_ids" in record:
                raise ValueError(f"a record with offline teacher targets cannot have {EXTRA_QUERIES}")
            example[EXTRA_QUERIES] = [self._query(query, record["context"]) for query in extra]
        return example

    def _query(self, query: dict[str, Any], context: str) -> dict[str, Any]:
        tokens, start, end = sequence_with_labels(self.tokenizer, student_messages(query["prompt"], query["response"]), self.stop_ids)
        out = dict(tokens=tokens, label_start=start, label_end=end)
        if self.with_teacher:
            teacher, t_start, t_end = sequence_with_labels(
                self.tokenizer, student_messages(query["prompt"], query["response"], context), self.stop_ids
            )
            if teacher[t_start:t_end] != tokens[start:end]:
                raise ValueError("teacher and student label tokens differ")
            out.update(teacher_tokens=teacher, teacher_label_start=t_start)
        return out


def queries(example: dict[str, Any]) -> list[dict[str, Any]]:
    """The example's questions: itself (its first question's keys) and its ``extra_queries``."""
    return [example, *example.get(EXTRA_QUERIES, ())]


def fits(example: dict[str, Any], shapes: BatchShapes) -> bool:
    """Whether an example fits the static shapes (the reference drops the ones that do not)."""
    return (
        len(example["chunks"]) <= shapes.chunks_per_context
        and max(map(len, example["chunks"])) <= shapes.max_chunk_len
        and len(queries(example)) <= shapes.queries_per_context
        and all(
            len(q["tokens"]) <= shapes.max_student_len
            and q["label_end"] - q["label_start"] <= shapes.max_labels
            and len(q.get("teacher_tokens", ())) <= shapes.max_teacher_len
            for q in queries(example)
        )
    )


def collate(examples: Sequence[dict[str, Any]], shapes: BatchShapes, micro_batches: int = 1) -> dict[str, np.ndarray]:
    """Stacks examples into ``[micro_batches, B, ...]`` arrays (B = len(examples) / micro_batches).

    Each context gets ``chunks_per_context`` chunk rows. Raises ValueError naming the limit when an
    example exceeds the shapes.
    """
    if len(examples) % micro_batches:
        raise ValueError(f"{len(examples)} examples do not split into {micro_batches} micro-batches")
    rows = len(examples) // micro_batches
    parts = [_collate_micro_batch(examples[i * rows : (i + 1) * rows], shapes) for i in range(micro_batches)]
    return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


def _collate_micro_batch(examples: Sequence[dict[str, Any]], s: BatchShapes) -> dict[str, np.ndarray]:
    b = len(examples)
    chunk_rows = b * s.chunks_per_context
    rows = b * s.queries_per_context  # context g's questions are rows g * queries_per_context + j
    out = {
        "ctx_tokens": np.zeros((chunk_rows, s.max_chunk_len), np.int32),
        "ctx_mask": np.zeros((chunk_rows, s.max_chunk_len), np.int32),
        "chunk_document": np.full((chunk_rows,), b, np.int32),
        "chunk_slot": np.zeros((chunk_rows,), np.int32),
        "num_chunks": np.zeros((b,), np.int32),
        "tokens": np.zeros((rows, s.max_student_len), np.int32),
        "mask": np.zeros((rows, s.max_student_len), np.int32),
        "label_positions": np.zeros((rows, s.max_labels), np.int32),
        "labels": np.zeros((rows, s.max_labels), np.int32),
        "label_mask": np.zeros((rows, s.max_labels), np.int32),
    }
    if "teacher_tokens" in examples[0]:
        out.update(
            teacher_tokens=np.zeros((rows, s.max_teacher_len), np.int32),
            teacher_mask=np.zeros((rows, s.max_teacher_len), np.int32),
            teacher_label_positions=np.zeros((rows, s.max_labels), np.int32),
        )
    if "teacher_ids" in examples[0]:
        out.update(
            teacher_log_probs=np.full((rows, s.max_labels, s.top_k), -np.inf, np.float32),
            teacher_ids=np.zeros((rows, s.max_labels, s.top_k), np.int32),
        )
    chunk_row = 0
    for g, ex in enumerate(examples):
        if not fits(ex, s):
            raise ValueError(
                f"example {g} ({len(ex['chunks'])} chunks, {len(queries(ex))} questions, {len(ex['tokens'])} student tokens, "
                f"{ex['label_end'] - ex['label_start']} labels) exceeds the batch shapes {s}"
            )
        for slot, chunk in enumerate(ex["chunks"]):
            out["ctx_tokens"][chunk_row, : len(chunk)] = chunk
            out["ctx_mask"][chunk_row, : len(chunk)] = 1
            out["chunk_document"][chunk_row], out["chunk_slot"][chunk_row] = g, slot
            chunk_row += 1
        out["num_chunks"][g] = len(ex["chunks"])
        for j, query in enumerate(queries(ex)):
            _put_query(out, g * s.queries_per_context + j, query, s.top_k)
    return out


def _put_query(out: dict[str, np.ndarray], row: int, query: dict[str, Any], top_k: int) -> None:
    tokens, start, end = query["tokens"], query["label_start"], query["label_end"]
    n = end - start
    out["tokens"][row, : len(tokens)] = tokens
    out["mask"][row, : len(tokens)] = 1
    out["label_positions"][row, :n] = np.arange(start, end) - 1
    out["labels"][row, :n] = tokens[start:end]
    out["label_mask"][row, :n] = 1
    if "teacher_tokens" in out:
        teacher = query["teacher_tokens"]
        out["teacher_tokens"][row, : len(teacher)] = teacher
        out["teacher_mask"][row, : len(teacher)] = 1
        out["teacher_label_positions"][row, :n] = np.arange(query["teacher_label_start"], query["teacher_label_start"] + n) - 1
    if "teacher_ids" in out:
        k = min(top_k, query["teacher_ids"].shape[-1])
        out["teacher_log_probs"][row, :n, :k] = query["teacher_log_probs"][:n, :k]
        out["teacher_ids"][row, :n, :k] = query["teacher_ids"][:n, :k]
