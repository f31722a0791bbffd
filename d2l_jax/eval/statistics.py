"""Percentile-bootstrap confidence intervals over questions, for a mean and for paired statistics of
several methods scored on the same questions (such as the gap ratio D2L closes between no document and
in-context answering)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def _index_samples(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ValueError("no values to bootstrap over")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile-bootstrap ``confidence`` interval ``(low, high)`` of the mean of ``values``.

    Raises ValueError for no values or a confidence outside (0, 1).
    """
    values = np.asarray(values, np.float64)
    index = _index_samples(len(values), resamples, seed)
    return _percentiles(values[index].mean(axis=1), confidence)


def paired_bootstrap_interval(
    statistic: Callable[..., np.ndarray],
    columns: Mapping[str, Sequence[float]],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of ``statistic(**means)`` where each resample draws the same
    questions for every column (the methods were scored on the same questions, so their errors correlate).

    ``statistic`` takes one ``[resamples]`` array of resampled means per column name and returns
    ``[resamples]`` values; resamples where it is not finite (a zero denominator) are left out.
    Raises ValueError when the columns differ in length or are empty.
    """
    arrays = {name: np.asarray(values, np.float64) for name, values in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"paired columns differ in length: { {k: len(a) for k, a in arrays.items()} }")
    index = _index_samples(lengths.pop(), resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = statistic(**{name: a[index].mean(axis=1) for name, a in arrays.items()})
    return _percentiles(np.asarray(samples, np.float64), confidence)


def gap_ratio(method, none, in_context):
    """The share of the gap between no document and in-context answering that ``method`` closes:
    ``(method - none) / (in_context - none)`` (arrays or floats; inf or nan when the gap is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(method, np.float64) - none) / (np.asarray(in_context, np.float64) - none)


def mean_and_interval(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` and its 95% bootstrap interval."""
    low, high = bootstrap_interval(values, seed=seed)
    return {"mean": float(np.mean(values)), "low": low, "high": high, "n": len(values)}
