"""Documents as chat-templated token ids, and their split into chunks that each look like a user turn."""

from __future__ import annotations

import math

_SENTINEL = "\u2063D2L-DOCUMENT\u2063"
# How the reference's chat templates (Gemma-2's and Mistral's) fold a system message into the first user
# turn: ``system + "\n\n" + user``. With its empty system message this leaves "\n\n" before the document.
_FOLDED_SYSTEM_SEPARATOR = "\n\n"


def document_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after a document placed as the user turn after an empty system turn, ending
    with the generation prompt (the reference's context format), from the tokenizer's chat template.

    A template that refuses a system turn (the stock Gemma-2 one raises "System role not supported") gets
    the user turn alone with the empty system message folded in front of the document as the reference's
    own templates fold it (``"" + "\n\n"``), so both give the reference's Gemma-2 affixes
    ``<bos><start_of_turn>user\n\n\n`` / ``<end_of_turn>\n<start_of_turn>model\n``. Raises ValueError
    when the template does not place the user message verbatim.
    """
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # templates without a system role raise (jinja's TemplateError via raise_exception)
        text = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)
        # Inserted after rendering: templates trim the user content, which would drop a leading separator.
        text = text.replace(_SENTINEL, _FOLDED_SYSTEM_SEPARATOR + _SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not place the user message verbatim; cannot derive document affixes")
    prefix, suffix = text.split(_SENTINEL)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    return encode(prefix), encode(suffix)


def require_unicode_text(text: str, what: str = "the document") -> None:
    """Raises ValueError naming ``what`` and the character index when ``text`` holds a lone surrogate
    (``"\\ud800"``, which JSON escapes and Python strings allow but no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode text: character {e.start} is {text[e.start]!r}, a lone surrogate ({e.reason})"
        ) from e


def tokenize_document(tokenizer, document: str, affixes: tuple[list[int], list[int]]) -> list[int]:
    """The templated token ids of one document. Raises TypeError for non-text, ValueError for empty text or
    text that is not valid Unicode (a lone surrogate; the message gives its character index)."""
    if not isinstance(document, str):
        raise TypeError(f"a document must be a str, got {type(document).__name__}")
    if not document.strip():
        raise ValueError("the document is empty")
    require_unicode_text(document)
    prefix, suffix = affixes
    return prefix + tokenizer(document.strip(), add_special_tokens=False)["input_ids"] + suffix


def split_into_chunks(ids: list[int], affixes: tuple[list[int], list[int]], max_chunk_len: int) -> list[list[int]]:
    """Splits templated ids into ``ceil(len / max_chunk_len)`` contiguous pieces of equal length (the
    last may be shorter) and re-wraps them: the first gets the suffix, middle ones prefix and suffix,
    the last the prefix, so each chunk is a complete user turn."""
    pieces = math.ceil(len(ids) / max_chunk_len)
    if pieces <= 1:
        return [list(ids)]
    size = math.ceil(len(ids) / pieces)
    prefix, suffix = affixes
    chunks = [list(ids[i : i + size]) for i in range(0, len(ids), size)]
    return [(prefix if i else []) + c + (suffix if i < len(chunks) - 1 else []) for i, c in enumerate(chunks)]


def chunk_document(
    ids: list[int], affixes: tuple[list[int], list[int]], max_chunk_len: int, num_pieces: int | None = None
) -> list[list[int]]:
    """Chunks of templated ids, each at most ``max_chunk_len`` tokens with its affixes.

    A document that fits stays whole; a longer one is split into the fewest pieces that leave room for
    the affixes, or into ``num_pieces`` pieces when given (training's sampled chunk count; at least the
    fewest that fit). Raises ValueError when the affixes alone do not fit.
    """
    room = max_chunk_len - sum(map(len, affixes))
    if room < 1:
        raise ValueError(f"max_chunk_len={max_chunk_len} leaves no room beside the chat affixes ({sum(map(len, affixes))} tokens)")
    fewest = 1 if len(ids) <= max_chunk_len else math.ceil(len(ids) / room)
    pieces = max(fewest, num_pieces or 1)
    return split_into_chunks(ids, affixes, math.ceil(len(ids) / pieces) if pieces > 1 else len(ids))
