"""Fidelity metrics, per sample: one definition for validation, the budget search and the benchmarks.

A *sample* is one row of a batch: when every input of a feed has the same leading size B and an output
also leads with B, that output is cut into B samples along axis 0 (each flattened); otherwise the whole
feed is one sample. Each sample gets its cosine similarity, relative L2 error and max-abs error against the
reference, and a metric over a set of samples is summarised as mean, worst and the 5% tail (5th percentile
of cosines, 95th percentile of errors). A whole-batch cosine is never a verdict: one bad sentence among 32
good ones barely moves it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# budget/verdict key -> (per-sample metric, statistic, direction that is better)
KEYS: dict[str, tuple[str, str, str]] = {
    "cos": ("cos", "mean", ">="),
    "min_cos": ("cos", "min", ">="),
    "p5_cos": ("cos", "p5", ">="),
    "rel_l2": ("rel_l2", "mean", "<="),
    "max_rel_l2": ("rel_l2", "max", "<="),
    "p95_rel_l2": ("rel_l2", "p95", "<="),
    "max_abs": ("max_abs", "max", "<="),
    "mean_max_abs": ("max_abs", "mean", "<="),
    "p95_max_abs": ("max_abs", "p95", "<="),
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (1.0 when both are zero, 0.0 when one is)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (0 when both are zero, inf when only the reference is)."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    denom = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    if denom == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / denom


def feed_batch(feed: Mapping[str, Any]) -> int | None:
    """The common leading size of a feed's array inputs (None when they disagree or an input is a scalar)."""
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in feed.values() if isinstance(v, np.ndarray)}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size


def sample_slices(output: np.ndarray, batch: int | None) -> list[np.ndarray]:
    """The samples of one output of a feed whose batch size is ``batch``."""
    if batch is not None and batch > 1 and output.ndim >= 1 and output.shape[0] == batch:
        return [np.asarray(output[i]) for i in range(batch)]  # asarray: a row of a 1-D output is a 0-d array, not a scalar
    return [output]


@dataclasses.dataclass
class SampleMetrics:
    """Per-sample cosine, relative L2 and max-abs error of one output over a set of samples."""

    cos: list[float] = dataclasses.field(default_factory=list)
    rel_l2: list[float] = dataclasses.field(default_factory=list)
    max_abs: list[float] = dataclasses.field(default_factory=list)

    def add(self, actual: np.ndarray, expected: np.ndarray) -> None:
        a = np.asarray(actual, np.float64)
        b = np.asarray(expected, np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite.all():  # non-finite elements are judged by validate's NaN/inf rules, not by these metrics
            a, b = a[finite], b[finite]
        self.cos.append(cosine(a, b))
        self.rel_l2.append(relative_l2(a, b))
        self.max_abs.append(float(np.abs(a - b).max()) if a.size else 0.0)

    @property
    def count(self) -> int:
        return len(self.cos)

    def statistic(self, metric: str, stat: str) -> float:
        values = np.asarray(getattr(self, metric), np.float64)
        if values.size == 0:
            return math.nan
        if stat == "mean":
            return float(values.mean())
        if stat == "min":
            return float(values.min())
        if stat == "max":
            return float(values.max())
        if stat == "p5":
            return float(np.percentile(values, 5))
        if stat == "p95":
            return float(np.percentile(values, 95))
        raise ValueError(f"unknown statistic '{stat}'")

    def standard_error(self, metric: str) -> float:
        """The standard error of the mean of ``metric`` over these samples (sample std / sqrt(n); 0 for one sample)."""
        values = np.asarray(getattr(self, metric), np.float64)
        values = values[np.isfinite(values)]
        return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0

    def summary(self) -> dict[str, float]:
        """Every key of ``KEYS`` for this output, and ``KEY_se`` (standard error) for the keys that are means."""
        out = {key: self.statistic(metric, stat) for key, (metric, stat, _) in KEYS.items()}
        out.update({f"{key}_se": self.standard_error(metric) for key, (metric, stat, _) in KEYS.items() if stat == "mean"})
        return out


def worst(summaries: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the worst value over several outputs' summaries."""
    out: dict[str, float] = {}
    for summary in summaries:
        for key, value in summary.items():
            if key not in KEYS:
                continue
            better = KEYS[key][2]
            if key not in out or (value < out[key] if better == ">=" else value > out[key]) or math.isnan(value):
                out[key] = value
                if f"{key}_se" in summary:  # the standard error travels with the output that is worst
                    out[f"{key}_se"] = summary[f"{key}_se"]
    return out


def compare_outputs(
    outputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    feeds: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, SampleMetrics]:
    """Per-sample metrics of every float output named in ``references`` (one dict per feed)."""
    per_output: dict[str, SampleMetrics] = {}
    for i, (out, ref) in enumerate(zip(outputs, references)):
        batch = feed_batch(feeds[i]) if feeds is not None else None
        for name, expected in ref.items():
            metrics = per_output.setdefault(name, SampleMetrics())
            actual = np.asarray(out[name])
            expected = np.asarray(expected)
            for a, b in zip(sample_slices(actual, batch), sample_slices(expected, batch)):
                metrics.add(a, b)
    return per_output
