"""Cost of D2L versus context distillation and in-context learning: latency, KV-cache bytes, compiled memory.

For one document, D2L pays once to internalize it (context encoder + hypernetwork) and then answers
from the question alone with a small adapter; context distillation (CD) pays once too, but trains a
fresh LoRA for it (oracle CD: on the test question, at a step budget); in-context learning (ICL) pays at
every question for a prompt that holds the whole document, and its KV cache grows with it. The figures
here put numbers on all three: wall-clock seconds (measured after a warm-up call on the same shapes, so
compilation is not counted), the analytic KV-cache size, the adapter size, and XLA's buffer assignment
of the answer program.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from d2l_jax.api import D2L, stack_adapters
from d2l_jax.baselines.context_distillation import REFERENCE_EPOCHS, distill_oracle
from d2l_jax.data.examples import student_messages
from d2l_jax.eval.in_context import answer_program_bytes
from d2l_jax.hypernet.adapter import adapter_bytes
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import LoRA


def kv_cache_bytes(config: DecoderConfig, tokens: int) -> int:
    """Bytes of the keys and values of ``tokens`` tokens: ``2 * layers * kv_heads * head_dim * tokens * itemsize``
    (itemsize of the model's compute dtype)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    itemsize = jnp.dtype(config.dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * tokens * itemsize


def _seconds(fn, repeats: int) -> tuple[Any, float]:
    """(result, mean wall-clock seconds of ``repeats`` calls after one warm-up call)."""
    result = jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        result = jax.block_until_ready(fn())
    return result, (time.perf_counter() - start) / repeats


def _answer_costs(d2l: D2L, record: dict, lora: LoRA, max_new_tokens: int, repeats: int, program_memory: bool) -> dict:
    """Costs of answering ``record["prompt"]`` with ``lora`` and no document (D2L's and CD's answer)."""
    base = d2l.base
    prompt = base.chat_ids(student_messages(record["prompt"]))
    reply, answer_s = _seconds(lambda: base.generate_ids([prompt], max_new_tokens, lora=lora), repeats)
    kv = kv_cache_bytes(base.config, len(prompt) + max_new_tokens)
    size = adapter_bytes(lora)
    out = {
        "status": "ok",
        "reply": reply[0],
        "answer_s": answer_s,
        "prompt_tokens": len(prompt),
        "kv_cache_bytes": kv,
        "adapter_bytes": size,
        "answer_state_bytes": kv + size,
    }
    if program_memory:
        out["answer_program_bytes"] = answer_program_bytes(base, [prompt], max_new_tokens, lora=lora)["total"]
    return out


def _in_context_prompt(d2l: D2L, record: dict, max_new_tokens: int) -> tuple[list[int], str | None]:
    """(the prompt with the document before the question, why it cannot run or None)."""
    base = d2l.base
    prompt = base.chat_ids(student_messages(record["prompt"], context=record["context"]))
    window = base.config.max_position_embeddings
    if len(prompt) + max_new_tokens > window:
        return prompt, f"not run: exceeds window {window} (prompt {len(prompt)} + {max_new_tokens} new tokens)"
    return prompt, None


def d2l_costs(d2l: D2L, record: dict, max_new_tokens: int, repeats: int = 1, program_memory: bool = True) -> dict:
    """Costs of answering ``record["prompt"]`` about ``record["context"]`` with D2L.

    Returns ``internalize_s`` (document -> adapter, chunked for long documents), ``answer_s`` (one greedy
    reply of at most ``max_new_tokens`` with the adapter and no document), ``prompt_tokens``,
    ``kv_cache_bytes`` (prompt + reply), ``adapter_bytes``, ``answer_state_bytes`` (their sum: what the
    answer needs beyond the base parameters), ``adapter_rank``, ``chunks`` and, with ``program_memory``,
    ``answer_program_bytes`` (see ``in_context.answer_program_bytes``).
    """
    adapters, internalize_s = _seconds(lambda: d2l.adapters([record["context"]]), repeats)
    out = _answer_costs(d2l, record, stack_adapters(adapters), max_new_tokens, repeats, program_memory)
    return out | {"internalize_s": internalize_s, "adapter_rank": adapters[0].rank, "chunks": adapters[0].num_chunks}


def cd_costs(
    d2l: D2L, record: dict, max_new_tokens: int, repeats: int = 1, program_memory: bool = True, steps: int = REFERENCE_EPOCHS
) -> dict:
    """Costs of answering with oracle context distillation at a budget of ``steps`` optimizer steps
    (``baselines.context_distillation.distill_oracle``: a fresh rank-8 LoRA trained on the test question
    against the teacher's reply of at most ``max_new_tokens`` tokens, document in the teacher's prompt).

    The update is timed after a one-step warm-up on the same document (so every program is compiled but
    the budget is not paid twice). Returns ``update_s`` (teacher reply + teacher targets + training) and
    its parts ``response_s``, ``teacher_s``, ``train_s``, ``cd_steps``, ``final_loss``, ``update_peak_rss_gb``
    (the process's resident memory during the update), ``adapter_rank``, and the answer fields of
    :func:`d2l_costs`. The teacher must hold the document: beyond the window only ``status`` is given.
    """
    _, not_run = _in_context_prompt(d2l, record, max_new_tokens)
    if not_run:
        return {"status": f"{not_run}: the teacher needs the document in its prompt", "cd_steps": steps}
    distill = lambda budget: distill_oracle(
        d2l.base, record["context"], record["prompt"], steps=budget, max_response_tokens=max_new_tokens, progress=False
    )
    distill(1)  # compiles every program of the update
    updates = [distill(steps) for _ in range(repeats)]
    result = updates[-1]
    out = _answer_costs(d2l, record, result.adapter.lora, max_new_tokens, repeats, program_memory)
    mean = lambda name: sum(getattr(u, name) for u in updates) / repeats
    return out | {
        "update_s": mean("update_seconds"),
        "response_s": mean("response_seconds"),
        "teacher_s": mean("teacher_seconds"),
        "train_s": mean("train_seconds"),
        "cd_steps": steps,
        "final_loss": float(result.losses[-1]),
        "update_peak_rss_gb": max(u.peak_memory_gb for u in updates),
        "adapter_rank": result.adapter.rank,
    }


def icl_costs(d2l: D2L, record: dict, max_new_tokens: int, repeats: int = 1, program_memory: bool = True) -> dict:
    """Costs of answering with the document in the prompt (the base model, no adapter).

    Beyond the model's window nothing runs: ``status`` says so and only the analytic ``kv_cache_bytes``
    (what the prompt would need) is given. Otherwise the same fields as :func:`d2l_costs` without the
    internalization and adapter entries.
    """
    base = d2l.base
    prompt, not_run = _in_context_prompt(d2l, record, max_new_tokens)
    kv = kv_cache_bytes(base.config, len(prompt) + max_new_tokens)
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "kv_cache_bytes": kv, "answer_state_bytes": kv}
    if not_run:
        return out | {"status": not_run}
    reply, answer_s = _seconds(lambda: base.generate_ids([prompt], max_new_tokens), repeats)
    out.update(status="ok", reply=reply[0], answer_s=answer_s)
    if program_memory:
        out["answer_program_bytes"] = answer_program_bytes(base, [prompt], max_new_tokens)["total"]
    return out


EFFICIENCY_METHODS = {"d2l": d2l_costs, "cd": cd_costs, "icl": icl_costs}
