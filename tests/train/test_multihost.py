"""Two processes x 4 CPU devices on loopback (one JAX job, gloo collectives) train exactly as one
process with 8 devices, and their jointly written checkpoint restores in a single process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "multihost_step.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log, *args):
    """Starts the script with its output in the file ``log`` (pipes could fill and stall a process that
    its partner waits for in a collective)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    process.log = log
    return process


def finish(process, timeout=600):
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, open(process.log).read()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    port, checkpoint = free_port(), tmp / "checkpoint"
    # All three run at once; the single process restores the pair's checkpoint once process 0 has written
    # its output (after the save).
    processes = [
        start(tmp / f"process{i}.log", "--processes=2", f"--process_id={i}", f"--port={port}", f"--checkpoint={checkpoint}", f"--out={tmp}/process{i}.json")
        for i in range(2)
    ]
    processes.append(start(tmp / "single.log", "--processes=1", f"--restore={checkpoint}", f"--wait_for={tmp}/process0.json", f"--out={tmp}/single.json"))
    try:
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("process0", "process1", "single")}


def test_two_processes_train_as_one(runs):
    single, first, second = runs["single"], runs["process0"], runs["process1"]
    assert (single["process_count"], first["process_count"]) == (1, 2)
    assert first["losses"] == second["losses"]  # one job: both processes see the same replicated metrics
    np.testing.assert_allclose(first["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(first["checksums"], single["checksums"], rtol=1e-4, atol=1e-5)


def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    single = runs["single"]
    assert single["restored_step"] == 3
    np.testing.assert_allclose(single["restored_checksums"], runs["process0"]["checksums"], rtol=1e-6, atol=1e-7)
    assert single["restored_max_abs_difference"] < 1e-5
