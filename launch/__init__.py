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
