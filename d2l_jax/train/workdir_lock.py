"""One writer per training workdir: a lock file naming its holder, taken atomically and released on exit."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process is training in the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class WorkdirLock:
    """Exclusive use of ``workdir`` by this process while the ``with`` block runs.

    The lock is ``workdir/.lock``, created atomically (``O_CREAT | O_EXCL``) with the holder's pid, host and
    command. A lock left by a process that is gone (same host, pid not running) is stale and taken over; a
    live holder, or one on another host (which cannot be checked from here), raises WorkdirLockedError
    naming it and the file to remove if that holder is known to be dead.
    """

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a lock being written, or damaged

    def __enter__(self) -> "WorkdirLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200]}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}: "
                    f"{holder.get('command', '?')}); wait for it, use another workdir, or remove {self.path} if that run is dead"
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirLockedError(f"could not take {self.path}: another process keeps taking it")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
