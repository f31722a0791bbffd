"""The ways a NIAH sweep answers a cell's questions (:data:`METHODS`):

* ``d2l``: the student: the document internalized into an adapter (chunked, any length; see
  ``D2L.adapters``), the question alone in the prompt;
* ``icl``: the base model with the document in its prompt, only where prompt plus reply fit the base
  model's window; other cells are recorded as ``"not run: exceeds window N ..."``;
* ``truncated_icl``: the same prompt cut to the window the reference's way (first and last
  ``(window - max_new_tokens) // 2`` tokens kept, see ``in_context.truncate_middle``);
* ``base``: the base model with neither document nor adapter.

Latencies are wall-clock seconds per document (``internalize_s``) and per question (``answer_s``,
batched); they include compilation the first time a shape is met.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from d2l_jax.api import D2L
from d2l_jax.data.examples import student_messages
from d2l_jax.eval.in_context import truncate_middle
from d2l_jax.hypernet.adapter import stack_adapters
from d2l_jax.models.generate import bucket_length

METHODS = ("d2l", "icl", "truncated_icl", "base")

# A method answers one cell: records (context, prompt, response, ...) -> {"replies": [...], timings...}, or
# {"status": "not run: ..."} when it cannot run on them.
MethodFn = Callable[[list[dict]], dict]


class _ReplyCache:
    """Replies to the last prompt set answered without an adapter: ``truncated_icl`` asks exactly what
    ``icl`` asked whenever nothing needed truncating, and is then not run twice."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, prompts):
        key = tuple(map(tuple, prompts))
        return self.value if key == self.key else None

    def put(self, prompts, value):
        self.key, self.value = tuple(map(tuple, prompts)), value


def niah_methods(
    d2l: D2L,
    methods: Sequence[str] = METHODS,
    *,
    max_new_tokens: int,
    batch_size: int,
    icl_batch_tokens: int,
    progress: bool = True,
) -> dict[str, MethodFn]:
    """The method functions named in ``methods`` (a subset of :data:`METHODS`) over one D2L; its base model
    serves the baselines.

    Replies are greedy, of at most ``max_new_tokens`` tokens. ``batch_size`` documents are internalized and
    questions answered per call; in-context calls hold at most ``icl_batch_tokens`` (bucketed) prompt tokens,
    so long prompts go one at a time. Raises KeyError for a name outside :data:`METHODS`.
    """
    base = d2l.base
    window = base.config.max_position_embeddings
    m = max_new_tokens
    cache = _ReplyCache()

    def answer(prompts: list[list[int]], rows: int, desc: str) -> dict:
        """Replies without an adapter: ``replies``, ``answer_s`` (per question) and, when the same
        prompts were just answered for another method, ``reused_replies: True`` (with that timing)."""
        cached = cache.get(prompts)
        if cached is not None:
            return {**cached, "reused_replies": True}
        replies, start = [], time.perf_counter()
        for i in tqdm(range(0, len(prompts), rows), desc=desc, leave=False, disable=not progress):
            replies += base.generate_ids(prompts[i : i + rows], m)
        value = {"replies": replies, "answer_s": (time.perf_counter() - start) / len(prompts)}
        cache.put(prompts, value)
        return value

    def in_context_rows(prompts):
        return max(1, min(batch_size, icl_batch_tokens // bucket_length(max(map(len, prompts)))))

    def student(records):
        prompts = [base.chat_ids(student_messages(r["prompt"])) for r in records]
        replies, internalize_s, answer_s, chunks, ranks = [], 0.0, 0.0, [], []
        for i in tqdm(range(0, len(records), batch_size), desc="d2l", leave=False, disable=not progress):
            batch = records[i : i + batch_size]
            start = time.perf_counter()
            adapters = d2l.adapters([r["context"] for r in batch])
            jax.block_until_ready([a.lora for a in adapters])
            middle = time.perf_counter()
            replies += base.generate_ids(prompts[i : i + batch_size], m, lora=stack_adapters(adapters))
            internalize_s += middle - start
            answer_s += time.perf_counter() - middle
            chunks += [a.num_chunks for a in adapters]
            ranks += [a.rank for a in adapters]
        return {
            "replies": replies,
            "internalize_s": internalize_s / len(records),
            "answer_s": answer_s / len(records),
            "prompt_tokens": float(np.mean([len(p) for p in prompts])),
            "chunks": float(np.mean(chunks)),
            "adapter_rank": int(max(ranks)),
        }

    def in_context(records):
        prompts = [base.chat_ids(student_messages(r["prompt"], context=r["context"])) for r in records]
        longest = max(map(len, prompts))
        if longest + m > window:
            return {
                "status": f"not run: exceeds window {window} (longest prompt {longest} tokens + {m} new tokens)",
                "prompt_tokens": float(np.mean([len(p) for p in prompts])),
            }
        return {**answer(prompts, in_context_rows(prompts), "icl"), "prompt_tokens": float(np.mean([len(p) for p in prompts]))}

    def truncated(records):
        full = [base.chat_ids(student_messages(r["prompt"], context=r["context"])) for r in records]
        prompts = [truncate_middle(p, window, m) for p in full]
        return {
            **answer(prompts, in_context_rows(prompts), "truncated_icl"),
            "prompt_tokens": float(np.mean([len(p) for p in prompts])),
            "truncated": sum(len(p) < len(f) for p, f in zip(prompts, full)),
        }

    def no_document(records):
        prompts = [base.chat_ids(student_messages(r["prompt"])) for r in records]
        return {**answer(prompts, batch_size, "base"), "prompt_tokens": float(np.mean([len(p) for p in prompts]))}

    all_methods = {"d2l": student, "icl": in_context, "truncated_icl": truncated, "base": no_document}
    return {name: all_methods[name] for name in methods}
