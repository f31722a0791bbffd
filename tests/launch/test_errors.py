"""Launchers report bad input in one line (``launch.NAME: message``, exit status 1), and with
``D2L_TRACEBACK=1`` with the traceback."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import logging as absl_logging

import launch

ROOT = Path(__file__).resolve().parents[2]


def ask(tmp_path, **env):
    document = tmp_path / "document.txt"
    document.write_text("The vault code is 4817.")
    command = [sys.executable, "-m", "launch.ask", "--pretrained=no-such-hypernetwork", f"--document={document}", "--question=Which code?"]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("traceback", [False, True], ids=["one-line", "traceback"])
def test_bad_input_is_one_line_unless_a_traceback_is_asked_for(tmp_path, traceback):
    result = ask(tmp_path, **({"D2L_TRACEBACK": "1"} if traceback else {}))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    if traceback:
        assert "Traceback (most recent call last)" in result.stderr and last.startswith("ValueError: no pretrained hypernetwork")
    else:
        assert "Traceback" not in result.stderr
        assert last.startswith("launch.ask: no pretrained hypernetwork 'no-such-hypernetwork': not a shipped name (available: ")


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_library_info_lines_are_dropped_unless_verbose():
    quiet = launch.QuietLibraries()
    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not quiet.filter(_record(orbax_file, logging.INFO))
    assert quiet.filter(_record(orbax_file, logging.WARNING))
    assert quiet.filter(_record(str(ROOT / "d2l_jax/train/loop.py"), logging.INFO))
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.DEBUG)
    try:
        assert quiet.filter(_record(orbax_file, logging.INFO))
    finally:
        absl_logging.set_verbosity(verbosity)
