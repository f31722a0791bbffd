"""The results file of a resumable evaluation: ``WORKDIR/results.json``.

It holds ``{"identity": {...}, "settings": {...}, "records": [...]}``: what was evaluated (e.g. the
checkpoint and step), the settings of the latest run, and one record per finished cell. The file is
rewritten atomically (temporary file + ``os.replace``) after each new record, so an interrupted run
resumes where it stopped (cells whose :func:`cell_key` is already there are skipped) and a finished one
does no work.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

RESULTS_FILE = "results.json"


def cell_key(record: Mapping[str, Any]) -> tuple:
    """What identifies a finished cell: its ``kind``, ``method``, ``lo``, ``hi``, ``seed``, ``split`` and
    ``max_new_tokens`` (KeyError if one is missing), and its ``depth``, ``n`` and ``cd_steps`` (None if absent)."""
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
    """Writes ``data`` as JSON atomically: a temporary file in the same folder, flushed, then ``os.replace``.

    On any failure the temporary file is removed and the previous file is left as it was.
    """
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


class ResultsFile:
    """The results file of one workdir, loaded once and rewritten after every new record.

    Attributes:
      path: ``workdir / RESULTS_FILE``.
      data: the file's content; ``data["records"]`` grows with :meth:`add`.
      done: the ``key`` of every record (by default its :func:`cell_key`).

    Raises ValueError (on construction) when the file is not a results file, or when ``identity`` gives
    another value for a key the file already holds (results of different runs are never mixed).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        settings: Mapping[str, Any],
        identity: Mapping[str, Any] | None,
        key: Callable[[Mapping[str, Any]], tuple] = cell_key,
    ):
        self.path, self.key = Path(workdir) / RESULTS_FILE, key
        self.data = read_results(self.path)
        identity = dict(identity or {})
        _check_identity(self.path, self.data.get("identity", {}), identity)
        self.data["identity"] = {**self.data.get("identity", {}), **identity}
        self.data["settings"] = dict(settings)
        self.done = {key(r) for r in self.data["records"]}

    def add(self, record: dict) -> None:
        """Appends ``record`` and rewrites the file."""
        self.data["records"].append(record)
        self.done.add(self.key(record))
        write_results(self.path, self.data)
