"""Question-answering sets as records: SQuAD v1.1, ROPES v1.0, DROP, LongBench and generic record files
read from local files (through ``datasets``, never a hub), their split into training and validation by
held-out groups, the reference's closed-QA prompt, and a training source over them.

Every format gives the same record, a dict::

    {"context": str,        # the passage the question is about
     "prompt": str,         # the raw question (QASource applies the prompt template)
     "response": str,       # the first gold answer
     "answers": list[str],  # every gold answer, deduplicated keeping order (response first)
     "id": str,             # the question's id in its file (its location there when it has none)
     "group": str}          # what the validation split holds out whole

Records come grouped by context (the reference's "compact" sets): contexts in the order they first appear
in the file, each followed by all of its questions in file order. A context that appears again later
joins its first appearance and takes its group, so no context belongs to two groups.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import reprlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2l_jax.data.chunking import require_unicode_text
from d2l_jax.data.niah import split_numbers

QA_FORMATS = ("squad", "ropes", "drop", "longbench", "records")
_NESTED_FORMATS = ("squad", "ropes")
# The columns that make a file of rows one format; detection tries them in this order.
_ROW_COLUMNS = {
    "drop": ("passage", "question", "answers_spans"),
    "longbench": ("context", "input", "answers"),
    "records": ("context", "prompt", "response"),
}
SPLITS = ("train", "validation", "all")
# The share of groups each format's validation split holds out by default. SQuAD's groups are whole
# articles of about 200 questions each, so a smaller share still holds out thousands of questions (25 of
# the shipped file's 442 articles, 4,376 questions; ROPES: 41 of 465 backgrounds).
VALIDATION_SHARES = {"squad": 0.06, "ropes": 0.1, "drop": 0.1, "longbench": 0.1, "records": 0.1}
CLOSED_QA_TEMPLATE = (
    "Answer the following question. Output only the answer and do not output any other words.\n\nQuestion: {question}"
)
PROMPT_TEMPLATES = ("closed_qa", "none")
# What a training record's context is: its whole passage, the passage's sentences that hold the answer, the
# passage with its answer swapped for another's, or the passage with keyed needles asked instead of its question.
CONTEXT_KINDS = ("passage", "answer_sentence", "answer_swapped", "keyed_needles")
KEYED_NEEDLE = "The code of the {key} is {number:04d}."
KEYED_QUESTION = "What is the code of the {key}?"
NEEDLE_KEYS = (
    "red door", "old bridge", "blue lantern", "silver key", "north tower", "green boat",
    "copper bell", "stone well", "white horse", "glass jar", "tall clock", "wooden chest",
)
NEEDLES_PER_CONTEXT = 3
# Numbers of keyed needles come from the NIAH splits' disjoint sets, so validation numbers are never trained on.
_NEEDLE_NUMBERS = {"train": "train", "validation": "val", "all": "train"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A nested (SQuAD-layout) file is one JSON object whose first key is one of these.
_NESTED_HEAD = re.compile(r'\{\s*"(?:data|version)"\s*:')
_GZIP_MAGIC = b"\x1f\x8b"
_LAYOUT_NAMES = {"nested": 'one JSON object {"data": ...}', "lines": "JSON Lines", "array": "a JSON array", "parquet": "parquet rows"}
_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class _Problem(ValueError):
    """What is wrong with one record; the reader adds the file and the record's place in it."""


def closed_qa_prompt(question: str) -> str:
    """The reference's evaluation prompt for SQuAD, DROP and ROPES (``CLOSED_QA_TEMPLATE``)."""
    return CLOSED_QA_TEMPLATE.format(question=question)


def load_qa(path: str | Path, format: str | None = None) -> list[dict[str, Any]]:
    """The records (see the module docstring) of a local QA file; ``read_qa`` without the format."""
    return read_qa(path, format)[1]


def read_qa(path: str | Path, format: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(format, records) of a local QA file, records grouped by context (see the module docstring).

    Layouts and formats (``format`` in ``QA_FORMATS``, or None to detect it):

    - nested JSON (``.json``, or gzip-compressed, e.g. ``.json.gz``): one object ``{"data": [articles]}``
      (or ``{"version", "data"}``), detected when the object's first key is ``"data"`` or ``"version"``.
      ``squad`` (SQuAD v1.1: paragraphs with ``context``; every answer of ``qas[k].answers`` kept; group =
      the article's title) or ``ropes`` (ROPES v1.0: paragraphs with ``background`` and ``situation``;
      context = background + "\\n" + situation; group = the first 12 hex digits of the background's SHA-1),
      told apart by the first paragraph's fields.
    - rows: JSON Lines, a JSON array of objects, or parquet (``.parquet``), whose columns name the format
      (tried in this order): ``drop`` (``passage``, ``question``, ``answers_spans`` = ``{"spans": [...]}``,
      the ``ucinlp/drop`` layout; optional ``query_id``, ``section_id``; group = ``section_id``, else the
      passage's hash), ``longbench`` (``context``, ``input`` = the question, ``answers`` list; optional
      ``_id``), ``records`` (``context``, ``prompt``, ``response``; optional ``answers`` list and ``id``;
      the response comes first among the answers). LongBench's and generic records' group is the
      context's hash.

    Files are read with ``datasets`` (into a temporary cache, never the user's). A file it cannot read (a
    column of mixed types, a byte-order mark, a bad record) is read again with ``json``, which names the bad
    record or gives the records.

    Raises FileNotFoundError naming a missing file; ValueError naming the file and the record (``data[3].
    paragraphs[2].qas[0]`` in a nested file, ``line N`` (from 1) in JSON Lines, ``record N`` (from 0) in
    an array or parquet) for a file that is not valid JSON or parquet, a file of another layout than
    ``format`` says, a file whose format cannot be told, and a record with a missing field, a context,
    question or answer that is not a non-empty string of valid Unicode text, or no answers; ValueError for
    an unknown ``format`` and a file without questions.
    """
    if format is not None and format not in QA_FORMATS:
        raise ValueError(f"unknown QA format {format!r}; known: {QA_FORMATS}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such QA file")
    layout = "parquet" if path.suffix == ".parquet" else _text_layout(path)
    if format is not None and (format in _NESTED_FORMATS) != (layout == "nested"):
        expected = 'one JSON object {"data": [articles]}' if format in _NESTED_FORMATS else "rows (JSON Lines, a JSON array or parquet)"
        raise ValueError(f"{path}: format {format!r} expects {expected}, but the file holds {_LAYOUT_NAMES[layout]}")
    if layout == "nested":
        articles = _read_articles(path, format)
        format = format or _nested_format(articles, path)
        records = _nested_records(articles, format, path)
    else:
        columns, rows = _read_rows(path, layout, format)
        format = format or _row_format(columns, path)
        records = _row_records(rows, format, path, layout)
    if not records:
        raise ValueError(f"{path} has no questions")
    return format, _compact(records)


def _open_text(path: Path):
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rt", encoding="utf-8-sig") if compressed else open(path, encoding="utf-8-sig")


def _text_layout(path: Path) -> str:
    """``"nested"``, ``"array"`` or ``"lines"``, from the start of a JSON file."""
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not UTF-8 JSON text, nor gzip-compressed JSON text ({type(e).__name__}: {e})") from e
    if _NESTED_HEAD.match(head):
        return "nested"
    return "array" if head.startswith("[") else "lines"


def _read_dataset(path: Path, **options):
    """The file as an in-memory ``datasets.Dataset``; the exceptions of ``datasets`` pass through."""
    import datasets  # only QA files need it, and it adds 0.6 s to importing d2l_jax

    # datasets converts the file to Arrow under cache_dir even when it keeps the result in memory: a
    # folder of our own, deleted at once, keeps the user's cache out of it.
    with tempfile.TemporaryDirectory(prefix="d2l_qa_") as cache:
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        return datasets.Dataset.from_json(str(path), cache_dir=cache, keep_in_memory=True, **options)


def _read_articles(path: Path, format: str | None) -> list:
    try:
        return _read_dataset(path, field="data").to_list()
    except Exception as error:  # datasets and pyarrow raise many kinds, none naming the record
        return _articles_by_json(path, format, error)


def _parsed_json(path: Path):
    """The JSON value of a whole file; ValueError names the file and where it stops being JSON."""
    try:
        with _open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from e
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not UTF-8 JSON text, nor gzip-compressed JSON text ({type(e).__name__}: {e})") from e


def _articles_by_json(path: Path, format: str | None, error: Exception) -> list:
    """The articles of a nested file that ``datasets`` could not read (``error``), read with ``json``:
    ValueError names the bad record, or the file is usable after all (mixed types, a byte-order mark)."""
    document = _parsed_json(path)
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise ValueError(f"{path}: expected a list of articles in 'data', got {_described(articles)}") from error
    _nested_records(articles, format or _nested_format(articles, path), path)
    return articles


def _read_rows(path: Path, layout: str, format: str | None) -> tuple[list[str], list]:
    try:
        table = _read_dataset(path)
    except Exception as error:  # datasets and pyarrow raise many kinds, none naming the record
        rows = _rows_by_json(path, layout, format, error)
        return list(dict.fromkeys(k for r in rows for k in r)), rows
    return table.column_names, table.to_list()


def _rows_by_json(path: Path, layout: str, format: str | None, error: Exception) -> list[dict]:
    """The rows of a file that ``datasets`` could not read (``error``), read with ``json``: ValueError
    names the bad record, or the file is usable after all (a column of mixed types)."""
    if layout == "parquet":
        raise ValueError(f"{path}: has no rows or cannot be read as parquet: {type(error).__name__}: {error}") from error
    if layout == "array":
        numbered = [(f"record {n}", row) for n, row in enumerate(_parsed_json(path))]
    else:
        numbered = list(_json_lines(path))
    if not numbered:
        raise ValueError(f"{path} has no records") from error
    for where, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, {where}: expected a JSON object (a record), got {_described(row)}") from error
    rows = [row for _, row in numbered]
    _row_records(rows, format or _row_format(list(dict.fromkeys(k for r in rows for k in r)), path), path, layout)
    return rows


def _json_lines(path: Path):
    """``("line N", value)`` for each non-blank line; ValueError names the first line that is not JSON."""
    number = 0
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield f"line {number}", json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from e
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path}, line {number + 1}: not UTF-8 text ({type(e).__name__}: {e})") from e


def _described(value) -> str:
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {reprlib.repr(value)}"


def _field(obj, key: str):
    if not isinstance(obj, dict):
        raise _Problem(f"expected an object, got {_described(obj)}")
    value = obj.get(key)
    if value is None:
        raise _Problem(f"no {key!r}")
    return value


def _checked_text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Problem(f"{name} must be a non-empty string, got {_described(value)}")
    try:
        require_unicode_text(value, name)
    except ValueError as e:
        raise _Problem(str(e)) from None
    return value


def _text(obj, key: str) -> str:
    return _checked_text(_field(obj, key), f"field {key!r}")


def _list(obj, key: str) -> list:
    value = _field(obj, key)
    if not isinstance(value, list):
        raise _Problem(f"field {key!r} must be a list, got {_described(value)}")
    return value


def _answer_texts(values: list, name: str) -> list[str]:
    if not values:
        raise _Problem(f"no answers ({name} is empty)")
    return [_checked_text(v, f"{name}[{n}]") for n, v in enumerate(values)]


def _identifier(obj: dict, key: str, fallback: str) -> str:
    value = obj.get(key)
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Problem(f"field {key!r} must be a string or an integer id, got {_described(value)}")
    return str(value)


def _digest(text: str) -> str:
    """A short stable name of a text: the first 12 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _record(context: str, question: str, answers: list[str], id: str, group: str) -> dict[str, Any]:
    answers = list(dict.fromkeys(answers))
    return {"context": context, "prompt": question, "response": answers[0], "answers": answers, "id": id, "group": group}


def _nested_format(articles: list, path: Path) -> str:
    first = next((p for a in articles if isinstance(a, dict) for p in a.get("paragraphs") or () if isinstance(p, dict)), None)
    if first is None:
        raise ValueError(f"{path}: cannot tell the format: no article has a paragraph")
    present = {k for k, v in first.items() if v is not None}
    if "context" in present:
        return "squad"
    if {"background", "situation"} <= present:
        return "ropes"
    raise ValueError(
        f"{path}: cannot tell the format: the first paragraph has fields {sorted(present)}, neither 'context' "
        "(squad) nor 'background' and 'situation' (ropes)"
    )


def _squad_answers(qa) -> list[str]:
    """The texts of a SQuAD-layout question's ``answers`` (``[{"text", ...}, ...]``)."""
    answers = _list(qa, "answers")
    if not answers:
        raise _Problem("no answers")
    texts = []
    for n, answer in enumerate(answers):
        try:
            texts.append(_text(answer, "text"))
        except _Problem as problem:
            raise _Problem(f"answers[{n}]: {problem}") from None
    return texts


def _nested_records(articles: list, format: str, path: Path) -> list[dict[str, Any]]:
    """The records of a SQuAD- or ROPES-layout ``data`` list; ValueError names the file and the record."""
    records, where = [], "data"
    try:
        for i, article in enumerate(articles):
            where = f"data[{i}]"
            title = _text(article, "title") if format == "squad" else None
            for j, paragraph in enumerate(_list(article, "paragraphs")):
                where = f"data[{i}].paragraphs[{j}]"
                if format == "squad":
                    context, group = _text(paragraph, "context"), title
                else:
                    background = _text(paragraph, "background")
                    context, group = background + "\n" + _text(paragraph, "situation"), _digest(background)
                for k, qa in enumerate(_list(paragraph, "qas")):
                    where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                    question, answers = _text(qa, "question"), _squad_answers(qa)
                    records.append(_record(context, question, answers, _identifier(qa, "id", where), group))
    except _Problem as problem:
        raise ValueError(f"{path}: {where}: {problem}") from None
    return records


def _row_format(columns: list[str], path: Path) -> str:
    for format, needed in _ROW_COLUMNS.items():
        if set(needed) <= set(columns):
            return format
    wanted = "; ".join(f"{f}: {', '.join(c)}" for f, c in _ROW_COLUMNS.items())
    raise ValueError(f"{path}: cannot tell the format from the columns {sorted(columns)}; the formats need ({wanted})")


def _drop_record(row: dict, fallback_id: str) -> dict[str, Any]:
    passage, question = _text(row, "passage"), _text(row, "question")
    spans = _field(row, "answers_spans")
    if not isinstance(spans, dict) or not isinstance(spans.get("spans"), list):
        raise _Problem(f"field 'answers_spans' must be an object with a 'spans' list, got {_described(spans)}")
    answers = _answer_texts(spans["spans"], "answers_spans.spans")
    section = row.get("section_id")
    group = section if isinstance(section, str) and section.strip() else _digest(passage)
    return _record(passage, question, answers, _identifier(row, "query_id", fallback_id), group)


def _longbench_record(row: dict, fallback_id: str) -> dict[str, Any]:
    context, question = _text(row, "context"), _text(row, "input")
    answers = _answer_texts(_list(row, "answers"), "answers")
    return _record(context, question, answers, _identifier(row, "_id", fallback_id), _digest(context))


def _generic_record(row: dict, fallback_id: str) -> dict[str, Any]:
    context, question, response = _text(row, "context"), _text(row, "prompt"), _text(row, "response")
    answers = [response]
    if row.get("answers") is not None:
        answers += _answer_texts(_list(row, "answers"), "answers")
    return _record(context, question, answers, _identifier(row, "id", fallback_id), _digest(context))


_ROW_BUILDERS: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "drop": _drop_record,
    "longbench": _longbench_record,
    "records": _generic_record,
}


def _row_records(rows: list, format: str, path: Path, layout: str) -> list[dict[str, Any]]:
    """The records of a file's rows; ValueError names the file and the row."""
    build, records = _ROW_BUILDERS[format], []
    for index, row in enumerate(rows):
        try:
            records.append(build(row, f"record {index}"))
        except _Problem as problem:
            raise ValueError(f"{path}, {_row_place(path, layout, index)}: {problem}") from None
    return records


def _row_place(path: Path, layout: str, index: int) -> str:
    """``line N`` of a JSON Lines file (its ``index``-th non-blank line, from 1), else ``record N``."""
    if layout != "lines":
        return f"record {index}"
    seen = -1
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            seen += bool(line.strip())
            if seen == index:
                return f"line {number}"
    return f"record {index}"


def _by_context(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record["context"], []).append(record)
    return grouped


def _compact(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records reordered by context (first appearance), each context's records sharing one context
    string and the group of its first record."""
    compact = []
    for context, same in _by_context(records).items():
        group = same[0]["group"]
        compact += [dict(r, context=context, group=group) for r in same]
    return compact


def answer_sentence(context: str, answer: str) -> str:
    """The sentences of ``context`` that the first occurrence of ``answer`` overlaps (sentences end at
    ".", "!" or "?" before white space), or the whole ``context`` when ``answer`` is not a span of it."""
    start = context.find(answer)
    if start < 0 or not answer:
        return context
    end = start + len(answer)
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(context)] + [len(context)]
    first = max(b for b in bounds if b <= start)
    last = min(b for b in bounds if b >= end)
    return context[first:last].strip()


def answer_kind(answer: str) -> str:
    """``"number"`` (holds a digit), ``"name"`` (starts with a capital) or ``"other"``: what an answer may
    be swapped with."""
    if any(c.isdigit() for c in answer):
        return "number"
    return "name" if answer[:1].isupper() else "other"


def swap_answers(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Counterfactual records: each record whose passage holds its answer verbatim, with every occurrence
    of the answer in the passage replaced by another record's answer of the same ``answer_kind``, and that
    answer as the response (the only gold answer). Mixed with the original passages, the same question then
    has different answers in different documents, so the answer cannot be learned from the question alone.
    Records whose answer is not in their passage are left out; the donors are drawn with ``seed``."""
    usable = [r for r in records if r["response"].strip() and r["response"] in r["context"]]
    by_kind: dict[str, list[str]] = {}
    for r in usable:
        by_kind.setdefault(answer_kind(r["response"]), []).append(r["response"])
    rng = random.Random(seed)
    donors = {kind: rng.sample(answers, len(answers)) for kind, answers in by_kind.items()}
    swapped, taken = [], dict.fromkeys(by_kind, 0)
    for r in usable:
        kind = answer_kind(r["response"])
        pool = donors[kind]
        for _ in range(len(pool)):
            donor = pool[taken[kind] % len(pool)]
            taken[kind] += 1
            if donor != r["response"] and donor not in r["context"]:
                swapped.append(dict(r, context=r["context"].replace(r["response"], donor), response=donor, answers=[donor]))
                break
    return swapped


def keyed_needles(records: list[dict[str, Any]], split: str, seed: int = 0, needles: int = NEEDLES_PER_CONTEXT) -> list[dict[str, Any]]:
    """Records whose document is the passage with ``needles`` keyed needles (``KEYED_NEEDLE``: distinct keys
    of ``NEEDLE_KEYS``, distinct 4-digit numbers of ``split``'s NIAH set) at sentence boundaries, and whose
    question asks for one of them (``KEYED_QUESTION``; the number is the response and only gold answer).
    Unlike the NIAH needle, the question names which of the passage's needles it wants, so an adapter must
    keep each number with its key. Record ``i`` depends only on ``(seed, i)``; ``group`` is kept."""
    if not 1 <= needles <= len(NEEDLE_KEYS):
        raise ValueError(f"needles={needles} must be in [1, {len(NEEDLE_KEYS)}]")
    numbers = split_numbers(_NEEDLE_NUMBERS[split])
    keyed = []
    for i, record in enumerate(records):
        rng = np.random.default_rng([seed, i])
        keys = [NEEDLE_KEYS[k] for k in rng.choice(len(NEEDLE_KEYS), needles, replace=False)]
        values = [int(v) for v in rng.choice(numbers, needles, replace=False)]
        sentences = _SENTENCE_END.split(record["context"].strip())
        for key, value in zip(keys, values):
            sentences.insert(int(rng.integers(len(sentences) + 1)), KEYED_NEEDLE.format(key=key, number=value))
        asked = int(rng.integers(needles))
        answer = f"{values[asked]:04d}"
        keyed.append(dict(record, context=" ".join(sentences), prompt=KEYED_QUESTION.format(key=keys[asked]), response=answer, answers=[answer]))
    return keyed


def group_queries(records: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """One record per ``size`` questions of a context (fewer for a context's last ones): the first
    question's record with ``extra_queries``, the others' ``{"prompt", "response"}`` in order."""
    grouped = []
    for same in _by_context(records).values():
        for i in range(0, len(same), size):
            first, *rest = same[i : i + size]
            grouped.append(dict(first, extra_queries=[{"prompt": r["prompt"], "response": r["response"]} for r in rest]))
    return grouped


def contexts(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(context, [its records]), ...]`` in the order the contexts first appear (the compact grouping)."""
    return list(_by_context(records).items())


def is_held_out(group: str, validation_share: float) -> bool:
    """Whether the validation split holds out ``group``: the first 8 hex digits of the SHA-1 of its UTF-8
    bytes, read as a number in [0, 2**32), fall below ``validation_share * 2**32`` (the same on every
    machine and Python version)."""
    return int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:8], 16) < validation_share * 2**32


def split_records(records: list[dict[str, Any]], split: str, validation_share: float) -> list[dict[str, Any]]:
    """The records of ``split`` (``"train"``, ``"validation"`` or ``"all"``), in their order.

    Validation holds out whole groups (``is_held_out(record["group"], validation_share)``), never single
    questions; train is the rest, so the two cover every record exactly once. ``VALIDATION_SHARES``
    holds each format's default share. Raises ValueError for another split or a share outside [0, 1].
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if not 0 <= validation_share <= 1:
        raise ValueError(f"validation_share={validation_share!r} must be a share in [0, 1]")
    if split == "all":
        return list(records)
    held = {group: is_held_out(group, validation_share) for group in dict.fromkeys(r["group"] for r in records)}
    wanted = split == "validation"
    return [r for r in records if held[r["group"]] == wanted]


def paired_questions(
    path: str | Path,
    contexts: Sequence[str] = ("passage",),
    split: str = "train",
    max_questions: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``{"context", "prompt", "response", "id"}`` records of questions drawn at random (``seed``) from the
    ``split`` of a QA file, one record per context kind in ``contexts`` (``QASource``'s kinds, closed-QA
    prompts) for each question, consecutive: with ``("passage", "answer_swapped")`` every question comes
    with its passage and its answer-swapped twin. Only questions that every kind serves are drawn; at most
    ``max_questions`` of them (None = all).

    Raises what ``QASource`` raises, and ValueError for no ``contexts``, a repeated kind or
    ``max_questions < 1``."""
    if not contexts or len(set(contexts)) != len(contexts):
        raise ValueError(f"contexts={tuple(contexts)!r}: give one or more distinct kinds of {CONTEXT_KINDS}")
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions={max_questions} must be >= 1")
    by_kind = [{r["id"]: r for r in QASource(path, split=split, context=kind).records} for kind in contexts]
    ids = [i for i in by_kind[0] if all(i in served for served in by_kind[1:])]
    random.Random(seed).shuffle(ids)
    keys = ("context", "prompt", "response", "id")
    return [{k: served[i][k] for k in keys} for i in ids[:max_questions] for served in by_kind]


class QASource:
    """Random access to the training records of a QA file's split, with the prompt template applied.

    Records are those of ``read_qa(path, format)`` (``context``, ``prompt``, ``response``, ``answers``,
    ``id``, ``group``) in ``split`` (``split_records``; ``validation_share`` None = the format's share in
    ``VALIDATION_SHARES``), with ``prompt`` = ``closed_qa_prompt(question)`` under ``template="closed_qa"``
    or the raw question under ``"none"``. Usable wherever ``RecordSource`` is (``training_batches``).
    ``context="answer_sentence"`` replaces each record's context by ``answer_sentence(context, response)``
    (a short document that still holds the answer: an easier first lesson in reading than the passage);
    ``context="answer_swapped"`` serves ``swap_answers(records)`` (the passage with its answer replaced by
    another question's: mixed with ``"passage"``, the answer depends on the document, not the question);
    ``context="keyed_needles"`` serves ``keyed_needles(records, split)`` (keyed numbers hidden in the passage,
    one of them asked for: a reading task between the NIAH needle and the passage's own questions).
    ``queries_per_context=Q`` serves a context's questions Q at a time (``group_queries``): the first as
    the record's ``prompt`` / ``response``, the others in its ``extra_queries``.

    Raises what ``read_qa`` raises, and ValueError for an unknown template, context kind or split, a share
    outside [0, 1], ``queries_per_context < 1`` and a split without records.
    """

    def __init__(
        self,
        path: str | Path,
        format: str | None = None,
        split: str = "train",
        template: str = "closed_qa",
        validation_share: float | None = None,
        context: str = "passage",
        queries_per_context: int = 1,
    ):
        if queries_per_context < 1:
            raise ValueError(f"queries_per_context={queries_per_context} must be >= 1")
        if template not in PROMPT_TEMPLATES:
            raise ValueError(f"template={template!r}; expected one of {PROMPT_TEMPLATES}")
        if context not in CONTEXT_KINDS:
            raise ValueError(f"context={context!r}; expected one of {CONTEXT_KINDS}")
        self.path = Path(path)
        self.format, records = read_qa(self.path, format)
        self.split, self.template, self.context, self.queries_per_context = split, template, context, queries_per_context
        self.validation_share = VALIDATION_SHARES[self.format] if validation_share is None else validation_share
        records = split_records(records, split, self.validation_share)
        if not records:
            raise ValueError(f"{self.path}: the {split!r} split (validation_share={self.validation_share}) has no records")
        if context == "answer_sentence":
            records = [dict(r, context=answer_sentence(r["context"], r["response"])) for r in records]
        if context == "answer_swapped":
            records = swap_answers(records)
        if context == "keyed_needles":
            records = keyed_needles(records, split)
        if template == "closed_qa":
            records = [dict(r, prompt=closed_qa_prompt(r["prompt"])) for r in records]
        self.records = group_queries(records, queries_per_context) if queries_per_context > 1 else records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.records[int(index)])

    def __repr__(self) -> str:
        return (
            f"QASource({str(self.path)!r}, format={self.format!r}, split={self.split!r}, context={self.context!r}, "
            f"queries_per_context={self.queries_per_context})"
        )
