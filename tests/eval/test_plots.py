"""Figures: each is written from the records the evaluations produce, without touching matplotlib's
global state."""

import json
import os
import subprocess
import sys

import pytest

from d2l_jax.eval import plots

PNG = b"\x89PNG\r\n\x1a\n"

# The shape of ``launch.compare_cd``'s summary.
SUMMARY = {
    "d2l": {"accuracy": 1.0, "update_seconds": 0.1, "peak_memory_gb": 1.7},
    "cd_10": {"accuracy": 0.0, "update_seconds": 5.1, "peak_memory_gb": 1.8, "cd_steps": 10},
    "cd_300": {"accuracy": 1.0, "update_seconds": 103.0, "peak_memory_gb": 1.8, "cd_steps": 300},
}


def niah_cell(method, hi, depth, accuracy):
    """A sweep record of 2 samples (``eval.sweep.run_sweep``'s fields that the figures read)."""
    return dict(kind="niah", method=method, hi=hi, depth=depth, n=2, accuracy=accuracy,
                correct=None if accuracy is None else round(2 * accuracy))


def efficiency_cell(method, tokens, ok=True):
    row = dict(kind="efficiency", method=method, hi=2 * tokens, context_tokens=tokens, status="ok" if ok else "not run: ...",
               answer_state_bytes=tokens * 2**12)
    return row | (dict(answer_s=0.1, internalize_s=0.5) if ok else {})


def test_accuracy_vs_update_latency(tmp_path):
    path = tmp_path / "figure.png"
    plots.accuracy_vs_update_latency(SUMMARY, path, title="D2L vs CD")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="summary is empty"):
        plots.accuracy_vs_update_latency({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_write_plots_draws_every_figure(tmp_path):
    records = [niah_cell(m, hi, d, None if (m, hi) == ("icl", 1024) else 0.5) for m in ("d2l", "icl") for hi in (64, 1024) for d in (0, 9)]
    records += [efficiency_cell("d2l", 50), efficiency_cell("d2l", 900), efficiency_cell("icl", 50), efficiency_cell("icl", 900, ok=False)]
    paths = plots.write_plots(records, tmp_path / "figures", window=512, title="synthetic")
    assert [p.name for p in paths] == [
        "niah_heatmap_d2l.png", "niah_heatmap_icl.png", "niah_accuracy_by_length.png", "efficiency_by_length.png"
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    assert plots.write_plots([], tmp_path / "none") == []


def test_learning_curve(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 30)]
    rows += [{"step": 10, "eval/student_exact_match": 0.2, "eval/base_without_document_exact_match": 0.05}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plots.learning_curve(metrics, tmp_path / "curve.png", title="tiny")
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG


def test_qa_validation_curve(tmp_path):
    rows = [{"step": s, "loss": 2.0 + 1.0 / s} for s in range(10, 400, 10)]
    rows += [{"step": 0, "eval/no_document_f1": 0.07, "eval/in_context_f1": 0.15, "eval/no_document_gold_log_likelihood": -4.9,
              "eval/in_context_gold_log_likelihood": -2.6}]
    rows += [{"step": s, "eval/d2l_f1": 0.05, "eval/d2l_control_f1": 0.05, "eval/d2l_gold_log_likelihood": -4.5,
              "eval/d2l_control_gold_log_likelihood": -4.6} for s in (200, 400)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plots.qa_validation_curve(metrics, tmp_path / "qa.png", title="tiny")
    assert (tmp_path / "qa.png").read_bytes()[:8] == PNG


def test_importing_and_drawing_leave_the_backend_alone(tmp_path):
    """A fresh process (this one may have chosen a backend already) with another backend asked for."""
    script = (
        "import sys, matplotlib\n"
        "from d2l_jax.eval import plots\n"
        "plots.accuracy_vs_update_latency({'d2l': {'accuracy': 1.0, 'update_seconds': 0.1}}, sys.argv[1])\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "one.png")], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG  # the format follows the file name, not the backend
