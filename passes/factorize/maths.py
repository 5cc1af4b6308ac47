"""The maths of ``factorize`` (numpy only): rank choice by budget, spectra, factors, error measures, the
bias correction of calibrated mode and the global rank allocation.

Plain mode truncates the SVD of W, which minimises the weight error ||W - UV||. Calibrated mode uses the
second moment of the layer's input, S = X^T X / n = L L^T, and truncates the SVD of L^T W: this minimises
the output error ||X W - X U V|| on the calibration inputs. Its right singular vectors Q are the principal
directions of the outputs X W, so the factors are U = W Q_r, V = Q_r^T (no inverse of L is needed, and a
singular S is not a special case).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import damped


def breakeven_rank(k: int, n: int) -> int:
    """The largest rank r that still saves parameters: r * (k + n) < k * n (0 when none does)."""
    return max((k * n - 1) // (k + n), 0)


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """Rank whose factors hold at most ``ratio`` of the k*n parameters (at least 1)."""
    return max(int(np.floor(ratio * k * n / (k + n) + 1e-9)), 1)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the sum of squared singular values."""
    sq = np.asarray(s, np.float64) ** 2
    total = sq.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(sq) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(sq)))


def tail_error(s: np.ndarray) -> np.ndarray:
    """Relative Frobenius error of every truncation: out[r] = sqrt(sum_{i>=r} s_i^2 / sum s_i^2), r = 0..len(s)."""
    sq = np.asarray(s, np.float64) ** 2
    total = sq.sum()
    tails = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tails, 0.0) / total) if total > 0 else np.zeros(len(sq) + 1)


def rank_for_error(s: np.ndarray, error: float) -> int:
    """Smallest rank (>= 1) whose relative Frobenius truncation error is at most ``error``."""
    tails = tail_error(s)
    ok = np.nonzero(tails[1:] <= error + 1e-12)[0]
    return int(ok[0] + 1) if len(ok) else len(s)


def _psd_root(s: np.ndarray) -> np.ndarray:
    """A square root L with S = L L^T for a symmetric positive semi-definite S (eigh; negative rounding clipped)."""
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return vecs * np.sqrt(np.maximum(vals, 0.0))


@dataclasses.dataclass
class Spectrum:
    """The right singular vectors and singular values a layer is truncated with.

    Plain: of W. Calibrated: of L^T W where S = L L^T is the input second moment; these are the singular
    values and output-space directions of Y = X W, so keeping the top r directions (W' = W Q_r Q_r^T) gives
    the best rank-r output in the least-squares sense (Eckart-Young on X W): the optimum SVD-LLM reaches
    by whitening, here without inverting L, so a singular S needs no special case.
    """

    s: np.ndarray  # singular values, decreasing, length min(K, N)
    q: np.ndarray  # N x min(K, N): right singular vectors (columns)


def spectrum(w: np.ndarray, second_moment: np.ndarray | None = None) -> Spectrum:
    """Singular values and right singular vectors of W (plain) or of L^T W (S = L L^T given).

    Computed from the eigendecomposition of the smaller Gram matrix: O(min(K,N)^3), several times faster
    than a full SVD on CPU. Squared singular values are exact to rounding relative to the largest one,
    which is what truncation needs; full rank reproduces W exactly (W Q Q^T = W, Q orthogonal).
    """
    w = np.asarray(w, np.float64)
    k, n = w.shape
    if n <= k:
        sw = w if second_moment is None else np.asarray(second_moment, np.float64) @ w
        gram = w.T @ sw  # N x N: W^T S W
        vals, q = np.linalg.eigh((gram + gram.T) / 2)
        vals, q = vals[::-1], q[:, ::-1]
    else:
        m = w if second_moment is None else _psd_root(np.asarray(second_moment, np.float64)).T @ w  # K x N
        vals, p = np.linalg.eigh(m @ m.T)
        vals, p = vals[::-1], p[:, ::-1]
        s = np.sqrt(np.maximum(vals, 0.0))
        q = (p.T @ m).T  # N x K, column i scaled by s_i
        nonzero = s > s[0] * 1e-12 if s[0] > 0 else np.zeros_like(s, bool)
        q[:, nonzero] /= s[nonzero]
        q[:, ~nonzero] = 0.0
    return Spectrum(np.sqrt(np.maximum(vals, 0.0)), np.ascontiguousarray(q))


def factors(w: np.ndarray, sp: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """U = W Q_r (K x r), V = Q_r^T (r x N): U @ V is W projected on the kept output directions."""
    r = int(min(max(rank, 1), len(sp.s)))
    q = sp.q[:, :r]
    return np.asarray(w, np.float64) @ q, q.T.copy()


def factorize_matrix(w: np.ndarray, rank: int, second_moment: np.ndarray | None = None, damping: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """W ~ U @ V at the given rank: plain SVD, or output-aware when the input second moment is given."""
    s2 = damped(second_moment, damping) if second_moment is not None else None
    return factors(w, spectrum(w, s2), rank)


def conv_matrix(w: np.ndarray) -> np.ndarray:
    """A Conv filter bank [O, C, kh, kw] as the K x N matrix of ``patches @ W`` (K = C*kh*kw, N = O)."""
    return w.reshape(w.shape[0], -1).T


def conv_factors(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factors U (K x r), V (r x N) of ``conv_matrix(w)`` as two filter banks: a [r, C, kh, kw] conv (same
    strides, pads, dilations) followed by a [O, r, 1, 1] pointwise conv. Their composition is ``U @ V``."""
    o, c, kh, kw = w.shape
    r = u.shape[1]
    return np.ascontiguousarray(u.T.reshape(r, c, kh, kw)), np.ascontiguousarray(v.T.reshape(o, r, 1, 1))


def _spectral_norm(a: np.ndarray) -> float:
    gram = a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T
    return float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0))) if gram.size else 0.0


def weight_errors(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Relative (spectral, Frobenius) error of U @ V against W."""
    w = np.asarray(w, np.float64)
    d = w - u @ v
    spec_w, fro_w = _spectral_norm(w), float(np.linalg.norm(w))
    spec = _spectral_norm(d) / spec_w if spec_w else 0.0
    fro = float(np.linalg.norm(d)) / fro_w if fro_w else 0.0
    return spec, fro


def output_error(w: np.ndarray, u: np.ndarray, v: np.ndarray, second_moment: np.ndarray) -> float:
    """Relative output error sqrt(E||x(W - UV)||^2 / E||xW||^2) for inputs with second moment S = E[x^T x]."""
    return qm.relative_output_error(w, np.asarray(u, np.float64) @ np.asarray(v, np.float64), second_moment)


def centered(second_moment: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Covariance E[(x - mu)^T (x - mu)] from the second moment E[x^T x] and the mean mu."""
    mean = np.asarray(mean, np.float64).reshape(-1)
    return np.asarray(second_moment, np.float64) - np.outer(mean, mean)


def bias_correction(w: np.ndarray, u: np.ndarray, v: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """delta = mu (W - U V): adding it to the output makes the error zero-mean, so the truncation only has
    to follow the input covariance (the mean is carried by a bias instead of by rank)."""
    return np.asarray(mean, np.float64).reshape(1, -1) @ (np.asarray(w, np.float64) - u @ v)


def allocate_global(layers: Sequence[tuple[int, int, np.ndarray]], ratio: float, weights: Sequence[float] | None = None) -> list[int | None]:
    """Ranks for several layers so their parameters total at most ``ratio`` of the dense total.

    ``layers``: (K, N, singular values) per layer. Minimises the sum of the layers' relative squared
    truncation errors (Lagrangian relaxation, bisection on the price of a parameter); each layer picks a
    rank in 1..breakeven or stays dense (``None``: no error, K*N parameters). Layers whose spectrum is
    flat keep more of the budget's cut elsewhere.
    """
    dense = [k * n for k, n, _ in layers]
    budget = ratio * sum(dense)
    options = []
    for index, (k, n, s) in enumerate(layers):
        be = min(breakeven_rank(k, n), len(s))
        tails = tail_error(s) ** 2 * (1.0 if weights is None else weights[index])  # (weighted) relative squared error at rank r
        ranks = np.arange(1, be + 1)
        options.append((ranks, tails[1 : be + 1], ranks * (k + n), k * n))

    def pick(price: float) -> tuple[list[int | None], float]:
        chosen: list[int | None] = []
        total = 0.0
        for ranks, errs, costs, full in options:
            if len(ranks):
                obj = errs + price * costs
                i = int(np.argmin(obj))
                if obj[i] < price * full:
                    chosen.append(int(ranks[i]))
                    total += float(costs[i])
                    continue
            chosen.append(None)
            total += full
        return chosen, total

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget and hi < 1e30:
        hi *= 10.0
    best = pick(hi)[0]
    if pick(lo)[1] <= budget:
        return pick(lo)[0]
    for _ in range(100):
        mid = (lo + hi) / 2 if hi / max(lo, 1e-300) < 4 else np.sqrt(max(lo, 1e-300) * hi)
        chosen, total = pick(mid)
        if total <= budget:
            hi, best = mid, chosen
        else:
            lo = mid
    return best



def output_energy(w: np.ndarray, second_moment: np.ndarray) -> float:
    """tr(W^T S W) = E||x W||^2: a layer's mean squared output for inputs with second moment S (the scale
    relative output errors are measured against)."""
    w = np.asarray(w, np.float64)
    return float(np.einsum("kn,kn->", w, np.asarray(second_moment, np.float64) @ w))


def direction_energies(w: np.ndarray, q: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """e_i = q_i^T W^T M W q_i for each column q_i of ``q`` (orthonormal output directions).

    Truncating to the first r directions leaves D = W Q_t Q_t^T (Q_t the others), and because the q_i are
    orthonormal tr(D^T M D) = sum_{i >= r} e_i exactly: with M the input covariance this is the output
    error a bias-corrected factorization makes, whatever ridge the spectrum was computed with."""
    wq = np.asarray(w, np.float64) @ np.asarray(q, np.float64)
    return np.einsum("km,km->m", wq, np.asarray(moment, np.float64) @ wq)
