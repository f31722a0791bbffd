"""What the training loop calls besides the step: its metrics files and its stop signals."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files (``tb/``), from process 0 only."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self.file = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


class StopOnSignal:
    """Turns SIGTERM (TPU preemption) and SIGINT (Ctrl-C) into a flag the loop checks between steps, so the
    run saves a checkpoint and stops; ``received`` names the signal (None without one). A second SIGINT
    interrupts at once, as usual. Signal handlers can only be set in the main thread; elsewhere none is set.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        log.warning("%s: saving a checkpoint and stopping (press Ctrl-C again to stop without saving)", name)
        self.received = name

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
