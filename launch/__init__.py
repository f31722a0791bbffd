"""The absl entry points (``python -m launch.NAME``); each calls :func:`run` instead of ``absl.app.run``."""

from __future__ import annotations

import logging as std_logging
import os
import pickle
import sys
from pathlib import Path

from absl import app, logging

TRACEBACK_VARIABLE = "D2L_TRACEBACK"
# Exit status of a ``launch.train`` run stopped early by SIGTERM or SIGINT (after saving a checkpoint): the
# same command resumes it.
STOPPED_BY_SIGNAL = 3
# What bad input raises: the library's own errors (all ValueError, OSError or ImportError subclasses, or
# defined in d2l_jax) and absl's usage errors.
_INPUT_ERRORS = (app.UsageError, ValueError, OSError, ImportError, pickle.UnpicklingError)


def _is_input_error(error: BaseException) -> bool:
    return isinstance(error, _INPUT_ERRORS) or type(error).__module__.startswith("d2l_jax.")


class QuietLibraries(std_logging.Filter):
    """Drops the INFO lines of the libraries in ``LIBRARIES`` (Orbax logs tens of lines of handler registries
    and options per checkpoint), unless absl's verbosity is raised (``--v=1``); their warnings and errors
    pass."""

    LIBRARIES = ("orbax",)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1:
            return True
        parts = Path(record.pathname).parts
        return not any(library in parts for library in self.LIBRARIES)


def check_model_flags(pretrained: str | None, checkpoint: str | None, step: int | None = None) -> None:
    """app.UsageError (a one-line message) unless exactly one of ``pretrained`` and ``checkpoint`` is given
    and a ``checkpoint`` directory exists; checked before anything loads."""
    if bool(pretrained) == bool(checkpoint):
        raise app.UsageError("give exactly one of --pretrained and --checkpoint")
    if checkpoint and not Path(checkpoint).is_dir():
        raise app.UsageError(f"--checkpoint={checkpoint}: no such directory")
    if pretrained and step is not None:
        raise app.UsageError("--step applies to --checkpoint only")


def load_d2l(pretrained: str | None, checkpoint: str | None, step: int | None = None):
    """The D2L named by exactly one of ``pretrained`` (a shipped name or a directory) and ``checkpoint``
    (a training workdir). Raises app.UsageError (a one-line message) for bad flags, an unknown name, a
    missing, mismatched or corrupt checkpoint."""
    check_model_flags(pretrained, checkpoint, step)
    from d2l_jax.api import D2L

    try:
        return D2L.from_pretrained(pretrained) if pretrained else D2L.load(checkpoint, step=step)
    except (FileNotFoundError, ValueError) as error:
        flag = f"--pretrained={pretrained}" if pretrained else f"--checkpoint={checkpoint}"
        raise app.UsageError(f"{flag}: {error}") from None


def run(main) -> None:
    """``absl.app.run(main)``, with an error about the user's input (a bad flag value, a missing file, a
    corrupt checkpoint...) printed as one line, ``launch.NAME: message``, and exit status 1; with the
    environment variable ``D2L_TRACEBACK=1`` it propagates with its traceback instead. Libraries' INFO lines
    are dropped (:class:`QuietLibraries`)."""
    name = f"launch.{Path(sys.argv[0]).stem}"

    def guarded(argv):
        logging.get_absl_handler().addFilter(QuietLibraries())
        try:
            return main(argv)
        except Exception as error:
            if not _is_input_error(error) or os.environ.get(TRACEBACK_VARIABLE) == "1":
                raise
            sys.exit(f"{name}: {error}")

    app.run(guarded)
