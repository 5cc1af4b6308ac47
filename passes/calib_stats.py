"""Statistics of layer inputs over calibration data, shared by the data-aware passes and the budget search.

A layer's input ``x`` is seen as rows of its last axis (all other axes flattened), or, for a Gemm with
``transA=1``, as the columns of the 2-D ``A``. ``second_moment`` is ``S = X^T X / n`` over those rows and
``mean`` their mean; ``damped`` adds the ridge the solvers that invert or whiten ``S`` use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxpress.errors import UsageError

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class InputStats:
    second_moment: np.ndarray  # E[x^T x] over rows (K x K), float64
    mean: np.ndarray  # E[x] (K), float64
    rows: int


def rows_of(x: np.ndarray, transposed: bool = False) -> np.ndarray:
    """The rows [n, K] of an activation: its last axis flattened over the others, or (``transposed``) the
    columns of a 2-D Gemm input with transA=1."""
    x = np.asarray(x, np.float32)
    return x.T if transposed else x.reshape(-1, x.shape[-1])


def check_calibration(model: ir.Model, feeds: Sequence[Feed] | None, who: str) -> Sequence[Feed]:
    """The calibration feeds of a data-aware pass, checked against ``model``'s inputs; a usage error naming
    ``who`` (e.g. ``factorize(calibrated=true)``) when there are none."""
    if not feeds:
        raise UsageError(f"{who} needs calibration data: pass --calibration PATH (CLI) or calibration= (API)")
    from onnxpress.data import check_feeds

    for i, feed in enumerate(feeds):
        check_feeds(feed, model, where=f"calibration batch {i}")
    return feeds


def input_stats(model: ir.Model, feeds: Sequence[Feed], keys: Iterable[tuple[str, bool]]) -> dict[tuple[str, bool], InputStats]:
    """Second moment and mean of each ``(value name, transposed)`` in ``keys`` (see ``rows_of``), from one
    onnxruntime run over all calibration batches."""
    from onnxpress import runtime

    keys = sorted(set(keys))
    if not keys:
        return {}
    sums: dict[tuple[str, bool], np.ndarray] = {}
    firsts: dict[tuple[str, bool], np.ndarray] = {}
    counts: dict[tuple[str, bool], int] = {}
    for values in runtime.capture(model, feeds, sorted({name for name, _ in keys})):
        for key in keys:
            rows = rows_of(values[key[0]], key[1])
            sums[key] = sums.get(key, 0.0) + (rows.T @ rows).astype(np.float64)
            firsts[key] = firsts.get(key, 0.0) + rows.sum(axis=0, dtype=np.float64)
            counts[key] = counts.get(key, 0) + rows.shape[0]
    return {key: InputStats(sums[key] / max(counts[key], 1), firsts[key] / max(counts[key], 1), counts[key]) for key in sums}


def collect_input_stats(model: ir.Model, feeds: Sequence[Feed], names: Sequence[str]) -> dict[str, InputStats]:
    """``input_stats`` of plain (not transposed) activations, keyed by value name."""
    return {name: st for (name, _), st in input_stats(model, feeds, [(n, False) for n in names]).items()}


def damped(second_moment: np.ndarray, damping: float, *, fill_dead: bool = False) -> np.ndarray:
    """``S + damping * m * I`` (float64), ``m`` the mean diagonal of the live inputs (``S_kk > 0``; 1.0 when
    none is): a ridge that pulls a data-aware solution towards the plain one.

    ``fill_dead``: a dead input (``S_kk <= 0``: always zero on the data) gets ``m`` on its diagonal, so ``S``
    can be inverted or factorized (Cholesky) even at ``damping=0``; without it a dead input keeps its zero
    row (whitening by a PSD root needs no inverse, and the data say nothing about that input)."""
    s = np.array(second_moment, np.float64)
    diag = np.diag(s).copy()
    live = diag > 0
    mean = float(diag[live].mean()) if np.any(live) else 1.0
    idx = np.arange(s.shape[0])
    if damping > 0.0:
        s[idx, idx] += damping * mean
    if fill_dead:
        s[idx[~live], idx[~live]] = mean
    return s
