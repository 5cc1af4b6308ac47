"""The maths of the ``prune`` pass, numpy only: how many to prune, keep-masks (per output, per layer,
global, N:M), Wanda scores, SparseGPT's weight update, the least-squares re-fits of a layer that lost
inputs or units, unit scores and the mean shift of removed units.

Every weight is a matrix W [K, N]: K the reduction axis (inputs), N the outputs (see the package docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpress.passes.calib_stats import damped


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` entries to zero so that at least ``sparsity`` of them are zero."""
    return min(int(math.ceil(sparsity * size - 1e-9)), size)


def zero_fraction(w: np.ndarray) -> float:
    w = np.asarray(w)
    return float(np.count_nonzero(w == 0)) / w.size if w.size else 0.0


def _lowest(scores: np.ndarray, count: np.ndarray | int, axis: int) -> np.ndarray:
    """Boolean mask of the ``count`` lowest scores along ``axis`` (ties broken by position, stable)."""
    order = np.argsort(scores, axis=axis, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[axis]).reshape([-1 if a == axis else 1 for a in range(scores.ndim)]), axis=axis)
    return ranks < np.asarray(count)


def keep_mask(scores: np.ndarray, sparsity: float, per_output: bool = False) -> np.ndarray:
    """Keep-mask of a [K, N] score matrix: the lowest ``sparsity`` share is pruned, over the whole matrix or
    (``per_output``) within every output column. Zero scores (zero weights) go first."""
    scores = np.asarray(scores, np.float64)
    if per_output:
        return ~_lowest(scores, prune_count(scores.shape[0], sparsity), axis=0)
    flat = scores.reshape(-1)
    return ~_lowest(flat, prune_count(flat.size, sparsity), axis=0).reshape(scores.shape)


def global_keep_masks(scores: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks for several layers with one threshold: the lowest ``sparsity`` share of all scores."""
    flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores])
    keep = ~_lowest(flat, prune_count(flat.size, sparsity), axis=0)
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.size].reshape(s.shape))
        start += s.size
    return out


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with at most ``n`` kept in every ``m`` consecutive rows (the K axis) of each column.

    A last, shorter group of r < m rows keeps at most min(n, r) (the pattern still holds)."""
    scores = np.asarray(scores, np.float64)
    k, cols = scores.shape
    pad = (-k) % m
    # Padding rows score -inf: they count as pruned first, so a short group of r rows keeps min(n, r).
    padded = np.concatenate([scores, np.full((pad, cols), -np.inf)], axis=0) if pad else scores
    groups = padded.reshape(-1, m, cols)
    keep = ~_lowest(groups, m - n, axis=1)
    return keep.reshape(-1, cols)[:k]


def nm_holds(w: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive rows of each column of ``w`` has at most ``n`` non-zeros."""
    w = np.asarray(w)
    k, cols = w.shape
    pad = (-k) % m
    nz = np.concatenate([w != 0, np.zeros((pad, cols), bool)], axis=0) if pad else (w != 0)
    return bool(np.all(nz.reshape(-1, m, cols).sum(axis=1) <= n))


def wanda_scores(w: np.ndarray, input_sq_norms: np.ndarray) -> np.ndarray:
    """|w_kn| * ||x_k||_2 for a [K, N] weight and the sum of squares of each input channel over the data."""
    return np.abs(np.asarray(w, np.float64)) * np.sqrt(np.maximum(np.asarray(input_sq_norms, np.float64), 0.0)).reshape(-1, 1)


def sparsegpt(
    w: np.ndarray, hessian: np.ndarray, sparsity: float = 0.5, *, n: int = 0, m: int = 0,
    mask: np.ndarray | None = None, blocksize: int = 128, damping: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT (Frantar & Alistarh 2023) on a [K, N] weight with input second moment H = X^T X / n [K, K].

    Goes through the inputs k = 0..K-1; when weight w_kn is pruned, the error it leaves, e = w_kn /
    [H^-1]_kk (with H^-1 through its upper Cholesky factor), is spread over the not-yet-visited inputs of
    the same output n by the optimal brain surgeon update. The mask is fixed (``mask``: keep-mask) or
    chosen on the way: with ``n``/``m`` in each group of m inputs, else per output within each block of
    ``blocksize`` inputs, by the saliency w^2 / [H^-1]_kk^2. Weights that are zero stay zero (they are
    pruned first), so the result's non-zeros are a subset of the input's. Returns (new W, keep-mask).
    """
    w_t = np.array(w, np.float64).T.copy()  # [N, K]: rows are outputs, as in the paper
    rows, k = w_t.shape
    was_zero = w_t == 0
    h = damped(hessian, damping, fill_dead=True)
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor U with H^-1 = U^T U
    except np.linalg.LinAlgError:
        h = damped(hessian, max(damping, 0.1) * 10, fill_dead=True)
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    keep_t = np.ones_like(w_t, bool) if mask is None else np.asarray(mask, bool).T & ~was_zero
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        count = i2 - i1
        w1 = w_t[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = np.diag(h1)
        if mask is None and not n:
            sal = w1**2 / d.reshape(1, -1) ** 2
            sal[was_zero[:, i1:i2]] = -1.0
            keep_t[:, i1:i2] = ~_lowest(sal, prune_count(count, sparsity), axis=1)
        for i in range(count):
            col = w1[:, i]
            if mask is None and n and (i1 + i) % m == 0:
                j = min(i + m, count)
                sal = w1[:, i:j] ** 2 / d[i:j].reshape(1, -1) ** 2
                sal[was_zero[:, i1 + i : i1 + j]] = -1.0
                keep_t[:, i1 + i : i1 + j] = ~_lowest(sal, max((j - i) - n, 0), axis=1)
            q = np.where(keep_t[:, i1 + i], col, 0.0)
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w_t[:, i1:i2] = q1
        w_t[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w_t[~keep_t] = 0.0
    return w_t.T, keep_t.T


def refit_columns(w: np.ndarray, hessian: np.ndarray, mask: np.ndarray, damping: float = 0.1, chunk: int = 64) -> np.ndarray:
    """The least-squares weights on a fixed support: for each output column n with kept inputs S,
    w'_S = H_SS^-1 H_S: w_n minimises (w' - w)^T H (w' - w) = ||X w' - X w||^2 / tokens with w'_(not S) = 0.

    H is damped (a ridge that pulls w' towards w where the calibration data says little). Columns with the
    same number of kept inputs are solved together in batches of ``chunk``."""
    w = np.asarray(w, np.float64)
    mask = np.asarray(mask, bool)
    h = damped(hessian, damping, fill_dead=True)
    hw = h @ w  # [K, N]: H_S: w_n is hw[S, n]
    out = np.zeros_like(w)
    counts = mask.sum(axis=0)
    for count in np.unique(counts):
        if count == 0:
            continue
        cols = np.flatnonzero(counts == count)
        for start in range(0, len(cols), chunk):
            part = cols[start : start + chunk]
            idx = np.stack([np.flatnonzero(mask[:, j]) for j in part])  # [c, count]
            a = h[idx[:, :, None], idx[:, None, :]]  # [c, count, count]
            b = hw[idx, part[:, None]]  # [c, count]
            # float32 LAPACK: twice as fast; the ridge keeps these systems well conditioned
            sol = np.linalg.solve(a.astype(np.float32), b[..., None].astype(np.float32))[..., 0]
            out[idx, part[:, None]] = sol
    return out


def units_to_remove(count: int, fraction: float) -> int:
    """How many of ``count`` units a structured prune of ``fraction`` removes (rounded; at least one stays)."""
    return int(min(max(round(fraction * count), 0), count - 1))


def keep_units(scores: np.ndarray, remove: int) -> np.ndarray:
    """Sorted indices of the units kept when the ``remove`` lowest-scoring ones go."""
    scores = np.asarray(scores, np.float64)
    gone = _lowest(scores, remove, axis=0)
    return np.flatnonzero(~gone)


def unit_scores(in_norms: np.ndarray, out_norms: np.ndarray, act_std: np.ndarray | None = None) -> np.ndarray:
    """Importance of each hidden unit: ||W1 unit|| * ||W2 row|| (plain) or std(activation) * ||W2 row||."""
    out = np.asarray(out_norms, np.float64)
    return (np.asarray(in_norms, np.float64) if act_std is None else np.asarray(act_std, np.float64)) * out


def refit_rows(w2: np.ndarray, keep: np.ndarray, cov: np.ndarray, mean: np.ndarray, damping: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """The rows of W2 [H, D] for the kept units and a bias shift [D] that best reproduce a W2 without the others.

    With a = mu + e (covariance C of e): W2' = C_KK^-1 C_K: W2 minimises E||e W2 - e_K W2'||^2, and the
    bias shift mu W2 - mu_K W2' makes the error zero-mean. ``cov=None``-like zero matrices are not
    special: with a ridge, W2' -> W2[K] when the units are uncorrelated.
    """
    w2 = np.asarray(w2, np.float64)
    mean = np.asarray(mean, np.float64).reshape(-1)
    c = damped(np.asarray(cov, np.float64), damping, fill_dead=True)
    ckk = c[np.ix_(keep, keep)]
    rhs = c[keep, :] @ w2
    w_new = np.linalg.solve(ckk, rhs)
    shift = mean @ w2 - mean[keep] @ w_new
    return w_new, shift


def mean_shift(w2_rows: np.ndarray, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Bias shift sum_{h removed} mu_h W2[h] [D]: the removed units' average contribution."""
    return np.asarray(mean, np.float64)[removed] @ np.asarray(w2_rows, np.float64)[removed]


def removal_error(st: dict[str, Any], w2: np.ndarray, keep: np.ndarray, removed: np.ndarray, refit: np.ndarray | None) -> float:
    """Relative output error of the next layer on the calibration data after its units outside ``keep`` go
    (their mean moved into the bias; kept rows ``refit`` when re-fitted). ``st`` holds the units' activation
    ``mean``, ``var`` and, when captured (MLP with update), second moment ``gram``: the error is exact from
    the full covariance, else an estimate from its diagonal."""
    w2 = w2.astype(np.float64)
    if "gram" in st:
        cov = st["gram"] - np.outer(st["mean"], st["mean"])
        new = np.zeros_like(w2)
        new[keep] = w2[keep] if refit is None else refit
        d = w2 - new
        num = float(np.sum(d * (cov @ d)))
        den = float(np.sum(w2 * ((st["gram"]) @ w2)))
    else:
        contrib = st["var"] * np.sum(w2**2, axis=1)
        num = float(contrib[removed].sum())
        den = float(((st["var"] + st["mean"] ** 2) * np.sum(w2**2, axis=1)).sum())
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
