"""In-context answering at any length: the reference's truncated in-context input, and the compiled
memory of an answer program (what a long prompt's KV cache costs beside a small adapter)."""

from __future__ import annotations

from typing import Sequence

from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.lora import LoRA


def truncate_middle(ids: Sequence[int], window: int, max_new_tokens: int) -> list[int]:
    """The reference's truncated in-context input: when ``len(ids) + max_new_tokens`` exceeds ``window``,
    keep the first and the last ``(window - max_new_tokens) // 2`` tokens (the middle of the document is
    dropped; the chat header and the question survive). Shorter inputs come back unchanged.

    Raises ValueError when ``max_new_tokens >= window``.
    """
    if max_new_tokens >= window:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in a window of {window} tokens")
    ids = list(ids)
    if len(ids) + max_new_tokens <= window:
        return ids
    keep = (window - max_new_tokens) // 2
    return ids[:keep] + ids[len(ids) - keep :]


def answer_program_bytes(
    base: BaseModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, lora: LoRA | None = None
) -> dict[str, int]:
    """XLA's buffer assignment for the program :meth:`BaseModel.generate_ids` runs on these prompts (compiled,
    not run): ``arguments`` (base parameters, adapter, prompt), ``temporaries`` (KV cache, activations),
    ``outputs``, and ``total`` = their sum minus aliased bytes, an upper bound on its live memory."""
    args, buffer = base.generation_args(prompts, max_new_tokens, lora)
    stats = gen.generate_tokens.lower(*args, buffer=buffer).compile().memory_analysis()
    arguments, temporaries, outputs = stats.argument_size_in_bytes, stats.temp_size_in_bytes, stats.output_size_in_bytes
    return {
        "arguments": int(arguments),
        "temporaries": int(temporaries),
        "outputs": int(outputs),
        "total": int(arguments + temporaries + outputs - stats.alias_size_in_bytes),
    }
