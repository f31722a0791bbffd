"""Environment for the test scripts that simulate several CPU devices in one process: call before importing jax."""

import os


def configure(devices: int) -> None:
    """Sizes XLA's CPU thread pool for ``devices`` simulated devices and gives collectives time to meet.

    XLA runs each device's program on one shared pool (as many threads as cores by default) and a collective
    holds its thread until every participant arrives. Independent parts of a program, such as the scan over
    layers and a parameter all-gather beside it, run concurrently, so one device can hold several threads in
    collectives while a peer still waits for a thread to reach them: a CI run hung this way with a pool of 8
    threads for 8 devices. Four threads per device leaves every device room for its collectives in flight.
    The devices also share two cores with the other tests, so a participant can arrive long after XLA's
    default 40 s.
    """
    os.environ.setdefault("PJRT_NPROC", str(4 * devices))
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
