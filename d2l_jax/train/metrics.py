"""What the training loop calls besides the step: its metrics files and its preemption signal."""

from __future__ import annotations

import json
import logging
import signal
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
    """Turns SIGTERM (TPU preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)
