"""Figures of training runs and evaluations: learning curves, NIAH accuracy, latency and memory.

Drawn with matplotlib's object-oriented API (``Figure`` + ``savefig``, which picks the renderer from the
file's extension), so neither importing this module nor drawing touches pyplot or the process's backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def learning_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss (and its moving average) and student exact match against step, from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    accuracy = [(r["step"], r["eval/student_exact_match"]) for r in rows if "eval/student_exact_match" in r]
    floor = [r["eval/base_without_document_exact_match"] for r in rows if "eval/base_without_document_exact_match" in r]
    fig = Figure(figsize=(7, 4))
    loss_axis = fig.subplots()
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


def qa_validation_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """A QA run from its ``metrics.jsonl`` (the ``qa`` evaluator's metrics): training loss, then the
    validation gold answer's log-likelihood and token F1 of the student (no document) and its control
    (another document's adapter) against step, with their 95% intervals where the metrics hold them, and the
    base model without and with the document as lines."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(13, 3.8))
    loss_axis, likelihood_axis, f1_axis = fig.subplots(1, 3)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        steps, losses = np.array(train).T
        window = max(1, len(losses) // 20)
        loss_axis.plot(steps, losses, color="tab:blue", alpha=0.35)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axis.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window} logs")
        loss_axis.legend(fontsize=8)
    loss_axis.set(xlabel="step", ylabel="training loss", title=title)
    for axis, metric, label in ((likelihood_axis, "gold_log_likelihood", "gold answer log-likelihood / token"), (f1_axis, "f1", "token F1")):
        for method, style in (("d2l", dict(color="tab:red", marker="o")), ("d2l_control", dict(color="tab:orange", marker="x"))):
            key = f"eval/{method}_{metric}"
            points = [(r["step"], r[key], r.get(f"{key}_low", r[key]), r.get(f"{key}_high", r[key])) for r in rows if key in r]
            if points:
                steps, means, lows, highs = np.array(points).T
                name = "D2L" if method == "d2l" else "control (another document)"
                axis.errorbar(steps, means, yerr=(means - lows, highs - means), capsize=3, label=name, **style)
        for method, style in (("no_document", dict(color="gray")), ("in_context", dict(color="tab:blue"))):
            values = [r[f"eval/{method}_{metric}"] for r in rows if f"eval/{method}_{metric}" in r]
            if values:
                axis.axhline(values[0], linestyle="--", label=f"base, {method.replace('_', ' ')}", **style)
        axis.set(xlabel="step", ylabel=label)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


_METHOD_STYLES = {
    "d2l": dict(color="tab:red", marker="o", label="D2L (adapter, no document)"),
    "cd": dict(color="tab:green", marker="D", label="context distillation (LoRA, no document)"),
    "icl": dict(color="tab:blue", marker="s", label="in-context (document in prompt)"),
    "truncated_icl": dict(color="tab:cyan", marker="^", label="truncated in-context"),
    "base": dict(color="gray", marker="x", label="base model, no document"),
}


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def niah_heatmap(records, method: str, png_path: str | Path, title: str = "") -> None:
    """Exact match of one method over length (rows, by bin upper end ``hi``) x needle depth (columns).

    ``records`` are the sweep's NIAH records (``eval.sweep.run_sweep``); a cell that did not run is grey and
    marked "n/r", a cell absent from the records is blank.
    """
    rows = [r for r in records if r["method"] == method]
    lengths = sorted({r["hi"] for r in records})
    depths = sorted({r["depth"] for r in records})
    values = np.full((len(lengths), len(depths)), np.nan)
    not_run = np.zeros(values.shape, bool)
    for r in rows:
        i, j = lengths.index(r["hi"]), depths.index(r["depth"])
        if r["accuracy"] is None:
            not_run[i, j] = True
        else:
            values[i, j] = r["accuracy"]
    fig = Figure(figsize=(1.0 + 0.6 * len(depths), 1.2 + 0.45 * len(lengths)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            if not_run[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color="lightgray"))
                ax.text(j, i, "n/r", ha="center", va="center", fontsize=7, color="dimgray")
            elif not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(depths)), [f"{10 * d}-{10 * d + 10}%" for d in depths], rotation=45, fontsize=7)
    ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens (bin upper end)")
    ax.set_title(title or method, fontsize=9)
    fig.colorbar(image, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def niah_accuracy_by_length(records, png_path: str | Path, window: int | None = None, title: str = "") -> None:
    """Exact match against context length (bin upper end), one line per method, pooled over depths
    (correct / samples); cells that did not run are left out, so a line stops where its method cannot run.
    ``window`` draws the base model's context window."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in records):
        totals: dict[int, list[int]] = {}
        for r in records:
            if r["method"] == method and r["accuracy"] is not None:
                total = totals.setdefault(r["hi"], [0, 0])
                total[0] += r["correct"]
                total[1] += r["n"]
        if not totals:
            continue
        lengths = sorted(totals)
        style = _METHOD_STYLES.get(method, dict(label=method, marker="o"))
        ax.plot(lengths, [totals[n][0] / totals[n][1] for n in lengths], "-", **style)
    if window:
        ax.axvline(window, color="black", linestyle="--", linewidth=1, label=f"base model window ({window})")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["hi"] for r in records})
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context tokens (bin upper end)")
    ax.set_ylabel("NIAH exact match")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def efficiency_by_length(records, png_path: str | Path, window: int | None = None, title: str = "") -> None:
    """Two panels against document tokens, from the sweep's efficiency records: answer-time memory
    beyond the base parameters (KV cache, plus the adapter for D2L and CD; in-context beyond the window is
    the analytic KV cache it would need, dotted) and latency (the update: D2L's internalization or CD's
    training at its step budget; the answer to one question)."""
    fig = Figure(figsize=(11, 4))
    memory_ax, time_ax = fig.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in records):
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["context_tokens"])
        style = _METHOD_STYLES.get(method, dict(label=method, marker="o"))
        sized = [(r["context_tokens"], r["answer_state_bytes"] / 2**20, r["status"] == "ok") for r in rows if "answer_state_bytes" in r]
        memory_ax.plot([x for x, _, ok in sized if ok], [mib for _, mib, ok in sized if ok], "-", **style)
        if not all(ok for _, _, ok in sized):
            memory_ax.plot([x for x, _, _ in sized], [mib for _, mib, _ in sized], ":", color=style.get("color"),
                           marker=style.get("marker"), alpha=0.5, label=f"{method}: analytic, not runnable")
        timed = [r for r in rows if r.get("answer_s") is not None]
        time_ax.plot([r["context_tokens"] for r in timed], [r["answer_s"] for r in timed], "-",
                     color=style.get("color"), marker=style.get("marker"), label=f"{method}: answer one question")
        updated = [(r["context_tokens"], r.get("internalize_s", r.get("update_s"))) for r in rows]
        updated = [(x, seconds) for x, seconds in updated if seconds is not None]
        if updated:
            steps = {r["cd_steps"] for r in rows if "cd_steps" in r}
            what = "internalize" if not steps else f"train {steps.pop()} steps" if len(steps) == 1 else "train"
            time_ax.plot(*zip(*updated), "--", color=style.get("color"), marker=style.get("marker"),
                         label=f"{method}: {what} (update)")
    for ax in (memory_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.grid(alpha=0.3)
        if window:
            ax.axvline(window, color="black", linestyle="--", linewidth=1, label=f"window ({window})")
        ax.legend(fontsize=7, loc="best")
    memory_ax.set_ylabel("answer-time memory beyond the weights (MiB)")
    time_ax.set_ylabel("seconds")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def accuracy_vs_update_latency(summary, png_path: str | Path, title: str = "") -> None:
    """Accuracy against the seconds it takes to adapt the model to a document (log scale).

    ``summary`` maps a method to ``{"accuracy", "update_seconds"}`` (e.g. ``launch.compare_cd``'s summary);
    entries with ``"cd_steps"`` are one context-distillation curve over its step budgets, each point
    labelled with its budget; the others are single points (D2L).
    """
    if not summary:
        raise ValueError("summary is empty: nothing to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    budgets = sorted((s for s in summary.values() if "cd_steps" in s), key=lambda s: s["cd_steps"])
    if budgets:
        ax.plot([s["update_seconds"] for s in budgets], [s["accuracy"] for s in budgets], "-", **_METHOD_STYLES["cd"])
        for s in budgets:
            ax.annotate(f"{s['cd_steps']} steps", (s["update_seconds"], s["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
    for method, s in summary.items():
        if "cd_steps" not in s:
            style = _METHOD_STYLES.get(method, dict(label=method, marker="o"))
            ax.plot([s["update_seconds"]], [s["accuracy"]], linestyle="none", markersize=9, **style)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.12)
    ax.set_xlabel("update latency per document (s, median)")
    ax.set_ylabel("exact match")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


_QA_STYLES = {
    "d2l": _METHOD_STYLES["d2l"],
    "d2l_control": dict(color="tab:orange", marker="v", label="D2L control (unrelated document)"),
    "cd_generated": dict(color="tab:green", marker="D", label="CD, generated questions"),
    "cd_oracle": dict(color="tab:olive", marker="P", label="CD, oracle question"),
}


def qa_f1_vs_update_latency(summary, png_path: str | Path, title: str = "") -> None:
    """QA token F1 (percent, with 95% intervals) against the median update latency per document (log
    scale): one point per adapting method (CD once per step budget), and the in-context ceiling and
    no-document floor as bands.

    ``summary`` maps a variant (a method, or ``<cd method>@<steps>``) to ``eval.qa_methods.method_summary`` output (``f1`` with ``mean``/``low``/
    ``high``, ``update_seconds``, ``questions``).
    """
    done = {m: s for m, s in summary.items() if s.get("questions")}
    if not done:
        raise ValueError("summary has no scored method: nothing to plot")
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for method, color, label in (("in_context", "tab:blue", "in-context (document in prompt)"), ("no_document", "gray", "no document")):
        if method in done:
            f1 = done[method]["f1"]
            ax.axhline(100 * f1["mean"], color=color, linestyle="--", label=f"{label}, n={done[method]['questions']}")
            ax.axhspan(100 * f1["low"], 100 * f1["high"], color=color, alpha=0.12)
    for variant, s in done.items():
        method, _, budget = variant.partition("@")
        if method in _QA_STYLES:
            style = _QA_STYLES[method]
            label = f"{style['label']}{f' @ {budget} steps' if budget else ''}, n={s['questions']}"
            error = [[100 * (s["f1"]["mean"] - s["f1"]["low"])], [100 * (s["f1"]["high"] - s["f1"]["mean"])]]
            ax.errorbar([s["update_seconds"]], [100 * s["f1"]["mean"]], yerr=error, linestyle="none", markersize=8, capsize=3,
                        **{**style, "label": label})
    ax.set_xscale("log")
    ax.set_xlabel("update latency per document (s, median)")
    ax.set_ylabel("token F1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def write_plots(records: Sequence[dict], workdir: str | os.PathLike, window: int | None = None, title: str = "") -> list[Path]:
    """The figures of a sweep's records (``eval.sweep``) in ``workdir`` (created if absent):
    ``niah_heatmap_<method>.png`` per method, ``niah_accuracy_by_length.png`` and, with efficiency records,
    ``efficiency_by_length.png``. ``window`` (tokens) draws the base model's context window. Returns their paths."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    niah = [r for r in records if r["kind"] == "niah"]
    paths = []
    for method in dict.fromkeys(r["method"] for r in niah):
        path = workdir / f"niah_heatmap_{method}.png"
        niah_heatmap(niah, method, path, title=f"{title} {method}".strip())
        paths.append(path)
    if niah:
        path = workdir / "niah_accuracy_by_length.png"
        niah_accuracy_by_length(niah, path, window=window, title=title)
        paths.append(path)
    efficiency = [r for r in records if r["kind"] == "efficiency"]
    if efficiency:
        path = workdir / "efficiency_by_length.png"
        efficiency_by_length(efficiency, path, window=window, title=title)
        paths.append(path)
    return paths
