"""Named sources of ``{"context", "prompt", "response"}`` training records, chosen by a run's config.

A source is a name in :data:`SOURCES` and its options:

  niah     generated needle-in-a-haystack contexts, mixed equally from token-length bins.
           Options: ``bins`` (``((lo, hi), ...)``, required), ``records`` (per bin, default 1,000,000),
           ``split`` (``"train"``).
  records  a JSON Lines (``.jsonl``) or parquet (``.parquet``) file of records. Options: ``path`` (required).
  qa       a question-answering file (SQuAD, ROPES, DROP, LongBench or generic records; ``data.qa_sets``):
           one split of its questions, prompts in the closed-QA template. Options: ``path`` (required),
           ``format`` (None = detect), ``split`` (``"train"``; also ``"validation"``, ``"all"``),
           ``template`` (``"closed_qa"`` or ``"none"``), ``validation_share`` (None = the format's default),
           ``context`` (``"passage"``; ``"answer_sentence"``: the passage's sentences holding the answer;
           ``"answer_swapped"``: the passage with its answer replaced by another question's of the same kind;
           several kinds give one source each, mixed equally).

``make_sources(..., queries_per_context=Q)`` (``data.queries_per_context``) serves each context with up to
Q of its questions in one record (``qa`` only, :data:`GROUPING_SOURCES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from d2l_jax.data.niah import NIAHSource
from d2l_jax.data.pipeline import RecordSource
from d2l_jax.data.qa_sets import QASource


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """A record source: ``name`` (a key of :data:`SOURCES`) and that source's ``options``."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in SOURCES:
            raise ValueError(f"unknown data source {self.name!r}; known: {sorted(SOURCES)}")
        options = {k: _tuples(v) for k, v in self.options.items()}
        required, optional = _OPTIONS[self.name]
        missing, unknown = set(required) - set(options), set(options) - set(required) - set(optional)
        if missing or unknown:
            raise ValueError(
                f"data source {self.name!r}: missing options {sorted(missing)}, unknown options {sorted(unknown)}; "
                f"it takes {sorted(required)} and optionally {sorted(optional)}"
            )
        object.__setattr__(self, "options", options)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _niah(tokenizer, seed: int, bins, records: int = 1_000_000, split: str = "train") -> list[NIAHSource]:
    return [NIAHSource(tokenizer, split, int(lo), int(hi), records, seed=seed) for lo, hi in bins]


def _records(tokenizer, seed: int, path: str) -> list[RecordSource]:
    del tokenizer, seed  # the file holds finished records
    return [RecordSource(path)]


def _qa(
    tokenizer, seed: int, path: str, format: str | None = None, split: str = "train", template: str = "closed_qa",
    validation_share: float | None = None, context: str | tuple[str, ...] = "passage", queries_per_context: int = 1,
) -> list[QASource]:
    del tokenizer, seed  # the file holds finished questions; the split is fixed by the groups' hashes
    kinds = (context,) if isinstance(context, str) else tuple(context)
    return [QASource(path, format, split, template, validation_share, kind, queries_per_context) for kind in kinds]


SOURCES: dict[str, Callable[..., list]] = {"niah": _niah, "records": _records, "qa": _qa}
# The sources that can serve several questions of a context in one record.
GROUPING_SOURCES = ("qa",)
_OPTIONS = {
    "niah": (("bins",), ("records", "split")),
    "records": (("path",), ()),
    "qa": (("path",), ("format", "split", "template", "validation_share", "context")),
}


def make_sources(source: SourceConfig, tokenizer, seed: int, queries_per_context: int = 1) -> list:
    """The random-access record sources ``source`` names (mixed in equal proportions by the pipeline), each
    record with up to ``queries_per_context`` questions of its context (see ``QASource``)."""
    if queries_per_context == 1:
        return SOURCES[source.name](tokenizer, seed, **source.options)
    if source.name not in GROUPING_SOURCES:
        raise ValueError(f"queries_per_context={queries_per_context}: the {source.name!r} source serves one question per context")
    return SOURCES[source.name](tokenizer, seed, **source.options, queries_per_context=queries_per_context)
