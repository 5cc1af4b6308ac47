"""The ``factorize`` pass: low-rank factorization of MatMul/Gemm weights, W (K x N) -> U (K x r) @ V (r x N).

The maths (spectra, rank choice by budget, error measures, the global rank allocation) are pure numpy
functions at the top; graph surgery is below.

Plain mode truncates the SVD of W, which minimises the weight error ||W - UV||. Calibrated mode
(``calibrated=true``, the SVD-LLM / ASVD family) uses the second moment of the layer's input,
S = X^T X / n = L L^T, and truncates the SVD of L^T W: this minimises the output error ||X W - X U V|| on
the calibration inputs, which is what the model feels. Its right singular vectors Q are the principal
directions of the outputs X W, so the factors are U = W Q_r, V = Q_r^T (no inverse of L is needed, and a
singular S is not a special case).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxpress.pass_infra import Pass, option
from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import check_calibration, damped, input_stats
from onnxpress.passes.graph_utils import add_bias, drop_if_unused, new_initializer, node_label

MARK = "onnxpress.factorize"  # node metadata key set on both products of a factorized layer
_FLOAT = ir.DataType.FLOAT
_QUANT_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "MatMulInteger", "QGemm", "QLinearMatMul"}


# =====================================================================================================
# Pure maths (numpy only)
# =====================================================================================================
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


# =====================================================================================================
# Options and the pass
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class FactorizeOptions:
    rank: int | None = option(None, "fixed rank r of every factorized layer")
    ratio: float | None = option(None, "fraction of each layer's parameters kept, in (0, 1) (allocation=global: of all selected layers together)")
    energy: float | None = option(None, "fraction of the squared singular values kept, in (0, 1] (calibrated: of the output energy)")
    error: float | None = option(None, "per-layer relative error budget (plain: weight Frobenius error; calibrated: output error on the calibration data)")
    calibrated: bool = option(False, "data-aware: use each layer's input second moment from calibration data so the truncation minimises the output error")
    allocation: Literal["layer", "global"] = option("layer", "ratio: every layer keeps the ratio (layer) or ranks are spread across layers to minimise total error (global)")
    share: bool = option(False, "layers reading the same input (attention Q, K, V) share one U and are budgeted as one layer (best with calibrated=true)")
    center: bool = option(True, "calibrated: truncate on the input covariance and carry the mean error in a bias (folded into an existing bias Add/Gemm C, else one Add)")
    damping: float = option(0.01, "calibrated: ridge added to the input second moment, as a fraction of its mean diagonal")
    min_size: int = option(4096, "layers whose weight has fewer parameters are left alone")
    conv: bool = option(False, "also factorize Conv (group 1): a KxK conv with r filters, then a 1x1 conv back to the output channels (plain SVD of the [O, C*kh*kw] filter matrix)")
    include: tuple[str, ...] = option((), "only nodes whose label (node name, else output name) contains one of these substrings (empty: all)")
    exclude: tuple[str, ...] = option((), "skip nodes whose label (node name, else output name) contains one of these substrings")

    def validate(self) -> None:
        given = [k for k in ("rank", "ratio", "energy", "error") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank=, ratio=, energy=, error= (got {', '.join(given) or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError("ratio must be in (0, 1)")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError("energy must be in (0, 1]")
        if self.error is not None and not 0.0 <= self.error < 1.0:
            raise ValueError("error must be in [0, 1)")
        if self.allocation == "global" and self.ratio is None:
            raise ValueError("allocation=global needs ratio=")
        if self.damping < 0.0:
            raise ValueError("damping must be >= 0")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")


@dataclasses.dataclass
class _Target:
    node: ir.Node
    label: str
    w: np.ndarray  # K x N, the effective weight of x @ W
    weight: ir.Value  # the node's weight input (initializer, Constant output or Transpose output)
    x: ir.Value  # the activation input
    trans_x: bool  # Gemm transA: rows of the input are columns of A


@dataclasses.dataclass
class _Group:
    """Layers factorized together: one layer, or (share=true) every layer reading the same input, which
    then share one U: x -> MatMul(x, U) -> MatMul(., V_i). Its weight is [W_1 ... W_n] (K x sum N_i)."""

    members: list[_Target]

    @property
    def key(self) -> tuple[str, bool]:
        return self.members[0].x.name, self.members[0].trans_x

    @property
    def w(self) -> np.ndarray:
        ws = [t.w for t in self.members]
        return ws[0] if len(ws) == 1 else np.concatenate(ws, axis=1)

    @property
    def label(self) -> str:
        return " + ".join(t.label for t in self.members)

    @property
    def op(self) -> str:
        return "+".join(sorted({t.node.op_type for t in self.members}))


class Factorize(Pass):
    """``factorize``: low-rank factorization of MatMul/Gemm weights, W (K x N) -> U (K x r) @ V (r x N).

    Rewrites ``MatMul(x, W)`` into ``MatMul(MatMul(x, U), V)`` and ``Gemm(A, B, C)`` into
    ``Gemm(Gemm(A, U), V, C)`` (transA, transB, alpha and beta kept; the bias stays on the second product).
    With ``share=true`` layers that read the same input (attention Q, K, V) are factorized together and
    share one U: ``x -> MatMul(x, U) -> MatMul(., V_q), MatMul(., V_k), MatMul(., V_v)``.
    Applies to a 2-D float weight held in an initializer or a Constant, also behind a Transpose, of at least
    ``min_size`` parameters, not shared with other nodes, where the chosen rank saves parameters
    (r * (K + N) < K * N). Weights behind DequantizeLinear are skipped: run ``factorize`` before ``qdq``,
    which then quantizes U and V. Both products carry the node metadata ``onnxpress.factorize`` so a
    second run leaves them alone.

    The rank comes from exactly one budget: ``rank``, ``ratio`` (of each layer's parameters, or of all
    layers with ``allocation=global``), ``energy`` or ``error``. ``calibrated=true`` uses the layer's
    input second moment from the calibration data (one run over it), so the truncation minimises the
    output error, and ``energy``/``error`` measure the output. Lossy: each layer (group) reports K, N, r,
    parameters before/after, the relative spectral and Frobenius weight error and (calibrated) the
    relative output error on the calibration data. Full rank is exact up to float rounding.
    """

    name = "factorize"
    Options = FactorizeOptions
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = self._convs(model) if self.options.conv else False
        return ir.passes.PassResult(model, self._linear(model) or modified)

    def _linear(self, model: ir.Model) -> bool:
        o = self.options
        targets = self._targets(model)
        if not targets:
            return False
        groups = _group(targets, o.share)
        with _blas_threads(1):  # layers run in parallel, one BLAS thread each (no oversubscription)
            moments = self._moments(model, groups) if o.calibrated else {}
            stats = [moments.get(g.key) for g in groups]
            means = [s[1] if (s is not None and o.center) else None for s in stats]
            seconds = [None if s is None else (centered(*s) if o.center else s[0]) for s in stats]
            full = [None if s is None else s[0] for s in stats]
            weights = [g.w for g in groups]

            def spec(i: int) -> Spectrum:
                return spectrum(weights[i], damped(seconds[i], o.damping) if seconds[i] is not None else None)

            spectra = _parallel(spec, len(groups))
            ranks = self._ranks(weights, spectra)
            rows = _parallel(lambda i: _layer(groups[i], weights[i], spectra[i], ranks[i], full[i], means[i]), len(groups))
        modified = False
        for g, (row, u, v, delta) in zip(groups, rows):
            self.details.append(row)
            if u is not None:
                _rewrite(model.graph, g, u, v, delta)
                modified = True
        return modified

    # -- Conv: plain SVD of the filter matrix ------------------------------------------------------------
    def _convs(self, model: ir.Model) -> bool:
        o = self.options
        modified = False
        for node, label in self._selected(model, ("Conv",)):
            found = _classify_conv(node, o.min_size)
            if isinstance(found, str):
                if found:
                    self.details.append({"layer": label, "op": "Conv", "skipped": found})
                continue
            w = found
            mat = conv_matrix(w.astype(np.float64))
            sp = spectrum(mat)
            rank = self._ranks([mat], [sp])[0] if o.allocation == "layer" else rank_for_ratio(*mat.shape, o.ratio)
            k, n = mat.shape
            row: dict[str, Any] = {"layer": label, "op": "Conv", "K": k, "N": n, "rank": rank}
            if self.options.calibrated:
                row["note"] = "Conv: plain SVD (no calibrated statistics for Conv)"
            if rank is None or rank * (k + n) >= k * n:
                self.details.append({**row, "skipped": "the chosen rank saves no parameters"})
                continue
            u, v = factors(mat, sp, rank)
            spec, fro = weight_errors(mat, u, v)
            row.update({"params_before": k * n, "params_after": int(u.size + v.size), "spectral_error": round(spec, 6), "frobenius_error": round(fro, 6)})
            self.details.append(row)
            _rewrite_conv(model.graph, node, label, *conv_factors(w, u.astype(np.float32), v.astype(np.float32)))
            modified = True
        return modified

    # -- what to factorize -----------------------------------------------------------------------------
    def _selected(self, model: ir.Model, ops: tuple[str, ...]) -> list[tuple[ir.Node, str]]:
        """(node, label) of the standard-domain ``ops`` nodes not yet factorized that include/exclude select;
        excluded ones get a report row. A list: callers rewrite the graph while they walk it."""
        o = self.options
        out: list[tuple[ir.Node, str]] = []
        for index, node in enumerate(model.graph):
            if node.op_type not in ops or node.domain not in ("", "ai.onnx") or MARK in node.metadata_props:
                continue  # MARK: already factorized
            label = node_label(node, index)
            if o.include and not any(sub in label for sub in o.include):
                continue
            if any(sub in label for sub in o.exclude):
                self.details.append({"layer": label, "op": node.op_type, "skipped": "excluded by option"})
                continue
            out.append((node, label))
        return out

    def _targets(self, model: ir.Model) -> list[_Target]:
        o = self.options
        out: list[_Target] = []
        for node, label in self._selected(model, ("MatMul", "Gemm")):
            found = classify(node, o.min_size)
            if isinstance(found, str):
                if found:
                    self.details.append({"layer": label, "op": node.op_type, "skipped": found})
                continue
            w, x, trans_x = found
            out.append(_Target(node, label, w, node.inputs[1], x, trans_x))
        return out

    def _moments(self, model: ir.Model, groups: list[_Group]) -> dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]]:
        """Second moment S = X^T X / n and mean of every layer input, from one run over the calibration data."""
        feeds = check_calibration(model, self.context.calibration, "factorize(calibrated=true)")
        return {key: (st.second_moment, st.mean) for key, st in input_stats(model, feeds, [g.key for g in groups]).items()}

    def _ranks(self, weights: list[np.ndarray], spectra: list[Spectrum]) -> list[int | None]:
        o = self.options
        if o.ratio is not None and o.allocation == "global":
            return allocate_global([(w.shape[0], w.shape[1], sp.s) for w, sp in zip(weights, spectra)], o.ratio)
        ranks: list[int | None] = []
        for w, sp in zip(weights, spectra):
            k, n = w.shape
            if o.rank is not None:
                r = min(o.rank, len(sp.s))
            elif o.ratio is not None:
                r = rank_for_ratio(k, n, o.ratio)
            elif o.energy is not None:
                r = rank_for_energy(sp.s, o.energy)
            else:
                r = rank_for_error(sp.s, float(o.error))
            ranks.append(r)
        return ranks


def _group(targets: list[_Target], share: bool) -> list[_Group]:
    if not share:
        return [_Group([t]) for t in targets]
    groups: dict[tuple[str, bool, str], _Group] = {}
    for t in targets:
        key = (t.x.name, t.trans_x, "Gemm" if t.node.op_type == "Gemm" else "MatMul")
        groups.setdefault(key, _Group([])).members.append(t)
    return list(groups.values())


def _layer(g: _Group, w: np.ndarray, sp: Spectrum, rank: int | None, second_moment: np.ndarray | None, mean: np.ndarray | None) -> tuple[dict[str, Any], Any, Any, Any]:
    """The report row, factors (float32) and bias correction (or None) of one group; a skip row and Nones."""
    k, n = w.shape
    base = {"layer": g.label, "op": g.op, "K": k, "N": n}
    if rank is None or min(rank, len(sp.s)) * (k + n) >= k * n:
        reason = "the chosen rank saves no parameters" if rank is not None else "kept dense by the global allocation"
        return {**base, "rank": rank, "skipped": reason}, None, None, None
    u, v = factors(w, sp, rank)
    spec, fro = weight_errors(w, u, v)
    row: dict[str, Any] = {
        **base, "rank": int(u.shape[1]), "params_before": k * n, "params_after": int(u.size + v.size),
        "spectral_error": round(spec, 6), "frobenius_error": round(fro, 6),
    }
    delta = None
    if second_moment is not None:
        if mean is not None:
            delta = bias_correction(w, u, v, mean)
            row["output_error"] = round(qm.relative_output_error(w, u @ v, second_moment, centered(second_moment, mean)), 6)
        else:
            row["output_error"] = round(output_error(w, u, v, second_moment), 6)
    return row, u.astype(np.float32), v.astype(np.float32), None if delta is None else delta.astype(np.float32).reshape(-1)


def _parallel(fn, count: int) -> list:
    """[fn(0), ..., fn(count-1)] on a thread pool: numpy's LAPACK/BLAS calls release the GIL."""
    workers = min(count, os.cpu_count() or 1)
    if workers <= 1:
        return [fn(i) for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


@contextlib.contextmanager
def _blas_threads(limit: int):
    """Limit BLAS threads while layers run in parallel (threadpoolctl when installed; else no limit).

    Measured on 2 cores beside other work: OpenBLAS with 2 threads per call took 40-50 s for MiniLM,
    one thread per call and layers in parallel 2-9 s.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn; without it BLAS keeps its threads
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


# =====================================================================================================
# Graph surgery
# =====================================================================================================
def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _constant_matrix(value: ir.Value | None) -> tuple[np.ndarray | None, str]:
    """The 2-D float constant behind ``value`` (initializer or Constant, optionally through a Transpose)."""
    if value is None:
        return None, ""
    prod = _producer(value)
    if prod is not None and prod.op_type in _QUANT_OPS:
        return None, "already quantized (weight behind DequantizeLinear): run factorize before qdq"
    transpose = False
    source = value
    if prod is not None and prod.op_type == "Transpose" and prod.domain in ("", "ai.onnx"):
        perm = prod.attributes.get_ints("perm", None)
        if perm is not None and list(perm) != [1, 0]:
            return None, ""
        inner = _producer(prod.inputs[0])
        if inner is not None and inner.op_type in _QUANT_OPS:
            return None, "already quantized (weight behind DequantizeLinear): run factorize before qdq"
        source, transpose = prod.inputs[0], True
    if source is None or (source.is_graph_input() and source.const_value is None):
        return None, ""
    if source.is_graph_input():
        return None, "weight is a graph input (can be overridden at run time)"
    tensor = ir.convenience.get_const_tensor(source)
    if tensor is None:
        return None, ""
    if tensor.dtype != _FLOAT:
        return None, f"weight of type {tensor.dtype.name} (float32 only)"
    array = tensor.numpy()
    if array.ndim != 2:
        return None, f"weight of rank {array.ndim} (2-D weights only)"
    return (array.T if transpose else array), ""


def classify(node: ir.Node, min_size: int) -> tuple[np.ndarray, ir.Value, bool] | str:
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None:
        return ""
    x = inputs[0]
    if x.dtype is not None and x.dtype != _FLOAT:
        return ""
    array, reason = _constant_matrix(inputs[1])
    if array is None:
        return reason
    trans_x = False
    if node.op_type == "Gemm":
        trans_x = bool(node.attributes.get_int("transA", 0))
        if node.attributes.get_int("transB", 0):
            array = array.T
    k, n = array.shape
    if k * n < min_size:
        return ""  # small layers: not worth a row in the report
    if breakeven_rank(k, n) < 1:
        return f"{k}x{n} weight: no rank saves parameters"
    weight = inputs[1]
    if len(weight.uses()) > 1 or weight.is_graph_output():
        return f"weight '{weight.name}' is shared with other nodes (factorizing one use saves nothing)"
    prod = weight.producer()
    if prod is not None:
        source = prod.inputs[0] if prod.op_type == "Transpose" else weight
        if prod.op_type == "Transpose" and source is not None and (len(source.uses()) > 1 or source.is_graph_output()):
            return f"weight '{source.name}' is shared with other nodes (factorizing one use saves nothing)"
    return array, x, trans_x


def _classify_conv(node: ir.Node, min_size: int) -> np.ndarray | str:
    """The float filter bank [O, C, kh, kw] of a group-1 2-D Conv, or why it is skipped ('' : silently)."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return ""
    weight = node.inputs[1]
    tensor = weight.const_value if weight.is_initializer() and not weight.is_graph_input() else None
    if tensor is None or tensor.dtype != _FLOAT:
        return ""
    w = tensor.numpy()
    if w.ndim != 4:
        return "only 2-D convolutions are factorized"
    group = node.attributes.get("group")
    if group is not None and group.as_int() != 1:
        return "grouped/depthwise convolution"
    if w.size < min_size:
        return ""
    if len(weight.uses()) > 1:
        return "weight shared with other nodes"
    return w


def _rewrite_conv(graph: ir.Graph, node: ir.Node, label: str, first_w: np.ndarray, second_w: np.ndarray) -> None:
    """Conv(x, W, b) -> Conv(Conv(x, W1), W2, b): W1 [r, C, kh, kw] keeps the spatial attributes, W2 is 1x1."""
    old_weight = node.inputs[1]
    base = old_weight.name or label
    w1 = _weight(graph, f"{base}/U", first_w)
    mid = ir.Value(name=f"{node.outputs[0].name}/factorize_mid", type=ir.TensorType(_FLOAT))
    attrs = {key: attr.value for key, attr in node.attributes.items() if key != "group"}
    attrs.pop("kernel_shape", None)  # inferred from the new weights
    first = ir.node("Conv", [node.inputs[0], w1], attrs, outputs=[mid], name=f"{label}/factorize_U")
    first.metadata_props[MARK] = f"U rank={first_w.shape[0]}"
    graph.insert_before(node, first)
    for key in list(node.attributes):
        node.attributes.pop(key)
    node.replace_input_with(0, mid)
    node.replace_input_with(1, _weight(graph, f"{base}/V", second_w))
    node.name = f"{label}/factorize_V"
    node.metadata_props[MARK] = f"V rank={first_w.shape[0]}"
    drop_if_unused(graph, old_weight)


def _weight(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return new_initializer(graph, name, np.asarray(array, np.float32))


def _rewrite(graph: ir.Graph, g: _Group, u: np.ndarray, v: np.ndarray, delta: np.ndarray | None = None) -> None:
    """x -> first product with U (once per group) -> each member's node with its slice of V."""
    members = g.members
    first_member = members[0]  # graph order: members were collected in order
    base = first_member.weight.name or first_member.label
    u_value = _weight(graph, f"{base}/U", u)
    rank = u.shape[1]
    mid = ir.Value(name=f"{first_member.node.outputs[0].name}/factorize_mid", type=ir.TensorType(_FLOAT))
    x = first_member.x
    if first_member.node.op_type == "MatMul":
        first = ir.node("MatMul", [x, u_value], outputs=[mid], name=f"{first_member.label}/factorize_U")
    else:
        attrs = {"transA": 1} if first_member.trans_x else {}
        first = ir.node("Gemm", [x, u_value], attrs, outputs=[mid], name=f"{first_member.label}/factorize_U")
    first.metadata_props[MARK] = f"U rank={rank}" + (f" shared by {len(members)}" if len(members) > 1 else "")
    graph.insert_before(first_member.node, first)
    start = 0
    for t in members:
        node = t.node
        width = t.w.shape[1]
        v_value = _weight(graph, f"{t.weight.name or t.label}/V", np.ascontiguousarray(v[:, start : start + width]))
        start += width
        if node.op_type == "Gemm":
            for key in ("transA", "transB"):
                if key in node.attributes:
                    node.attributes.pop(key)
        old_weight = t.weight
        node.replace_input_with(0, mid)
        node.replace_input_with(1, v_value)
        node.name = f"{t.label}/factorize_V"
        node.metadata_props[MARK] = f"V rank={rank}"
        drop_if_unused(graph, old_weight)
        if delta is not None and np.any(delta[start - width : start]):
            add = add_bias(graph, node, delta[start - width : start], "factorize")
            if add is not None:
                add.metadata_props[MARK] = "bias"
