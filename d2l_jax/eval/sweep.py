"""Resumable needle-in-a-haystack sweep: accuracy over context lengths x needle depths, per method
(``eval.niah_methods``), and the efficiency report (``eval.efficiency``), both into ``WORKDIR/results.json``
(``eval.results_store``).

A NIAH cell is (method, length bin ``[lo, hi)``, depth bin, seed, samples, split, max_new_tokens); its
records come from ``data.niah.cell_records`` and its replies are scored by ``eval.niah.is_correct`` (the
first 4-digit number must be the needle's). Every finished cell becomes one record of the results file,
rewritten atomically after each cell, so an interrupted sweep resumes where it stopped and a finished one
does no work.

Latencies in the NIAH records include compilation the first time a shape is met. The efficiency records
(``kind == "efficiency"``: D2L, context distillation and in-context learning on one document per length)
are measured after a warm-up and exclude it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from d2l_jax.api import D2L
from d2l_jax.baselines.context_distillation import REFERENCE_EPOCHS
from d2l_jax.data.niah import NUM_DEPTH_BINS, SPLITS, cell_records
from d2l_jax.eval.efficiency import EFFICIENCY_METHODS
from d2l_jax.eval.niah import MAX_NEW_TOKENS, correct
from d2l_jax.eval.niah_methods import METHODS, MethodFn, niah_methods
from d2l_jax.eval.results_store import ResultsFile, cell_key


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What the sweep evaluates.

    Attributes:
      bins: token-length bins ``(lo, hi)``: a cell's contexts have ``lo <= tokens < hi`` (the document
        alone, without chat tokens), spread evenly over the bin; records and plots call ``hi`` its length.
      depths: needle depth bins, each in ``0 .. 9`` (bin b = the b-th tenth of the document).
      methods: a subset of ``eval.niah_methods.METHODS``.
      samples_per_cell: documents per (length, depth) cell.
      seed: draws the needle positions and numbers.
      split: the NIAH split the magic numbers come from.
      max_new_tokens: greedy reply length.
      batch_size: documents internalized / questions answered per call.
      icl_batch_tokens: at most this many (bucketed) prompt tokens per in-context call; long prompts go
        one at a time.
      efficiency_bins: bins of the efficiency report (one document each, depth bin 5); empty = none.
      efficiency_methods: a subset of ``("d2l", "cd", "icl")``.
      cd_steps: the step budget of context distillation in the efficiency report (300: the reference's).
    """

    bins: tuple[tuple[int, int], ...]
    depths: tuple[int, ...] = tuple(range(NUM_DEPTH_BINS))
    methods: tuple[str, ...] = METHODS
    samples_per_cell: int = 2
    seed: int = 0
    split: str = "test"
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 8
    icl_batch_tokens: int = 8192
    efficiency_bins: tuple[tuple[int, int], ...] = ()
    efficiency_methods: tuple[str, ...] = tuple(EFFICIENCY_METHODS)
    cd_steps: int = REFERENCE_EPOCHS

    def __post_init__(self):
        for name in ("bins", "efficiency_bins"):
            bins = tuple((int(lo), int(hi)) for lo, hi in getattr(self, name))
            for lo, hi in bins:
                if not 1 <= lo < hi:
                    raise ValueError(f"{name}: need 1 <= lo < hi, got ({lo}, {hi})")
            object.__setattr__(self, name, bins)
        if not self.bins:
            raise ValueError("bins is empty")
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "efficiency_methods", tuple(self.efficiency_methods))
        if not self.depths or any(not 0 <= d < NUM_DEPTH_BINS for d in self.depths):
            raise ValueError(f"depths must be a non-empty subset of 0..{NUM_DEPTH_BINS - 1}, got {self.depths}")
        unknown = set(self.methods) - set(METHODS)
        if not self.methods or unknown:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        unknown = set(self.efficiency_methods) - set(EFFICIENCY_METHODS)
        if unknown:
            raise ValueError(f"efficiency_methods must be a subset of {tuple(EFFICIENCY_METHODS)}, got {self.efficiency_methods}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for name in ("samples_per_cell", "max_new_tokens", "batch_size", "icl_batch_tokens", "cd_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SweepSettings":
        """From a mapping (e.g. an ``ml_collections`` config's ``sweep`` entry); unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown sweep settings {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**dict(values))


def _cell(settings: SweepSettings, kind: str, method: str, lo: int, hi: int, depth: int | None, n: int | None) -> dict:
    """The fields that name a cell (what ``results_store.cell_key`` reads, and ``length``)."""
    return {
        "kind": kind,
        "method": method,
        "length": hi,
        "lo": lo,
        "hi": hi,
        "depth": depth,
        "seed": settings.seed,
        "n": n,
        "split": settings.split,
        "max_new_tokens": settings.max_new_tokens,
    }


def _score(replies: Sequence[str] | None, records: Sequence[dict]) -> dict:
    """``correct`` (see ``eval.niah.is_correct``) and ``accuracy`` of a cell; both None without replies."""
    if replies is None:
        return {"correct": None, "accuracy": None}
    hits = correct(replies, records)
    return {"correct": hits, "accuracy": hits / len(records)}


def run_sweep(
    d2l: D2L,
    settings: SweepSettings,
    workdir: str | os.PathLike,
    *,
    identity: Mapping[str, Any] | None = None,
    methods: Mapping[str, MethodFn] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Runs every unfinished NIAH cell and returns all records of ``WORKDIR/results.json``.

    Cells are visited length by length, then depth, then method; each finished cell is appended as

        {"kind": "niah", "method", "length" (= hi), "lo", "hi", "depth", "seed", "n", "split",
         "max_new_tokens", "status": "ok" | "not run: ...", "accuracy" (None when not run), "correct",
         "context_tokens" (mean), "wall_s", "internalize_s", "answer_s", "prompt_tokens", ... ,
         "replies", "responses"}

    (``reused_replies: True`` marks a baseline whose prompts were exactly those another method had just
    answered, e.g. ``truncated_icl`` where nothing needed truncating: its replies and ``answer_s`` are
    that method's.)

    and the file is rewritten atomically. ``identity`` (e.g. the checkpoint and step) is stored in the
    file; resuming with a different value for one of its keys raises ValueError rather than mixing runs.
    ``methods`` replaces the method functions (default :func:`niah_methods`).
    """
    results = ResultsFile(workdir, dataclasses.asdict(settings), identity)
    if methods is None:
        methods = niah_methods(
            d2l, settings.methods, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
            icl_batch_tokens=settings.icl_batch_tokens, progress=progress,
        )
    missing = set(settings.methods) - set(methods)
    if missing:
        raise ValueError(f"no method function for {sorted(missing)}")
    tokenizer = d2l.base.tokenizer
    n = settings.samples_per_cell
    cells = [(lo, hi, depth, method) for lo, hi in settings.bins for depth in settings.depths for method in settings.methods]
    todo = [c for c in cells if cell_key(_cell(settings, "niah", c[3], c[0], c[1], c[2], n)) not in results.done]
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="NIAH sweep", disable=not progress) as bar:
        for lo, hi, depth in dict.fromkeys((lo, hi, depth) for lo, hi, depth, _ in todo):
            records = cell_records(tokenizer, lo, hi, depth, n, settings.seed, settings.split)
            for _, _, _, method in [c for c in todo if c[:3] == (lo, hi, depth)]:
                bar.set_postfix_str(f"{method} len<{hi} depth {depth}")
                start = time.perf_counter()
                outcome = dict(methods[method](records))
                wall_s = time.perf_counter() - start
                record = _cell(settings, "niah", method, lo, hi, depth, n)
                record["context_tokens"] = float(np.mean([r["context_tokens"] for r in records]))
                replies = outcome.pop("replies", None)
                record["status"] = outcome.pop("status", "ok")
                if replies is None and record["status"] == "ok":
                    raise ValueError(f"method {method!r} returned neither replies nor a status")
                record.update(_score(replies, records))
                record["wall_s"] = wall_s
                record.update(outcome)
                record["replies"] = replies
                record["responses"] = [r["response"] for r in records]
                results.add(record)
                bar.update(1)
    return results.data["records"]


def run_efficiency(
    d2l: D2L,
    settings: SweepSettings,
    workdir: str | os.PathLike,
    *,
    identity: Mapping[str, Any] | None = None,
    repeats: int = 1,
    program_memory: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Measures the unfinished (method, efficiency bin) cells (see ``eval.efficiency``) on one document
    per bin (the first sample of depth bin 5) and appends them to ``results.json`` as
    ``{"kind": "efficiency", "method", "length", "lo", "hi", "context_tokens", "status", "internalize_s"
    (D2L), "update_s" (CD, with "cd_steps"), "answer_s", "kv_cache_bytes", "adapter_bytes",
    "answer_state_bytes", "answer_program_bytes", ...}``. Returns all records of the file."""
    results = ResultsFile(workdir, dataclasses.asdict(settings), identity)

    def cell(lo, hi, method):
        row = _cell(settings, "efficiency", method, lo, hi, 5, 1)
        return row | {"cd_steps": settings.cd_steps} if method == "cd" else row

    cells = [cell(lo, hi, method) for lo, hi in settings.efficiency_bins for method in settings.efficiency_methods]
    todo = [row for row in cells if cell_key(row) not in results.done]
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="efficiency", disable=not progress) as bar:
        for row in todo:
            method = row["method"]
            bar.set_postfix_str(f"{method} len<{row['hi']}")
            [record] = cell_records(d2l.base.tokenizer, row["lo"], row["hi"], 5, 1, settings.seed, settings.split)
            options = {"steps": settings.cd_steps} if method == "cd" else {}
            measure = EFFICIENCY_METHODS[method]
            costs = measure(d2l, record, settings.max_new_tokens, repeats=repeats, program_memory=program_memory, **options)
            row["context_tokens"] = record["context_tokens"]
            row["response"] = record["response"]
            row.update(costs)
            results.add(row)
            bar.update(1)
    return results.data["records"]
