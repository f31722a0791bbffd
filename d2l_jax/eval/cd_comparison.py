"""D2L against oracle context distillation (CD) on the same NIAH documents: accuracy, update latency, memory.

For each document D2L internalizes it once; oracle CD trains a fresh rank-8 LoRA on the test question
against the teacher with the document in its prompt, once per step budget. Both then answer the question
without the document, and the reply is scored by ``eval.niah.is_correct`` (its first 4-digit number).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from d2l_jax.api import D2L, stack_adapters
from d2l_jax.baselines.context_distillation import PeakMemory, distill_oracle
from d2l_jax.data.examples import student_messages
from d2l_jax.eval.niah import is_correct
from d2l_jax.models.lora import LoRA


def compare_with_cd(
    d2l: D2L,
    records: Sequence[dict],
    budgets: Sequence[int],
    warmup: dict | None = None,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict:
    """Runs D2L and CD at every step budget on ``records`` (NIAH records: ``context``, ``prompt``,
    ``response``, ``depth_bin``, ``context_tokens``).

    Replies (the answers, and the teacher's replies CD distils on) have at most ``max_new_tokens`` tokens.
    ``warmup`` (a record of the same kind) is updated on by every method first and not scored, so the
    latencies of ``records`` exclude compilation. Documents longer than ``d2l``'s chunk budget are
    internalized segment by segment (``D2L.adapters``); the current adapter is left as it is.

    Returns ``{"rows": [...], "summary": {...}}``: a row per (document, method) with ``method`` (``"d2l"``
    or ``"cd_<steps>"``), ``update_seconds``, ``peak_memory_gb`` (the process's resident memory during
    the update), ``reply``, ``correct`` and, for CD, its time split and final loss; the summary maps each
    method to its ``accuracy``, median ``update_seconds``, largest ``peak_memory_gb`` and, for CD,
    ``cd_steps``.
    """
    if not records:
        raise ValueError("records is empty: nothing to compare on")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be non-empty step counts >= 1, got {list(budgets)}")

    def d2l_update(record) -> tuple[LoRA, float, float, dict]:
        with PeakMemory() as memory:
            start = time.perf_counter()
            lora = jax.block_until_ready(stack_adapters(d2l.adapters([record["context"]])))
            seconds = time.perf_counter() - start
        return lora, seconds, memory.peak_gb, {}

    def cd_update(record, steps) -> tuple[LoRA, float, float, dict]:
        result = distill_oracle(
            d2l.base, record["context"], record["prompt"], steps=steps, max_response_tokens=max_new_tokens, progress=False
        )
        parts = {k: result.summary()[k] for k in ("response_seconds", "teacher_seconds", "train_seconds", "final_loss")}
        return result.adapter.lora, result.update_seconds, result.peak_memory_gb, parts

    methods = {"d2l": d2l_update} | {f"cd_{s}": (lambda r, s=s: cd_update(r, s)) for s in budgets}
    if warmup is not None:
        for update in methods.values():
            update(warmup)

    rows = []
    for record in tqdm(records, desc="documents", disable=not progress):
        for method, update in methods.items():
            lora, seconds, peak_gb, parts = update(record)
            reply = d2l.base.generate([student_messages(record["prompt"])], max_new_tokens=max_new_tokens, lora=lora)[0]
            rows.append(
                dict(method=method, depth=record["depth_bin"], context_tokens=record["context_tokens"], update_seconds=seconds,
                     peak_memory_gb=peak_gb, reply=reply, response=record["response"],
                     correct=is_correct(reply, record), **parts)
            )

    summary = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = dict(
            accuracy=float(np.mean([r["correct"] for r in mine])),
            update_seconds=float(np.median([r["update_seconds"] for r in mine])),
            peak_memory_gb=float(max(r["peak_memory_gb"] for r in mine)),
        ) | ({"cd_steps": int(method[3:])} if method.startswith("cd_") else {})
    return {"rows": rows, "summary": summary}
