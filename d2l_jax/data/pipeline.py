"""Grain pipelines from record sources to static-shape training batches, and generic record sources."""

from __future__ import annotations

import functools
import reprlib
import tempfile
from pathlib import Path
from typing import Any

import grain
import numpy as np

from d2l_jax.data.examples import BatchShapes, TrainExampleBuilder, collate, fits

RECORD_FIELDS = ("context", "prompt", "response")
# grain concatenates finite datasets only: after a warmup, the main stream repeats for more epochs than any run needs.
_MAIN_EPOCHS = 1_000


def training_batches(
    sources,
    builder: TrainExampleBuilder,
    shapes: BatchShapes,
    batch_size: int,
    micro_batches: int = 1,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    warmup_sources=(),
    warmup_records: int = 0,
) -> grain.IterDataset:
    """An endless, shuffled (reshuffled each epoch), checkpointable stream of training batches.

    ``sources`` is a random-access source of ``{"context", "prompt", "response"}`` records, or a list of
    them mixed in equal proportions. Each process reads its own ``shard_index``-th of every
    ``shard_count`` records and builds batches of ``batch_size * micro_batches`` examples shaped
    ``[micro_batches, batch_size, ...]``. Examples that do not fit ``shapes`` are skipped, as the
    reference drops them. A curriculum: with ``warmup_sources``, each process's first ``warmup_records``
    records come from them (mixed the same way), the rest from ``sources``.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} outside [0, shard_count={shard_count})")
    if warmup_records < 0 or (warmup_records and not warmup_sources):
        raise ValueError(f"warmup_records={warmup_records} needs warmup_sources and must be >= 0")

    def shuffled_mix(sources, seed):
        sources = sources if isinstance(sources, (list, tuple)) else [sources]
        parts = [grain.MapDataset.source(s)[shard_index::shard_count].seed(seed + i).shuffle() for i, s in enumerate(sources)]
        return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts)

    for source in [*(sources if isinstance(sources, (list, tuple)) else [sources]), *(warmup_sources or [])]:
        require_fitting_records(source, builder, shapes)
    if warmup_records:
        warmup = shuffled_mix(warmup_sources, seed + 1_000).repeat()[:warmup_records]
        dataset = grain.MapDataset.concatenate([warmup, shuffled_mix(sources, seed).repeat(_MAIN_EPOCHS)])
    else:
        dataset = shuffled_mix(sources, seed).repeat()
    return (
        dataset.random_map(builder, seed=seed)
        .to_iter_dataset()
        .filter(functools.partial(fits, shapes=shapes))
        .batch(batch_size * micro_batches, drop_remainder=True, batch_fn=functools.partial(collate, shapes=shapes, micro_batches=micro_batches))
    )


def _source_name(source) -> str:
    short = reprlib.Repr()
    short.maxother = 300  # a source's own repr whole, a list of records cut short
    return short.repr(source)


def require_fitting_records(source, builder, shapes: BatchShapes, probe: int = 16) -> None:
    """Raises ValueError when none of ``source``'s first ``probe`` records fits ``shapes``: the stream skips
    the records that do not fit, so with none fitting it would wait forever instead of failing."""
    rng = np.random.default_rng(0)
    examples = [builder(source[i], rng) for i in range(min(probe, len(source)))]
    if examples and not any(fits(e, shapes) for e in examples):
        e = examples[0]
        raise ValueError(
            f"none of the first {len(examples)} records of {_source_name(source)} fits the batch shapes {shapes}; the first has "
            f"{len(e['chunks'])} chunks of up to {max(map(len, e['chunks']))} tokens, {len(e['tokens'])} student tokens, "
            f"{e['label_end'] - e['label_start']} labels and {len(e.get('teacher_tokens', ()))} teacher tokens"
        )


class RecordSource:
    """Random access to ``{"context", "prompt", "response", ...}`` records from a JSON Lines (``.jsonl``, or
    ``.json``) or parquet (``.parquet``) file, read whole into memory with ``datasets``.

    Raises ValueError naming the file: for another suffix, a file that has no records or cannot be read,
    and a record that lacks a field (or holds null there), which it names by number from 0; FileNotFoundError
    when there is no such file.
    """

    def __init__(self, path: str | Path):
        import datasets  # only record files need it, and it adds 0.6 s to importing d2l_jax

        self.path = Path(path)
        readers = {".jsonl": datasets.Dataset.from_json, ".json": datasets.Dataset.from_json, ".parquet": datasets.Dataset.from_parquet}
        if self.path.suffix not in readers:
            raise ValueError(f"{self.path}: expected a .jsonl or .parquet file")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such record file")
        # datasets converts the file to Arrow under cache_dir even when it keeps the result in memory:
        # a folder of our own, deleted at once, keeps the user's cache out of it and runs independent.
        with tempfile.TemporaryDirectory(prefix="d2l_records_") as cache:
            try:
                self.records = readers[self.path.suffix](str(self.path), cache_dir=cache, keep_in_memory=True)
            except Exception as e:  # an empty file fails inside datasets (StopIteration, DatasetGenerationError)
                raise ValueError(f"{self.path} has no records or cannot be read: {type(e).__name__}: {e}") from e
        if len(self.records) == 0:
            raise ValueError(f"{self.path} has no records")
        # A field absent from some JSON records is a column holding null there; absent from all, no column.
        present = self.records.column_names
        lacks = np.array([[v is None for v in self.records[k]] if k in present else [True] * len(self.records) for k in RECORD_FIELDS])
        if lacks.any():
            number = int(lacks.any(axis=0).argmax())
            missing = [k for k, row in zip(RECORD_FIELDS, lacks) if row[number]]
            raise ValueError(f"{self.path}: record {number} lacks {missing}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Records share the file's columns; a field a record lacks (null there) stays absent from its dict.
        return {k: v for k, v in self.records[int(index)].items() if v is not None}

    def __repr__(self) -> str:
        return f"RecordSource({str(self.path)!r})"
