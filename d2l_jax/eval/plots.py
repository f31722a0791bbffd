"""Plots of a training run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss (and its moving average) and student exact match against step, from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    accuracy = [(r["step"], r["eval/student_exact_match"]) for r in rows if "eval/student_exact_match" in r]
    floor = [r["eval/base_without_document_exact_match"] for r in rows if "eval/base_without_document_exact_match" in r]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        loss_axis.plot(steps, losses, color="tab:blue", alpha=0.35, label="loss")
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        loss_axis.plot(steps, smooth, color="tab:blue", label=f"loss, mean of {window} logs")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    accuracy_axis = loss_axis.twinx()
    if accuracy:
        steps, values = zip(*accuracy)
        accuracy_axis.plot(steps, values, "o-", color="tab:red", label="student exact match (no document)")
    if floor:
        accuracy_axis.axhline(floor[0], color="gray", linestyle="--", label="base model, no document")
    accuracy_axis.set_ylim(-0.02, 1.02)
    accuracy_axis.set_ylabel("NIAH exact match (validation)")
    handles = loss_axis.get_legend_handles_labels()[0] + accuracy_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles=handles, loc="center right", fontsize=8)
    loss_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
