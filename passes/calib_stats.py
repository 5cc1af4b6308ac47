"""Statistics of layer inputs over calibration data, shared by the data-aware passes and the budget search.

A layer's input ``x`` is seen as rows of its last axis (all other axes flattened), or, for a Gemm with
``transA=1``, as the columns of the 2-D ``A``. ``second_moment`` is ``S = X^T X / n`` over those rows and
``mean`` their mean; ``damped`` adds the ridge the solvers that invert or whiten ``S`` use.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnxpress.errors import UsageError

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class InputStats:
    second_moment: np.ndarray  # E[x^T x] over rows (K x K), float64
    mean: np.ndarray  # E[x] (K), float64
    rows: int


class GramSum:
    """A running ``X^T X`` over batches of rows ``[n, K]``, kept as its upper triangle in bands of rows.

    Band ``b`` holds rows ``[b0, b1)`` from the diagonal on (``X[:, b0:b1]^T X[:, b0:]``): about half of the
    matrix's memory (SmolLM2-135M's 121 GPTQ inputs: 0.23 instead of 0.40 GB held through the calibration run).
    ``full()`` gives the symmetric matrix, equal to summing ``(x.T @ x).astype(dtype)`` (each batch's product is
    float32 and exactly symmetric; its upper bands are added in ``dtype``).
    """

    BAND = 128

    def __init__(self, k: int, dtype=np.float64) -> None:
        self.k = k
        self.starts = range(0, k, self.BAND)
        self.bands = [np.zeros((min(self.BAND, k - b0), k - b0), dtype) for b0 in self.starts]

    def add(self, x: np.ndarray) -> None:
        # One full product (one BLAS call; products of the bands alone were slower and rounded differently)
        product = np.asarray(x, np.float32).T @ np.asarray(x, np.float32)
        for b0, band in zip(self.starts, self.bands):
            band += product[b0 : b0 + band.shape[0], b0:]

    def full(self) -> np.ndarray:
        out = np.zeros((self.k, self.k), self.bands[0].dtype if self.bands else np.float64)
        for b0, band in zip(self.starts, self.bands):
            out[b0 : b0 + band.shape[0], b0:] = band
        lower = np.tril_indices(self.k, -1)
        out[lower] = out.T[lower]
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bands)


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


@contextlib.contextmanager
def blas_threads(limit: int) -> Iterator[None]:
    """At most ``limit`` BLAS threads inside the block (threadpoolctl; without it, no limit).

    The data-aware passes' products and factorizations are small (hundreds to a few thousand rows): on a
    2-core machine beside other work OpenBLAS's second thread waits on the first far more than it helps
    (SmolLM2-135M's 121 GPTQ inverses: 15 s with 2 threads, 2.6 s with one; a 512 x 1536 x 512 product:
    4x faster with one), and onnxruntime's own threads still spin after each calibration run.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield
