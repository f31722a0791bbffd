"""Resumable needle-in-a-haystack sweep: accuracy over context lengths x needle depths, per method.

Methods (:data:`METHODS`):

* ``d2l``: the student: the document internalized into an adapter (chunked, any length; see
  ``D2L.adapters``), the question alone in the prompt;
* ``icl``: the base model with the document in its prompt, only where prompt plus reply fit the base
  model's window; other cells are recorded as ``"not run: exceeds window N ..."``;
* ``truncated_icl``: the same prompt cut to the window the reference's way (first and last
  ``(window - max_new_tokens) // 2`` tokens kept, see ``in_context.truncate_middle``);
* ``base``: the base model with neither document nor adapter.

A cell is (method, length bin ``[lo, hi)``, depth bin, seed, samples, split, max_new_tokens). Every finished
cell becomes one record in ``WORKDIR/results.json``, rewritten atomically (temporary file + ``os.replace``)
after each cell, so an interrupted sweep resumes where it stopped and a finished one does no work.
Replies are scored as ``eval.niah.exact_match`` does: the first 4-digit number must be the needle's.

Latencies in the records are wall-clock seconds per document (``internalize_s``) and per question
(``answer_s``, batched); they include compilation the first time a shape is met. The efficiency records
(``kind == "efficiency"``, see ``eval.efficiency``: D2L, context distillation and in-context learning on
one document per length) are measured after a warm-up and exclude it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from d2l_jax.api import D2L, stack_adapters
from d2l_jax.baselines.context_distillation import REFERENCE_EPOCHS
from d2l_jax.data.examples import student_messages
from d2l_jax.data.niah import (
    NIAH_PROMPT,
    NUM_DEPTH_BINS,
    SPLITS,
    blocks_for_tokens,
    first_number,
    needle_index_range,
    niah_context,
    split_numbers,
)
from d2l_jax.eval.efficiency import EFFICIENCY_METHODS
from d2l_jax.eval.in_context import truncate_middle
from d2l_jax.eval.niah import MAX_NEW_TOKENS
from d2l_jax.models.generate import bucket_length

METHODS = ("d2l", "icl", "truncated_icl", "base")
RESULTS_FILE = "results.json"

# A method answers one cell: records (context, prompt, response, ...) -> {"replies": [...], timings...}, or
# {"status": "not run: ..."} when it cannot run on them.
MethodFn = Callable[[list[dict]], dict]


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What the sweep evaluates.

    Attributes:
      bins: token-length bins ``(lo, hi)``: a cell's contexts have ``lo <= tokens < hi`` (the document
        alone, without chat tokens), spread evenly over the bin; records and plots call ``hi`` its length.
      depths: needle depth bins, each in ``0 .. 9`` (bin b = the b-th tenth of the document).
      methods: a subset of :data:`METHODS`.
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


def cell_records(tokenizer, lo: int, hi: int, depth: int, n: int, seed: int, split: str = "test") -> list[dict]:
    """``n`` NIAH records with ``lo <= context tokens < hi`` and the needle in depth bin ``depth``.

    Block counts are spread evenly over the bin's range (``data.niah.blocks_for_tokens``); the needle
    index (uniform within the depth bin) and the number (uniform over ``split``'s numbers) are drawn from
    ``np.random.default_rng([seed, lo, hi, depth, j])`` for sample j, so a cell's records never change.
    Each record also carries ``context_tokens``.
    """
    k_min, k_max = blocks_for_tokens(tokenizer, lo, hi)
    numbers = split_numbers(split)
    records = []
    for j in range(n):
        num_blocks = k_min + (2 * j + 1) * (k_max - k_min) // (2 * n)
        start, end = needle_index_range(num_blocks, depth)
        rng = np.random.default_rng([seed, lo, hi, depth, j])
        needle_index = int(rng.integers(start, end + 1))
        number = int(numbers[rng.integers(len(numbers))])
        context = niah_context(num_blocks, needle_index, number)
        records.append(
            {
                "context": context,
                "prompt": NIAH_PROMPT,
                "response": f"{number:04d}",
                "num_blocks": num_blocks,
                "depth_bin": depth,
                "needle_index": needle_index,
                "number": number,
                "context_tokens": len(tokenizer(context, add_special_tokens=False)["input_ids"]),
            }
        )
    return records


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


def niah_methods(d2l: D2L, settings: SweepSettings, progress: bool = True) -> dict[str, MethodFn]:
    """The four method functions over one D2L (its base model serves the baselines)."""
    base = d2l.base
    window = base.config.max_position_embeddings
    m = settings.max_new_tokens
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
        return max(1, min(settings.batch_size, settings.icl_batch_tokens // bucket_length(max(map(len, prompts)))))

    def student(records):
        prompts = [base.chat_ids(student_messages(r["prompt"])) for r in records]
        replies, internalize_s, answer_s, chunks, ranks = [], 0.0, 0.0, [], []
        step = settings.batch_size
        for i in tqdm(range(0, len(records), step), desc="d2l", leave=False, disable=not progress):
            batch = records[i : i + step]
            start = time.perf_counter()
            adapters = d2l.adapters([r["context"] for r in batch])
            jax.block_until_ready([a.lora for a in adapters])
            middle = time.perf_counter()
            replies += base.generate_ids(prompts[i : i + step], m, lora=stack_adapters(adapters))
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
        return {**answer(prompts, settings.batch_size, "base"), "prompt_tokens": float(np.mean([len(p) for p in prompts]))}

    all_methods = {"d2l": student, "icl": in_context, "truncated_icl": truncated, "base": no_document}
    return {name: all_methods[name] for name in settings.methods}


def cell_key(record: Mapping[str, Any]) -> tuple:
    """What identifies a finished cell in ``results.json``."""
    return (
        record["kind"],
        record["method"],
        record["lo"],
        record["hi"],
        record.get("depth"),
        record["seed"],
        record.get("n"),
        record["split"],
        record["max_new_tokens"],
        record.get("cd_steps"),
    )


def read_results(path: str | os.PathLike) -> dict:
    """``{"identity": ..., "settings": ..., "records": [...]}`` from a results file (empty if absent).

    Raises ValueError when the file exists but is not a results file.
    """
    path = Path(path)
    if not path.exists():
        return {"identity": {}, "settings": {}, "records": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); move it away to start a new sweep") from error
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{path} has no 'records' list; it is not a sweep results file")
    return data


def write_results(path: str | os.PathLike, data: dict) -> None:
    """Writes ``data`` as JSON atomically: a temporary file in the same folder, flushed, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _check_identity(path: Path, stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    differing = {k: (stored[k], current[k]) for k in set(stored) & set(current) if stored[k] != current[k]}
    if differing:
        details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(differing.items()))
        raise ValueError(f"{path} holds results of another run ({details}); use another workdir")


class _Results:
    """The results file of one workdir, loaded once and rewritten after every new record."""

    def __init__(self, workdir, settings: SweepSettings, identity: Mapping[str, Any] | None):
        self.path = Path(workdir) / RESULTS_FILE
        self.data = read_results(self.path)
        identity = dict(identity or {})
        _check_identity(self.path, self.data.get("identity", {}), identity)
        self.data["identity"] = {**self.data.get("identity", {}), **identity}
        self.data["settings"] = dataclasses.asdict(settings)
        self.done = {cell_key(r) for r in self.data["records"]}

    def add(self, record: dict) -> None:
        self.data["records"].append(record)
        self.done.add(cell_key(record))
        write_results(self.path, self.data)


def _cell(settings: SweepSettings, kind: str, method: str, lo: int, hi: int, depth: int | None, n: int | None) -> dict:
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
    """``correct`` (replies whose first 4-digit number is the record's) and ``accuracy``; None without replies."""
    if replies is None:
        return {"correct": None, "accuracy": None}
    correct = sum(first_number(reply) == r["response"] for reply, r in zip(replies, records, strict=True))
    return {"correct": correct, "accuracy": correct / len(records)}


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
    results = _Results(workdir, settings, identity)
    methods = dict(methods) if methods is not None else niah_methods(d2l, settings, progress)
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
    results = _Results(workdir, settings, identity)

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


def write_plots(records: Sequence[dict], workdir: str | os.PathLike, window: int | None = None, title: str = "") -> list[Path]:
    """The sweep's figures in ``workdir``: ``niah_heatmap_<method>.png`` per method,
    ``niah_accuracy_by_length.png`` and, with efficiency records, ``efficiency_by_length.png``.
    Returns their paths."""
    from d2l_jax.eval import plots

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    niah = [r for r in records if r["kind"] == "niah"]
    paths = []
    for method in dict.fromkeys(r["method"] for r in niah):
        path = workdir / f"niah_heatmap_{method}.png"
        plots.niah_heatmap(niah, method, path, title=f"{title} {method}".strip())
        paths.append(path)
    if niah:
        path = workdir / "niah_accuracy_by_length.png"
        plots.niah_accuracy_by_length(niah, path, window=window, title=title)
        paths.append(path)
    efficiency = [r for r in records if r["kind"] == "efficiency"]
    if efficiency:
        path = workdir / "efficiency_by_length.png"
        plots.efficiency_by_length(efficiency, path, window=window, title=title)
        paths.append(path)
    return paths
