"""Needle-in-a-haystack (NIAH) records: a magic number hidden among repeated noise sentences.

A context of ``k`` blocks is ``k - 1`` copies of :data:`NOISE_BLOCK` with one needle,
``NEEDLE.format(number=n)``, inserted at some block index; blocks are joined with ``"\\n"``. The
question is :data:`NIAH_PROMPT` and the expected reply is the number as four digits.

Records are grouped by

* depth bin ``b`` in ``0 .. NUM_DEPTH_BINS - 1``: the needle sits in the ``b``-th tenth of the blocks
  (see :func:`needle_index_range`);
* token-length bin ``[lo, hi)``: the number of blocks is chosen so that the context has between ``lo``
  and ``hi`` tokens (see :func:`blocks_for_tokens`);
* split: the magic numbers 0000-9999 are divided once, deterministically, between ``train``, ``val``
  and ``test`` so that no number seen in training is asked for in evaluation (see :func:`split_numbers`).

:func:`niah_record` builds one record; :class:`NIAHSource` serves them as a grain random-access data
source and :func:`cell_records` draws the few records of one (length bin, depth bin) cell of a sweep.
:func:`prose_needle_records` hides the same needle in real paragraphs instead of the noise.
"""

from __future__ import annotations

import functools
import operator
import re
from typing import Any, Sequence, SupportsIndex

import numpy as np

NOISE_BLOCK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The special magic number is {number:04d}."
NIAH_PROMPT = "What is the special magic number? Reply with only the number."
NUM_DEPTH_BINS = 10
SPLITS = ("train", "val", "test")

NUM_NUMBERS = 10_000
# How many of the 10,000 magic numbers each split gets, in the order of SPLITS.
SPLIT_SIZES = (9_000, 500, 500)
_SPLIT_SEED = 20_240_601  # fixed forever: changing it reshuffles which numbers belong to which split
_FIRST_NUMBER = re.compile(r"(?<!\d)\d{4}(?!\d)")


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def niah_context(num_blocks: int, needle_index: int, number: int) -> str:
    """The haystack: ``num_blocks - 1`` noise blocks and the needle with ``number`` at ``needle_index``.

    Raises:
      ValueError: ``num_blocks < 1``, ``needle_index`` outside ``[0, num_blocks)`` or ``number``
        outside ``[0, 9999]``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0 <= needle_index < num_blocks:
        raise ValueError(f"needle_index must be in [0, {num_blocks}), got {needle_index}")
    if not 0 <= number < NUM_NUMBERS:
        raise ValueError(f"number must be in [0, {NUM_NUMBERS - 1}], got {number}")
    blocks = [NOISE_BLOCK] * (num_blocks - 1)
    blocks.insert(needle_index, NEEDLE.format(number=number))
    return "\n".join(blocks)


def needle_index_range(num_blocks: int, depth_bin: int) -> tuple[int, int]:
    """Inclusive range ``(start, end)`` of needle indices for ``depth_bin`` in a ``num_blocks`` context.

    ``start = floor(k * b / 10)`` and ``end = ceil(k * (b + 1) / 10) - 1``, both clamped to
    ``[0, k - 1]`` with ``end >= start``. Neighbouring bins share an index when ``k * (b + 1) / 10``
    is not a whole number, and the ten ranges together cover ``0 .. k - 1``.

    Raises:
      ValueError: ``num_blocks < 1`` or ``depth_bin`` outside ``[0, NUM_DEPTH_BINS)``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0 <= depth_bin < NUM_DEPTH_BINS:
        raise ValueError(f"depth_bin must be in [0, {NUM_DEPTH_BINS}), got {depth_bin}")
    start = num_blocks * depth_bin // NUM_DEPTH_BINS
    end = -(-num_blocks * (depth_bin + 1) // NUM_DEPTH_BINS) - 1  # ceil(k (b + 1) / 10) - 1
    start = min(max(start, 0), num_blocks - 1)
    end = min(max(end, start), num_blocks - 1)
    return start, end


def context_token_length(tokenizer: Any, num_blocks: int) -> int:
    """Tokens in the ``num_blocks`` context with the needle last and number 0000.

    Counted as ``len(tokenizer(context, add_special_tokens=False)["input_ids"])``: the context alone,
    without BOS or other special tokens (the reference implementation counted its tokenizer's BOS too,
    so its lengths are one higher for tokenizers that add one).
    """
    context = niah_context(num_blocks, num_blocks - 1, 0)
    return len(tokenizer(context, add_special_tokens=False)["input_ids"])


def _first_blocks_with_length(length: Any, target: int) -> int:
    """Smallest ``k >= 1`` with ``length(k) >= target`` for a non-decreasing ``length``."""
    high = 1
    while length(high) < target:  # double until the target is passed ...
        high *= 2
    low = high // 2 + 1 if high > 1 else 1  # ... then bisect: length(high) >= target, length(low - 1) < target
    while low < high:
        middle = (low + high) // 2
        if length(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return low


def blocks_for_tokens(tokenizer: Any, lo: int, hi: int) -> tuple[int, int]:
    """Half-open range ``(k_min, k_max)`` of block counts whose contexts have ``lo <= tokens < hi``.

    ``k_min`` is the first ``k`` whose context (needle last, number 0000; see
    :func:`context_token_length`) has at least ``lo`` tokens and ``k_max`` the first with at least
    ``hi``. Every block adds tokens, so the lengths grow with ``k`` and both are found by bisection.
    Other needle positions and numbers can change a context's length by the few tokens where the
    needle meets its neighbours; with SmolLM2's tokenizer (single-digit tokens, ``"\\n"`` a token of
    its own) the length does not depend on them at all.

    Raises:
      ValueError: ``lo < 1``, ``lo >= hi``, or no block count lands in ``[lo, hi)``.
    """
    if lo < 1 or lo >= hi:
        raise ValueError(f"need 1 <= lo < hi for a token-length bin, got lo={lo}, hi={hi}")
    length = functools.lru_cache(maxsize=None)(lambda k: context_token_length(tokenizer, k))
    k_min = _first_blocks_with_length(length, lo)
    k_max = _first_blocks_with_length(length, hi)
    if k_min >= k_max:
        raise ValueError(
            f"no context has between {lo} and {hi} tokens: the shortest with at least {lo} has "
            f"{length(k_min)} tokens ({k_min} blocks); widen the bin"
        )
    return k_min, k_max


@functools.lru_cache(maxsize=1)
def _number_permutation() -> np.ndarray:
    permutation = np.random.default_rng(_SPLIT_SEED).permutation(NUM_NUMBERS)
    permutation.flags.writeable = False
    return permutation


def split_numbers(split: str) -> np.ndarray:
    """The magic numbers reserved for ``split`` (a read-only int array).

    A fixed permutation of 0..9999 (seeded with a constant) cut into 9000 train, 500 val and 500 test
    numbers, so the splits are disjoint and the same on every run. Each split has every digit at
    every one of the four positions (checked by the tests).

    Raises:
      ValueError: ``split`` is not one of :data:`SPLITS`.
    """
    index = _split_index(split)
    start = sum(SPLIT_SIZES[:index])
    return _number_permutation()[start : start + SPLIT_SIZES[index]]


def first_number(text: str) -> str | None:
    """The answer read from a reply: its first run of exactly four digits, or None.

    Runs of other lengths are skipped whole (``"12345 then 6789"`` gives ``"6789"``); punctuation
    and words around the digits do not matter (``"1234."`` gives ``"1234"``). A reply is scored
    correct when this equals the record's ``response``.
    """
    match = _FIRST_NUMBER.search(text)
    return match.group(0) if match else None


def niah_record(num_blocks: int, depth_bin: int, needle_index: int, number: int) -> dict[str, Any]:
    """One NIAH record: ``context`` (:func:`niah_context`), ``prompt`` (:data:`NIAH_PROMPT`), ``response``
    (``number`` as four digits) and the fields it was built from (``num_blocks``, ``depth_bin``,
    ``needle_index``, ``number``).

    ``depth_bin`` is recorded as given, not checked against ``needle_index``. Raises ValueError as
    :func:`niah_context` does.
    """
    return {
        "context": niah_context(num_blocks, needle_index, number),
        "prompt": NIAH_PROMPT,
        "response": f"{number:04d}",
        "num_blocks": num_blocks,
        "depth_bin": depth_bin,
        "needle_index": needle_index,
        "number": number,
    }


def _drawn_record(rng: np.random.Generator, num_blocks: int, depth_bin: int, numbers: np.ndarray) -> dict[str, Any]:
    """:func:`niah_record` with the needle index drawn uniformly within ``depth_bin``'s range, then the
    number uniformly from ``numbers`` (in that order: the order of the draws fixes every record)."""
    start, end = needle_index_range(num_blocks, depth_bin)
    needle_index = int(rng.integers(start, end + 1))
    number = int(numbers[rng.integers(len(numbers))])
    return niah_record(num_blocks, depth_bin, needle_index, number)


def cell_records(tokenizer: Any, lo: int, hi: int, depth_bin: int, n: int, seed: int, split: str = "test") -> list[dict[str, Any]]:
    """``n`` records (one cell of a sweep) with ``lo <= context tokens < hi`` and the needle in ``depth_bin``.

    Block counts are spread evenly over the bin's range (:func:`blocks_for_tokens`): sample j has
    ``k_min + (2j + 1)(k_max - k_min) // 2n`` blocks. Its needle index and number are drawn from
    ``np.random.default_rng([seed, lo, hi, depth_bin, j])``, so a cell's records never change. Each record
    is a :func:`niah_record` plus ``context_tokens`` (counted as :func:`context_token_length` does).

    Raises:
      ValueError: as :func:`blocks_for_tokens`, :func:`needle_index_range` and :func:`split_numbers` do.
    """
    k_min, k_max = blocks_for_tokens(tokenizer, lo, hi)
    numbers = split_numbers(split)
    records = []
    for j in range(n):
        num_blocks = k_min + (2 * j + 1) * (k_max - k_min) // (2 * n)
        record = _drawn_record(np.random.default_rng([seed, lo, hi, depth_bin, j]), num_blocks, depth_bin, numbers)
        record["context_tokens"] = len(tokenizer(record["context"], add_special_tokens=False)["input_ids"])
        records.append(record)
    return records


class NIAHSource:
    """NIAH records for one split and token-length bin, as a grain random-access data source.

    Record ``i`` depends only on ``(seed, split, i)`` (and the bin's block range): its depth bin is
    ``i % 10``; its block count cycles through the bin's range as ``k_min + (i // 10) % n_k``, so
    every (depth bin, block count) pair appears once in each run of ``10 * n_k`` records; the needle
    index is uniform within the depth bin's range and the number uniform over the split's numbers,
    both drawn from ``np.random.default_rng([seed, split_index, i])``.

    The tokenizer is used only in the constructor (to find the block range), so the source holds
    plain data and pickles cheaply for grain's worker processes.

    Attributes:
      split: ``"train"``, ``"val"`` or ``"test"``.
      lo, hi: the token-length bin, ``lo <= tokens < hi``.
      num_blocks_range: ``(k_min, k_max)``, half-open, from :func:`blocks_for_tokens`.
      seed: the seed records are drawn with.
    """

    def __init__(self, tokenizer: Any, split: str, lo: int, hi: int, num_records: int, seed: int = 42):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split = split
        self._split_index = _split_index(split)
        self.lo, self.hi = lo, hi
        self.num_blocks_range = blocks_for_tokens(tokenizer, lo, hi)
        self.seed = seed
        self._num_records = num_records
        self._numbers = split_numbers(split)

    def __len__(self) -> int:
        return self._num_records

    def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
        """Record ``record_key`` (``0 <= record_key < len(self)``; IndexError otherwise)."""
        i = operator.index(record_key)
        if not 0 <= i < self._num_records:
            raise IndexError(f"record {i} is out of range for a source of {self._num_records} records")
        k_min, k_max = self.num_blocks_range
        num_blocks = k_min + (i // NUM_DEPTH_BINS) % (k_max - k_min)
        rng = np.random.default_rng([self.seed, self._split_index, i])
        return _drawn_record(rng, num_blocks, i % NUM_DEPTH_BINS, self._numbers)

    def __repr__(self) -> str:
        return (
            f"NIAHSource(split={self.split!r}, lo={self.lo}, hi={self.hi}, "
            f"num_blocks_range={self.num_blocks_range}, num_records={self._num_records}, seed={self.seed})"
        )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def prose_needle_records(paragraphs: Sequence[str], n: int, seed: int, split: str = "test") -> list[dict[str, Any]]:
    """``n`` NIAH records whose haystack is real prose: each of ``n`` distinct paragraphs drawn from
    ``paragraphs`` with :data:`NEEDLE` inserted at a sentence boundary drawn uniformly (before the first
    sentence to after the last), a number drawn from ``split``'s, and :data:`NIAH_PROMPT` as the question.

    Records carry ``context``, ``prompt``, ``response``, ``number``, ``needle_index`` (sentences before the
    needle) and ``sentences``. Raises ValueError when there are fewer than ``n`` distinct non-empty paragraphs.
    """
    unique = list(dict.fromkeys(p.strip() for p in paragraphs if p.strip()))
    if len(unique) < n:
        raise ValueError(f"n={n} prose needles need {n} distinct paragraphs; {len(unique)} given")
    rng = np.random.default_rng(seed)
    numbers = split_numbers(split)
    records = []
    for index in rng.choice(len(unique), n, replace=False):
        sentences = _SENTENCE_END.split(unique[index])
        needle_index = int(rng.integers(len(sentences) + 1))
        number = int(numbers[rng.integers(len(numbers))])
        context = " ".join(sentences[:needle_index] + [NEEDLE.format(number=number)] + sentences[needle_index:])
        records.append({
            "context": context,
            "prompt": NIAH_PROMPT,
            "response": f"{number:04d}",
            "number": number,
            "needle_index": needle_index,
            "sentences": len(sentences),
        })
    return records
