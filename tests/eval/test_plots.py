"""Figures: each is written from the records the evaluations produce."""

import pytest

from d2l_jax.eval import plots

# The shape of ``launch.compare_cd``'s summary.
SUMMARY = {
    "d2l": {"accuracy": 1.0, "update_seconds": 0.1, "peak_memory_gb": 1.7},
    "cd_10": {"accuracy": 0.0, "update_seconds": 5.1, "peak_memory_gb": 1.8, "cd_steps": 10},
    "cd_300": {"accuracy": 1.0, "update_seconds": 103.0, "peak_memory_gb": 1.8, "cd_steps": 300},
}


def test_accuracy_vs_update_latency(tmp_path):
    path = tmp_path / "figure.png"
    plots.accuracy_vs_update_latency(SUMMARY, path, title="D2L vs CD")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="summary is empty"):
        plots.accuracy_vs_update_latency({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
