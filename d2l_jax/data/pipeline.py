"""Grain pipelines from record sources to static-shape training batches, and generic record sources."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import reprlib
import tempfile
from pathlib import Path
from typing import Any, Mapping

import grain
import numpy as np

from d2l_jax.data.chunking import require_unicode_text
from d2l_jax.data.examples import EXTRA_QUERIES, QUERY_FIELDS, BatchShapes, TrainExampleBuilder, collate, fits, queries

log = logging.getLogger(__name__)

RECORD_FIELDS = ("context", "prompt", "response")
# The key of what a RecordSource serves in place of a record it found unusable: where and why, for the
# training stream's bad-record policy (``record_problem`` returns it).
UNUSABLE = "unusable_record"
# grain concatenates finite datasets only: after a warmup, the main stream repeats for more epochs than any run needs.
_MAIN_EPOCHS = 1_000
BAD_RECORD_POLICIES = ("skip", "stop")
# What a record builder raises for a record it cannot use (an empty or non-text field, a missing field).
BAD_RECORD_ERRORS = (ValueError, TypeError, KeyError)
# The shares of bad records and dropped examples are judged from this many records on, so that the first
# few do not decide (with the default 1% limit, one bad record among the first 100 is tolerated).
MIN_RECORDS_FOR_SHARES = 100
# Bad records named in a warning (each once); later ones are only counted.
MAX_BAD_RECORD_WARNINGS = 10


@dataclasses.dataclass
class RecordStats:
    """What one process's training stream has done with its records, counted as the stream yields them.

    Process-local statistics, saved with each checkpoint beside the data iterator's state (``as_dict``) and
    restored with it (``restore``), so a resumed run counts on; records that grain builds ahead but the
    stream has not yet reached are not counted.

    Attributes:
      records: records taken, bad ones included.
      bad: records that could not be made into examples (skipped under ``bad_records="skip"``).
      dropped: examples built but dropped because they do not fit the batch shapes (as the reference does).
    """

    records: int = 0
    bad: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def restore(self, saved: dict[str, int]) -> None:
        """Sets the counters to ``saved`` (``as_dict``'s; fields it lacks are left as they are)."""
        for field in dataclasses.fields(self):
            if field.name in saved:
                setattr(self, field.name, int(saved[field.name]))

    def as_metrics(self) -> dict[str, float]:
        """The counters as metrics: ``records_read``, ``bad_records``, ``dropped_examples``."""
        return {"records_read": float(self.records), "bad_records": float(self.bad), "dropped_examples": float(self.dropped)}

    def check(self, max_bad_share: float, max_dropped_share: float, min_records: int = MIN_RECORDS_FOR_SHARES) -> None:
        """Raises ValueError, naming the config field to raise, once at least ``min_records`` records were
        taken and the share of bad records passes ``max_bad_share`` or the share of built examples dropped
        for not fitting the shapes passes ``max_dropped_share``."""
        if self.records < min_records:
            return
        if self.bad > max_bad_share * self.records:
            raise ValueError(
                f"{self.bad} of the {self.records} training records read so far were bad and skipped "
                f"({self.bad / self.records:.1%}), more than data.max_bad_share={max_bad_share:g}: fix the records "
                "(the warnings name the first ones) or raise data.max_bad_share"
            )
        built = self.records - self.bad
        if built and self.dropped > max_dropped_share * built:
            raise ValueError(
                f"{self.dropped} of the {built} training examples built so far did not fit the batch shapes and were "
                f"dropped ({self.dropped / built:.1%}), more than data.max_dropped_share={max_dropped_share:g}: raise the "
                "shapes (data.chunks_per_context, data.max_student_len, data.max_labels, data.max_teacher_len, "
                "hypernet.max_chunk_len) or data.max_dropped_share"
            )


@dataclasses.dataclass(frozen=True)
class _BadRecord:
    """Stands in the stream for a record the builder rejected, until the (in-order) filter counts it."""

    source: str
    index: int
    error: Exception


def _bad_record_error(source: str, index: int, error: Exception) -> ValueError:
    return ValueError(
        f"record {index} of {source} is bad: {type(error).__name__}: {error} "
        "(data.bad_records='stop'; 'skip' skips and counts such records)"
    )


def _tag(number: int, length: int, index: int, record):
    # Grain hands later epochs' elements indices past the source's end (shuffle and repeat keep the epoch in them).
    return number, index % length, record


def _built(builder, record, rng: np.random.Generator):
    """``builder(record, rng)``, after raising ValueError for a record ``record_problem`` rejects."""
    problem = record_problem(record) if isinstance(record, Mapping) else f"expected a dict record, got {type(record).__name__}"
    if problem:
        raise ValueError(problem)
    return builder(record, rng)


class _BuildOrMark:
    """The builder as a grain ``random_map`` transform of ``(source number, index, record)``: a bad record
    becomes a ``_BadRecord`` instead of an exception in one of grain's reader threads."""

    def __init__(self, builder, names: tuple[str, ...]):
        self.builder, self.names = builder, names

    def __call__(self, tagged, rng: np.random.Generator):
        number, index, record = tagged
        try:
            return _built(self.builder, record, rng)
        except BAD_RECORD_ERRORS as error:
            return _BadRecord(self.names[number], int(index), error)


class _Admit:
    """The stream's filter, run in order in the consuming thread: counts records into ``stats``, applies
    the bad-record policy, drops examples that do not fit ``shapes`` and checks the shares' limits."""

    def __init__(self, shapes: BatchShapes, policy: str, stats: RecordStats, max_bad_share: float, max_dropped_share: float):
        self.shapes, self.policy, self.stats = shapes, policy, stats
        self.max_bad_share, self.max_dropped_share = max_bad_share, max_dropped_share
        self.warned: set[tuple[str, int]] = set()

    def __call__(self, example) -> bool:
        stats = self.stats
        stats.records += 1
        if isinstance(example, _BadRecord):
            if self.policy == "stop":
                raise _bad_record_error(example.source, example.index, example.error) from example.error
            stats.bad += 1
            key = (example.source, example.index)
            if key not in self.warned and len(self.warned) < MAX_BAD_RECORD_WARNINGS:
                self.warned.add(key)
                later = "; later bad records are only counted" if len(self.warned) == MAX_BAD_RECORD_WARNINGS else ""
                log.warning(
                    "skipped record %d of %s: %s: %s (data.bad_records='skip')%s",
                    example.index, example.source, type(example.error).__name__, example.error, later,
                )
            keep = False
        else:
            keep = fits(example, self.shapes)
            if not keep:
                stats.dropped += 1
        stats.check(self.max_bad_share, self.max_dropped_share)
        return keep


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
    bad_records: str = "skip",
    max_bad_share: float = 0.01,
    max_dropped_share: float = 0.5,
    stats: RecordStats | None = None,
) -> grain.IterDataset:
    """An endless, shuffled (reshuffled each epoch), checkpointable stream of training batches.

    ``sources`` is a random-access source of ``{"context", "prompt", "response"}`` records, or a list of
    them mixed in equal proportions. Each process reads its own ``shard_index``-th of every
    ``shard_count`` records and builds batches of ``batch_size * micro_batches`` examples shaped
    ``[micro_batches, batch_size, ...]``. A curriculum: with ``warmup_sources``, each process's first
    ``warmup_records`` records come from them (mixed the same way), the rest from ``sources``.

    Records that cannot be used (``bad_records``, as ``DataConfig.bad_records``): a record that
    ``record_problem`` rejects (a missing, empty or non-text field, a lone surrogate) or for which
    ``builder`` raises ValueError, TypeError or KeyError is, under ``"skip"``, skipped, counted and named
    in a warning (source and record index; each once, the first ``MAX_BAD_RECORD_WARNINGS``); under
    ``"stop"`` the stream raises ValueError naming the source and the record's index. Examples that do
    not fit ``shapes`` are dropped, as the reference drops them, and counted.

    ``stats``: a ``RecordStats`` the stream updates as it yields batches (a private one when None). It
    is process-local and not part of the iterator's checkpointed state: a resumed stream counts from
    the ``RecordStats`` it is given. From ``MIN_RECORDS_FOR_SHARES`` records on, the stream raises
    ValueError naming ``data.max_bad_share`` (``data.max_dropped_share``) when the share of bad records
    (of built examples dropped for not fitting) passes ``max_bad_share`` (``max_dropped_share``).
    A training loop passes the run's data config and writes the counters with its metrics::

        stats = RecordStats()
        batches = training_batches(..., bad_records=run.data.bad_records, max_bad_share=run.data.max_bad_share,
                                   max_dropped_share=run.data.max_dropped_share, stats=stats)
        metrics.update(stats.as_metrics())  # records_read, bad_records, dropped_examples

    Raises ValueError at once for bad arguments, and (see ``require_fitting_records``) when none of a
    source's first records fits the shapes or can be built.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} outside [0, shard_count={shard_count})")
    if warmup_records < 0 or (warmup_records and not warmup_sources):
        raise ValueError(f"warmup_records={warmup_records} needs warmup_sources and must be >= 0")
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records={bad_records!r}; expected one of {BAD_RECORD_POLICIES}")
    for name, share in (("max_bad_share", max_bad_share), ("max_dropped_share", max_dropped_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name}={share} must be a share in [0, 1]")
    stats = RecordStats() if stats is None else stats
    main = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    warmups = list(warmup_sources) if isinstance(warmup_sources, (list, tuple)) else [warmup_sources]
    names = tuple(_source_name(s) for s in main + warmups)

    def shuffled_mix(sources, first_number, seed):
        tagged = [grain.MapDataset.source(s).map_with_index(functools.partial(_tag, first_number + i, len(s))) for i, s in enumerate(sources)]
        parts = [t[shard_index::shard_count].seed(seed + i).shuffle() for i, t in enumerate(tagged)]
        return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts)

    for source in main + warmups:
        require_fitting_records(source, builder, shapes, bad_records=bad_records)
    if warmup_records:
        warmup = shuffled_mix(warmups, len(main), seed + 1_000).repeat()[:warmup_records]
        dataset = grain.MapDataset.concatenate([warmup, shuffled_mix(main, 0, seed).repeat(_MAIN_EPOCHS)])
    else:
        dataset = shuffled_mix(main, 0, seed).repeat()
    return (
        dataset.random_map(_BuildOrMark(builder, names), seed=seed)
        .to_iter_dataset()
        .filter(_Admit(shapes, bad_records, stats, max_bad_share, max_dropped_share))
        .batch(batch_size * micro_batches, drop_remainder=True, batch_fn=functools.partial(collate, shapes=shapes, micro_batches=micro_batches))
    )


def _source_name(source) -> str:
    short = reprlib.Repr()
    short.maxother = 300  # a source's own repr whole, a list of records cut to its first
    short.maxlist = 1
    return short.repr(source)


def require_fitting_records(source, builder, shapes: BatchShapes, probe: int = 16, bad_records: str = "skip") -> None:
    """Raises ValueError when none of ``source``'s first ``probe`` records fits ``shapes``, or none can be
    built: the stream skips such records, so with none usable it would wait forever instead of failing.
    Under ``bad_records="stop"`` a record among them that cannot be built raises at once, naming it."""
    rng = np.random.default_rng(0)
    examples, errors = [], []
    for index in range(min(probe, len(source))):
        try:
            examples.append(_built(builder, source[index], rng))
        except BAD_RECORD_ERRORS as error:
            if bad_records == "stop":
                raise _bad_record_error(_source_name(source), index, error) from error
            errors.append((index, error))
    if errors and not examples:
        index, error = errors[0]
        raise ValueError(
            f"none of the first {len(errors)} records of {_source_name(source)} can be built; "
            f"record {index}: {type(error).__name__}: {error}"
        ) from error
    if examples and not any(fits(e, shapes) for e in examples):
        e = examples[0]
        raise ValueError(
            f"none of the first {len(examples)} records of {_source_name(source)} fits the batch shapes {shapes}; the first has "
            f"{len(e['chunks'])} chunks of up to {max(map(len, e['chunks']))} tokens, {len(queries(e))} questions, "
            f"{len(e['tokens'])} student tokens, {e['label_end'] - e['label_start']} labels and "
            f"{len(e.get('teacher_tokens', ()))} teacher tokens"
        )


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def record_problem(record: Mapping[str, Any]) -> str | None:
    """What makes ``record`` unusable for training, or None: a field of RECORD_FIELDS (or of one of its
    ``extra_queries``, ``prompt`` and ``response``) that is missing, null, not a string, empty (or only
    whitespace) or not valid Unicode text (or the problem a ``RecordSource`` found, with the file and line,
    for the ``UNUSABLE`` marker it serves instead)."""
    if UNUSABLE in record:
        return record[UNUSABLE]
    problem = _fields_problem(record, RECORD_FIELDS)
    if problem:
        return problem
    extra = record.get(EXTRA_QUERIES, [])
    if not isinstance(extra, list):
        return f"field {EXTRA_QUERIES!r} must be a list, got {_JSON_TYPES.get(type(extra), type(extra).__name__)}"
    for i, query in enumerate(extra):
        problem = _fields_problem(query, QUERY_FIELDS) if isinstance(query, Mapping) else "not an object"
        if problem:
            return f"{EXTRA_QUERIES}[{i}]: {problem}"
    return None


def _fields_problem(record: Mapping[str, Any], fields: tuple[str, ...]) -> str | None:
    missing = [k for k in fields if record.get(k) is None]
    if missing:
        return f"the record lacks {missing}"
    for key in fields:
        value = record[key]
        if not isinstance(value, str):
            return f"field {key!r} must be a non-empty string, got {_JSON_TYPES.get(type(value), type(value).__name__)} {reprlib.repr(value)}"
        if not value.strip():
            return f"field {key!r} must be a non-empty string, got {value!r}"
        try:
            require_unicode_text(value, f"field {key!r}")
        except ValueError as e:
            return str(e)
    return None


def _json_lines(path: Path) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """(the records of a JSON Lines file, blank lines skipped; ``{index: "file, line N: problem"}`` of the
    records that ``record_problem`` rejects, which stand as ``{}``). Raises ValueError naming the file and
    the 1-based line for a line that is not UTF-8, not JSON or not a JSON object."""
    records, unusable = [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); JSON Lines hold one JSON object per line") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object (a record), got a JSON {_JSON_TYPES.get(type(record), type(record).__name__)}")
            problem = record_problem(record)
            if problem:
                unusable[len(records)] = f"{where}: {problem}"
                record = {}
            records.append(record)
    return records, unusable


class RecordSource:
    """Random access to ``{"context", "prompt", "response", ...}`` records from a JSON Lines (``.jsonl``, or
    ``.json``) or parquet (``.parquet``) file, read whole into memory (an Arrow table, via ``datasets``).

    Every record is validated when the file is read: ``context``, ``prompt`` and ``response`` must be
    non-empty strings of valid Unicode text; other fields pass through (a field must hold one type in
    every record). A record that fails is kept in its place as ``{UNUSABLE: "file, line N: problem"}``
    (``unusable`` maps its index to that text), so the training stream skips and counts it, or stops on it,
    as ``data.bad_records`` says. Raises ValueError naming the file and the 1-based line (JSON Lines) or the
    record number from 0 (parquet) for a line that is not JSON or not an object, a file where no record is
    usable, another suffix, and a file without records or that cannot be read; FileNotFoundError when
    there is no such file.
    """

    def __init__(self, path: str | Path):
        import datasets  # only record files need it, and it adds 0.6 s to importing d2l_jax

        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{self.path}: expected a .jsonl or .parquet file")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such record file")
        if self.path.suffix == ".parquet":
            self.records, self.unusable = self._read_parquet(datasets)
            count = len(self.records)
        else:
            records, self.unusable = _json_lines(self.path)
            count = len(records)
        if count == 0:
            raise ValueError(f"{self.path} has no records")
        if len(self.unusable) == count:
            raise ValueError(f"no record of {self.path} is usable; the first: {self.unusable[0]}")
        if self.path.suffix != ".parquet":
            self.records = self._table(datasets, records)

    def _read_parquet(self, datasets):
        # datasets converts the file to Arrow under cache_dir even when it keeps the result in memory:
        # a folder of our own, deleted at once, keeps the user's cache out of it and runs independent.
        with tempfile.TemporaryDirectory(prefix="d2l_records_") as cache:
            try:
                records = datasets.Dataset.from_parquet(str(self.path), cache_dir=cache, keep_in_memory=True)
            except Exception as e:  # an empty or foreign file fails inside datasets and pyarrow
                raise ValueError(f"{self.path} has no records or cannot be read as parquet: {type(e).__name__}: {e}") from e
        present = records.column_names
        columns = {k: records[k] if k in present else [None] * len(records) for k in RECORD_FIELDS}
        unusable = {}
        for number, values in enumerate(zip(*columns.values())):
            problem = record_problem(dict(zip(RECORD_FIELDS, values)))
            if problem:
                unusable[number] = f"{self.path}, record {number}: {problem}"
        return records, unusable

    def _table(self, datasets, records: list[dict[str, Any]]):
        # A field absent from some records is a column holding null there (absent again from their dicts).
        keys = list(dict.fromkeys(k for r in records for k in r))
        columns = {k: [r.get(k) for r in records] for k in keys}
        try:
            return datasets.Dataset.from_dict(columns)
        except Exception as e:  # pyarrow cannot type a column whose values mix types
            bad = next((k for k in keys if not _forms_a_column(datasets, columns[k])), None)
            raise ValueError(
                f"{self.path}: field {bad!r} holds values of different types in different records; a field must hold "
                f"one type in every record ({type(e).__name__}: {e})"
            ) from e

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index in self.unusable:
            return {UNUSABLE: self.unusable[index]}
        # Records share the file's columns; a field a record lacks (null there) stays absent from its dict.
        return {k: v for k, v in self.records[index].items() if v is not None}

    def __repr__(self) -> str:
        return f"RecordSource({str(self.path)!r})"


def _forms_a_column(datasets, values: list) -> bool:
    try:
        datasets.Dataset.from_dict({"column": values})
    except Exception:
        return False
    return True
