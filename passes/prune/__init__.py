"""The ``prune`` pass: zero weights (unstructured or N:M) or remove whole units (structured) of linear layers.

The maths (how many to prune, masks, scores, SparseGPT's weight update, the least-squares re-fit of a
layer that lost inputs) are pure numpy functions at the top; graph surgery is below.

Every weight is seen as a matrix W [K, N]: K the reduction axis (inputs), N the outputs. MatMul weights
are that already; a Gemm weight with transB=1 is its transpose; a Conv weight [Cout, Cin, kh, kw] is
reshaped to [Cin*kh*kw, Cout].

- ``magnitude``: zero the weights of lowest score. Comparison groups (``scope``): each output unit keeps
  the same share (``output``, as Wanda does), each layer (``layer``), or all selected layers together
  (``global``).
- ``nm``: at most N non-zeros in every M consecutive weights along K (2:4 by default).
- Scores: |w| (plain), or with ``calibrated=true`` |w_kn| * ||x_k||_2 (Wanda: the weight times the norm
  of its input channel over the calibration data). ``update=true`` also changes the surviving weights,
  using the input second moment H = X^T X / n: ``solver=refit`` (default) solves, for every output, the
  least-squares weights on its kept inputs (w'_S = H_SS^-1 H_S: w, exact for the mask); ``solver=sparsegpt``
  runs SparseGPT's one-pass optimal-brain-surgeon update (each pruned weight's error is spread over the
  not-yet-visited inputs; the mask is chosen on the way). Measured on MiniLM at 50% (mean embedding
  cosine): magnitude 0.726 per layer / 0.756 per output, Wanda 0.868, SparseGPT 0.915, refit 0.927.
- ``structured``: remove whole hidden units of ``W1 -> unit-wise ops -> W2`` blocks (transformer MLP
  units, Conv output channels with their BatchNorm and the next Conv's input channels), so shapes shrink.
  Units are scored by ||W1 unit|| * ||W2 row|| (plain) or by the spread of the unit's activation times
  ||W2 row|| (calibrated; the mean of every removed unit is then carried by the next layer's bias).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxpress.pass_infra import Pass, option
from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import check_calibration, damped
from onnxpress.passes.graph_utils import add_bias, const_array, drop_if_unused, node_label, set_const

UNITS_MARK = "onnxpress.prune.units"  # node metadata on the first layer of a structurally pruned block
INPUTS_MARK = "onnxpress.prune.inputs"  # and on the layers that read its units
_FLOAT = ir.DataType.FLOAT
_QUANT_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "MatMulInteger", "QGemm", "QLinearMatMul"}


# =====================================================================================================
# Pure maths (numpy only)
# =====================================================================================================
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


# =====================================================================================================
# Options
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: Literal["magnitude", "nm", "structured"] = option("magnitude", "magnitude: zero single weights; nm: N:M semi-structured along the reduction axis; structured: remove whole hidden units (MLP units, Conv channels)")
    sparsity: float = option(0.5, "magnitude: share of each layer's weights zeroed; structured: share of each block's hidden units removed")
    scope: Literal["output", "layer", "global"] = option("output", "magnitude: comparison group of the scores: each output unit (as Wanda), each layer, or all selected layers together")
    n: int = option(2, "nm: weights kept in every group")
    m: int = option(4, "nm: group size along the reduction axis")
    calibrated: bool = option(False, "score with calibration data: |w| * input channel norm (Wanda) for magnitude/nm; activation spread * ||W2 row|| for structured, with the removed units' mean moved into the next bias")
    update: bool = option(False, "calibrated: also re-fit the surviving weights to the calibration outputs (magnitude/nm: see solver; structured MLP: least-squares W2 rows)")
    solver: Literal["refit", "sparsegpt"] = option("refit", "update of magnitude/nm: refit = exact least squares of each output on its kept inputs (best measured, slower); sparsegpt = SparseGPT's one-pass update, mask chosen on the way")
    sequential: bool = option(False, "calibrated: calibrate each layer on the model pruned so far (one onnxruntime run per depth level instead of one in all; less accumulated error)")
    skip_padding: bool = option(True, "calibrated: leave out padding tokens (rows of [batch, sequence, ...] activations where a rank-2 0/1 input named '*mask*' is 0)")
    damping: float = option(0.1, "update: ridge added to the input second moment, as a fraction of its mean diagonal (0.1 measured best on MiniLM: 0.01 overfits the few calibration tokens)")
    min_size: int = option(4096, "layers whose weight has fewer parameters are left alone")
    include: tuple[str, ...] = option((), "only layers whose label (node name, else output name) or weight name contains one of these substrings (empty: all)")
    exclude: tuple[str, ...] = option((), "skip layers whose label (node name, else output name) or weight name contains one of these substrings")

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError("sparsity must be in (0, 1)")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise ValueError("nm needs 0 < n < m")
        if self.update and not self.calibrated:
            raise ValueError("update=true needs calibrated=true (the re-fit uses calibration data)")
        if self.sequential and not self.calibrated:
            raise ValueError("sequential=true needs calibrated=true")
        if self.sequential and self.scope == "global" and self.method == "magnitude":
            raise ValueError("sequential=true prunes layer by layer: use scope=output or scope=layer")
        if self.damping < 0.0:
            raise ValueError("damping must be >= 0")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")


# =====================================================================================================
# Graph helpers
# =====================================================================================================
def _is_plain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _selected(o: PruneOptions, texts: Sequence[str]) -> tuple[bool, bool]:
    """(included, excluded) by the include/exclude substrings over the node and weight names."""
    included = not o.include or any(sub in t for sub in o.include for t in texts if t)
    excluded = any(sub in t for sub in o.exclude for t in texts if t)
    return included, excluded


# -- layers of unstructured pruning ---------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    node: ir.Node
    label: str
    kind: str  # "MatMul" | "Gemm" | "Conv"
    array: np.ndarray  # the stored weight
    trans: bool  # Gemm transB: stored [N, K]
    x: ir.Value  # the activation input

    def matrix(self) -> np.ndarray:
        """The weight as [K, N]."""
        if self.kind == "Conv":
            return self.array.reshape(self.array.shape[0], -1).T
        return self.array.T if self.trans else self.array

    def stored(self, mat: np.ndarray) -> np.ndarray:
        if self.kind == "Conv":
            return mat.T.reshape(self.array.shape)
        return mat.T if self.trans else mat


def _classify_layer(node: ir.Node, min_size: int) -> tuple[np.ndarray, bool] | str:
    """(stored weight, transB) of a MatMul/Gemm/Conv with a float constant weight, or a skip reason ('' = silent)."""
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return ""
    weight = inputs[1]
    prod = weight.producer()
    if prod is not None and prod.op_type in _QUANT_OPS:
        return "already quantized (weight behind DequantizeLinear): run prune before qdq"
    if weight.is_graph_input():
        return "weight is a graph input (can be overridden at run time)" if weight.const_value is not None else ""
    tensor = ir.convenience.get_const_tensor(weight)
    if tensor is None:
        behind = prod is not None and prod.op_type == "Transpose" and const_array(prod.inputs[0]) is not None
        return "constant weight behind a Transpose (only weights read directly are pruned)" if behind else ""
    if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
        return ""
    array = tensor.numpy()
    if node.op_type == "Conv":
        if array.ndim < 3:
            return ""
        trans = False
    else:
        if array.ndim != 2:
            return ""
        trans = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 (not supported)"
    if array.size < min_size:
        return ""
    if len(weight.uses()) > 1 or weight.is_graph_output():
        return f"weight '{weight.name}' is shared with other nodes"
    return array, trans


# =====================================================================================================
# Structured blocks: W1 -> unit-wise ops -> W2
# =====================================================================================================
_UNARY = {
    "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign",
    "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Identity", "Celu", "ThresholdedRelu", "Sign",
    "Floor", "Ceil", "Round", "Cast", "Clip",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
_POOL = {"MaxPool", "AveragePool", "LpPool"}  # channel-wise: allowed in Conv blocks


@dataclasses.dataclass
class _Block:
    start: ir.Node  # MatMul/Gemm/Conv producing the hidden units
    label: str
    conv: bool
    units: int
    unit_from_right: int  # the unit axis counted from the right (-1 for MLPs, -(rank-1) for Conv)
    region: list[ir.Node]  # unit-wise nodes between start and the terminals, in graph order
    values: list[ir.Value]  # every value carrying units (start output, region outputs)
    act: ir.Value  # the value the terminals read
    terminals: list[ir.Node]
    w1: np.ndarray  # start weight as stored
    trans1: bool
    w2s: list[tuple[np.ndarray, bool]] = dataclasses.field(default_factory=list)  # terminal weights as stored, transB


def _unit_slice_ok(array: np.ndarray, units: int, unit_from_right: int) -> str:
    """'scalar', 'unit' (per-unit broadcast vector) or '' (would mix or misalign units)."""
    if array.size == 1:
        return "scalar"
    if array.ndim >= -unit_from_right and array.shape[unit_from_right] == units and array.size == units:
        return "unit"
    return ""


def _w_units(kind: str, array: np.ndarray, trans: bool, role: str) -> np.ndarray:
    """Per-unit slices of a weight as rows [units, -1]: role 'in' (start: units are outputs), 'out' (terminal)."""
    if kind == "Conv":
        return array.reshape(array.shape[0], -1) if role == "in" else np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
    mat = array.T if trans else array  # [K, N]
    return mat.T if role == "in" else mat


def _trace_block(start: ir.Node, label: str, min_size: int) -> _Block | str:
    kind = start.op_type
    found = _classify_layer(start, min_size)
    if isinstance(found, str):
        return found
    w1, trans1 = found
    conv = kind == "Conv"
    if conv and start.attributes.get_int("group", 1) != 1:
        return "grouped Conv (only group=1 channels are removed)"
    units = int(w1.shape[0]) if conv else int((w1.T if trans1 else w1).shape[1])
    unit_from_right = -(w1.ndim - 1) if conv else -1
    if len(start.outputs) != 1:
        return ""
    out0 = start.outputs[0]
    region: list[ir.Node] = []
    region_set: set[int] = set()
    values: list[ir.Value] = [out0]
    value_ids = {id(out0)}
    terminals: list[tuple[ir.Node, ir.Value]] = []
    queue = [out0]
    while queue:
        v = queue.pop(0)
        if v.is_graph_output():
            return f"'{v.name}' is a graph output"
        for user, index in v.uses():
            if id(user) in region_set or any(t is user for t, _ in terminals):
                continue
            op = user.op_type
            if not _is_plain(user):
                return f"{user.domain}::{op} '{user.name}' reads the units"
            term = _terminal(user, index, conv)
            if term:
                terminals.append((user, v))
                continue
            if op in _POOL and conv and index == 0 and len(user.outputs) == 1:
                pass
            elif op == "BatchNormalization" and conv and index == 0 and len(user.outputs) == 1:
                for j in range(1, 5):
                    p = const_array(user.inputs[j]) if j < len(user.inputs) else None
                    if p is None or p.shape != (units,):
                        return f"BatchNormalization '{user.name}' has non-constant or mis-shaped parameters"
            elif op in _UNARY or op in _BINARY:
                for j, inp in enumerate(user.inputs):
                    if inp is None or j == index:
                        continue
                    c = const_array(inp)
                    if c is None:
                        continue  # must be another unit value: checked below
                    if op in ("Clip",) and j > 0:
                        if c.size != 1:
                            return f"Clip '{user.name}' with non-scalar bounds"
                        continue
                    if not _unit_slice_ok(c, units, unit_from_right):
                        return f"{op} '{user.name}' mixes units with a constant of shape {list(c.shape)}"
                    if op == "PRelu" and c.size != 1 and c.ndim != -unit_from_right:
                        return f"PRelu '{user.name}' slope of shape {list(c.shape)}"
            else:
                reason = "reads the units" if index == 0 else f"reads the units as input {index}"
                return f"{op} '{user.name}' {reason}"
            region.append(user)
            region_set.add(id(user))
            for out in user.outputs:
                if id(out) not in value_ids:
                    values.append(out)
                    value_ids.add(id(out))
                    queue.append(out)
    if not terminals:
        return "no MatMul/Gemm/Conv with a constant weight reads the units"
    for node in region:  # every non-constant input of a region node must carry the units too
        for inp in node.inputs:
            if inp is not None and const_array(inp) is None and id(inp) not in value_ids:
                return f"{node.op_type} '{node.name}' combines the units with '{inp.name}', which comes from elsewhere"
    acts = {id(v): v for _, v in terminals}
    if len(acts) != 1:
        return "the units reach the next layers through different values"
    act = next(iter(acts.values()))
    order = {id(n): i for i, n in enumerate(start.graph)} if start.graph is not None else {}
    region.sort(key=lambda n: order.get(id(n), 0))
    block = _Block(start, label, conv, units, unit_from_right, region, values, act, [t for t, _ in terminals], w1, trans1)
    for t, _ in terminals:
        w2 = const_array(t.inputs[1])
        trans = t.op_type == "Gemm" and bool(t.attributes.get_int("transB", 0))
        rows = w2.shape[1] if t.op_type == "Conv" else (w2.T if trans else w2).shape[0]
        if rows != units:
            return f"{t.op_type} '{t.name}' reads {rows} units, not {units}"
        if len(t.inputs[1].uses()) > 1 or t.inputs[1].is_graph_output():
            return f"weight of '{t.name}' is shared with other nodes"
        block.w2s.append((w2, trans))
    return block


def _terminal(user: ir.Node, index: int, conv: bool) -> bool:
    """A layer that reduces over the units: MatMul/Gemm (for MLP blocks) or Conv group=1 (for Conv blocks)."""
    if index != 0 or len(user.inputs) < 2 or const_array(user.inputs[1]) is None:
        return False
    w = const_array(user.inputs[1])
    if conv:
        return user.op_type == "Conv" and user.attributes.get_int("group", 1) == 1 and w.ndim >= 3
    if user.op_type == "MatMul":
        return w.ndim == 2
    if user.op_type == "Gemm":
        return w.ndim == 2 and not user.attributes.get_int("transA", 0)
    return False


def _shrink_block(graph: ir.Graph, b: _Block, keep: np.ndarray, w2_new: list[np.ndarray] | None, shifts: list[np.ndarray] | None) -> None:
    """Slice every tensor along the unit axis to ``keep``; terminal weights become ``w2_new`` (rows per unit)."""
    kept = len(keep)
    s = b.start
    if b.conv:
        set_const(graph, s, 1, b.w1[keep], b.w1.dtype, "_pruned")
        if len(s.inputs) > 2 and s.inputs[2] is not None:
            set_const(graph, s, 2, const_array(s.inputs[2])[keep], b.w1.dtype, "_pruned")
    else:
        w1 = b.w1[keep] if b.trans1 else b.w1[:, keep]
        set_const(graph, s, 1, w1, b.w1.dtype, "_pruned")
        if s.op_type == "Gemm" and len(s.inputs) > 2 and s.inputs[2] is not None:
            c = const_array(s.inputs[2])
            if c is not None and c.size == b.units:
                set_const(graph, s, 2, np.take(c, keep, axis=c.ndim - 1), c.dtype, "_pruned")
            elif c is None or c.size != 1:
                raise ValueError(f"Gemm '{s.name}' bias does not match the units")
    for node in b.region:
        if node.op_type == "BatchNormalization":
            for j in range(1, 5):
                p = const_array(node.inputs[j])
                set_const(graph, node, j, p[keep], p.dtype, "_pruned")
            continue
        for j, inp in enumerate(node.inputs):
            if inp is None:
                continue
            c = const_array(inp)
            if c is None or c.size == 1:
                continue
            set_const(graph, node, j, np.take(c, keep, axis=c.ndim + b.unit_from_right), c.dtype, "_pruned")
    for t, (w2, trans), new in zip(b.terminals, b.w2s, w2_new or [None] * len(b.terminals)):
        if t.op_type == "Conv":
            rows = w2[:, keep] if new is None else new
        else:
            rows = (w2.T if trans else w2)[keep] if new is None else new
            rows = rows.T if trans else rows
        set_const(graph, t, 1, rows, w2.dtype, "_pruned")
    for v in b.values:
        if v.shape is None:
            continue
        dims = list(v.shape)
        axis = len(dims) + b.unit_from_right
        if 0 <= axis < len(dims) and dims[axis] == b.units:
            dims[axis] = kept
            v.shape = ir.Shape(dims)
    for t, delta in zip(b.terminals, shifts or []):
        if np.any(delta):
            add_bias(graph, t, delta, "prune")
    s.metadata_props[UNITS_MARK] = f"{b.units}->{kept}"
    for t in b.terminals:
        t.metadata_props[INPUTS_MARK] = f"{b.units}->{kept}"


# =====================================================================================================
# The pass
# =====================================================================================================
class Prune(Pass):
    """``prune``: pruning of MatMul, Gemm and Conv weights: unstructured, N:M, or structured (shapes shrink).

    ``method=magnitude`` zeroes the ``sparsity`` share of weights of lowest score in each comparison group
    (``scope``: output unit / layer / all layers); ``method=nm`` keeps at most ``n`` of every ``m``
    consecutive weights along the reduction axis (2:4). Scores are |w|, or |w| * ||x_k|| with
    ``calibrated=true`` (Wanda; one onnxruntime run over the calibration data gives the input norms of
    every layer); ``update=true`` also re-fits the surviving weights (SparseGPT). Shapes do not change;
    zeros only shrink the file after ``sparsify`` or a compressor.

    ``method=structured`` removes the ``sparsity`` share of the hidden units of every block
    ``W1 (MatMul/Gemm/Conv with constant weight) -> unit-wise ops -> W2 (MatMul/Gemm/Conv)``: the columns of
    W1 and its bias, the entries of per-unit constants and BatchNorm parameters in between, and the rows
    (input channels) of W2, so the layers really get smaller and faster. Unit-wise ops are elementwise
    activations (Relu, Gelu, Erf-based GELU, x*Sigmoid(x), ...) with scalar or per-unit constants, BatchNorm
    and pooling (Conv blocks). Anything else reading the units (a Reshape, a residual Add, a graph output)
    makes the block unsafe: it is skipped with the reason. Attention heads are not removed.

    Applies to float weights stored as constants (not behind DequantizeLinear: prune before ``qdq``), of at
    least ``min_size`` parameters, not shared with other nodes; embedding tables (Gather) are never pruned.
    Idempotent: a layer already at the requested sparsity or N:M pattern, or a block already pruned
    (node metadata ``onnxpress.prune``), is left alone. Lossy: each layer reports its sparsity before and
    after, parameters, the relative weight error and (calibrated) the relative output error on the
    calibration inputs.
    """

    name = "prune"
    Options = PruneOptions
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.options.method == "structured":
            return ir.passes.PassResult(model, self._structured(model))
        return ir.passes.PassResult(model, self._unstructured(model))

    # -- unstructured and N:M ------------------------------------------------------------------------
    def _skipped(self, node: ir.Node, label: str, found: object, excluded: bool) -> bool:
        """Whether a candidate is left alone: its classifier gave a reason (a str; '' = silently) or the
        exclude option names it. Each reason gets a report row."""
        reason = found if isinstance(found, str) else ("excluded by option" if excluded else None)
        if reason:
            self.details.append({"layer": label, "op": node.op_type, "skipped": reason})
        return reason is not None

    def _candidates(self, model: ir.Model) -> Iterator[tuple[ir.Node, str, bool]]:
        """(node, label, excluded) of every plain MatMul/Gemm/Conv the include option selects."""
        for index, node in enumerate(model.graph):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or not _is_plain(node):
                continue
            label = node_label(node, index)
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            included, excluded = _selected(self.options, [label, weight.name if weight is not None else ""])
            if included:
                yield node, label, excluded

    def _layers(self, model: ir.Model) -> list[_Layer]:
        o = self.options
        out: list[_Layer] = []
        for node, label, excluded in self._candidates(model):
            found = _classify_layer(node, o.min_size)
            if self._skipped(node, label, found, excluded):
                continue
            array, trans = found
            out.append(_Layer(node, label, node.op_type, array, trans, node.inputs[0]))
        return out

    def _unstructured(self, model: ir.Model) -> bool:
        o = self.options
        layers = self._layers(model)
        todo: list[_Layer] = []
        for layer in layers:
            mat = layer.matrix()
            done = nm_holds(mat, o.n, o.m) if o.method == "nm" else zero_fraction(mat) >= o.sparsity - 1e-9
            if done and not (o.scope == "global" and o.method == "magnitude"):
                self.details.append({"layer": layer.label, "op": layer.kind, "skipped": "already at the requested sparsity" if o.method == "magnitude" else f"already {o.n}:{o.m} sparse"})
                continue
            todo.append(layer)
        if o.scope == "global" and o.method == "magnitude" and todo:
            total = sum(layer.array.size for layer in todo)
            zeros = sum(int(np.count_nonzero(layer.array == 0)) for layer in todo)
            if zeros >= o.sparsity * total - 1e-9:
                self.details.append({"layer": "(all)", "skipped": "already at the requested sparsity"})
                return False
        if not todo:
            return False
        waves = _waves(todo) if (o.calibrated and o.sequential) else [todo]
        modified = False
        for wave in waves:
            modified = self._prune_layers(model, wave) or modified
        return modified

    def _prune_layers(self, model: ir.Model, todo: list[_Layer]) -> bool:
        o = self.options
        stats = self._input_stats(model, todo) if o.calibrated else {}
        mats = [layer.matrix().astype(np.float64) for layer in todo]
        scores = []
        for layer, mat in zip(todo, mats):
            st = stats.get(layer.x.name)
            scores.append(wanda_scores(mat, _channel_norms(layer, st)) if st is not None else np.abs(mat))
        if o.method == "nm":
            masks = [nm_mask(s, o.n, o.m) for s in scores]
        elif o.scope == "global":
            masks = global_keep_masks(scores, o.sparsity)
        else:
            masks = [keep_mask(s, o.sparsity, per_output=o.scope == "output") for s in scores]
        modified = False
        for layer, mat, mask in zip(todo, mats, masks):
            st = stats.get(layer.x.name)
            use_update = o.update and layer.kind != "Conv"
            if use_update and o.solver == "refit":
                new = np.where(mask, refit_columns(mat, st["gram"], mask & (mat != 0), o.damping), 0.0)
            elif use_update:  # the mask is chosen during the update, except for layer/global comparison groups
                fixed = mask if (o.method == "magnitude" and o.scope != "output") else None
                new, mask = sparsegpt(mat, st["gram"], o.sparsity, n=o.n if o.method == "nm" else 0, m=o.m, mask=fixed, damping=o.damping)
            else:
                new = np.where(mask, mat, 0.0)
            row = self._row(layer, mat, new, st)
            if o.update and layer.kind == "Conv":
                row["note"] = "update not done for Conv (mask only)"
            self.details.append(row)
            if np.array_equal(new, mat):
                continue
            set_const(model.graph, layer.node, 1, layer.stored(new), layer.array.dtype, "_pruned")
            modified = True
        return modified

    def _row(self, layer: _Layer, before: np.ndarray, after: np.ndarray, st: dict[str, Any] | None) -> dict[str, Any]:
        k, n = before.shape
        diff = after - before
        norm = float(np.linalg.norm(before))
        row: dict[str, Any] = {
            "layer": layer.label, "op": layer.kind, "K": k, "N": n,
            "sparsity_before": round(zero_fraction(before), 6), "sparsity_after": round(zero_fraction(after), 6),
            "params": int(before.size), "nonzeros_after": int(np.count_nonzero(after)),
            "weight_error": round(float(np.linalg.norm(diff)) / norm, 6) if norm else 0.0,
        }
        if st is not None and "gram" in st:
            row["output_error"] = round(qm.relative_output_error(before, after, st["gram"]), 6)
        return row

    def _input_stats(self, model: ir.Model, layers: Sequence[_Layer | _Block]) -> dict[str, dict[str, Any]]:
        """Per captured value: sum of squares per channel (Wanda), and for MatMul/Gemm inputs the second
        moment X^T X / n (SparseGPT, output errors). One onnxruntime run over all calibration batches."""
        feeds = check_calibration(model, self.context.calibration, "prune(calibrated=true)")
        from onnxpress import runtime

        channel_axis: dict[str, int | None] = {}  # None: last axis (rows flattened); int: Conv channel axis
        full: dict[str, bool] = {}
        for item in layers:
            if isinstance(item, _Layer):
                channel_axis[item.x.name] = 1 if item.kind == "Conv" else None
                full[item.x.name] = item.kind != "Conv"
            else:
                channel_axis[item.act.name] = 1 if item.conv else None
                full[item.act.name] = not item.conv and self.options.update
        stats: dict[str, dict[str, Any]] = {}
        for feed, values in zip(feeds, runtime.capture(model, feeds, sorted(channel_axis))):
            mask = _padding_mask(feed) if self.options.skip_padding else None
            for name, axis in channel_axis.items():
                x = np.asarray(values[name], np.float64)
                if axis is None and mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    rows = x[mask]  # the tokens the model attends to; padding rows do not count
                else:
                    rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if axis == 1 else x.reshape(-1, x.shape[-1])
                st = stats.setdefault(name, {"sq": 0.0, "sum": 0.0, "count": 0})
                st["sq"] = st["sq"] + np.einsum("ij,ij->j", rows, rows)
                st["sum"] = st["sum"] + rows.sum(axis=0)
                st["count"] += rows.shape[0]
                if full[name]:
                    st["xtx"] = st.get("xtx", 0.0) + rows.T @ rows
        for st in stats.values():
            count = max(st["count"], 1)
            st["mean"] = st["sum"] / count
            st["var"] = np.maximum(st["sq"] / count - st["mean"] ** 2, 0.0)
            if "xtx" in st:
                st["gram"] = st.pop("xtx") / count
        return stats

    # -- structured --------------------------------------------------------------------------------------
    def _structured(self, model: ir.Model) -> bool:
        o = self.options
        blocks: list[_Block] = []
        for node, label, excluded in self._candidates(model):
            if UNITS_MARK in node.metadata_props:
                self.details.append({"layer": label, "op": node.op_type, "skipped": "already pruned (structured)"})
                continue
            found = _trace_block(node, label, o.min_size)
            if self._skipped(node, label, found, excluded):
                continue
            if any(INPUTS_MARK in t.metadata_props for t in found.terminals):
                self.details.append({"layer": label, "op": node.op_type, "skipped": "the next layer was already pruned (structured)"})
                continue
            blocks.append(found)
        if not blocks:
            return False
        stats = self._input_stats(model, blocks) if o.calibrated else {}
        modified = False
        for first in blocks:
            # Re-read the weights: a layer can end one block and start the next (Conv -> Conv -> Conv).
            b = _trace_block(first.start, first.label, o.min_size)
            assert isinstance(b, _Block), b
            remove = units_to_remove(b.units, o.sparsity)
            if remove == 0:
                self.details.append({"layer": b.label, "op": b.start.op_type, "skipped": f"{b.units} units: {o.sparsity} of them rounds to none"})
                continue
            out_rows = [_w_units(t.op_type, w2, trans, "out") for t, (w2, trans) in zip(b.terminals, b.w2s)]
            out_norms = np.sqrt(sum(np.sum(r.astype(np.float64) ** 2, axis=1) for r in out_rows))
            st = stats.get(b.act.name)
            if st is None:
                in_norms = np.linalg.norm(_w_units(b.start.op_type, b.w1, b.trans1, "in").astype(np.float64), axis=1)
                for node in b.region:
                    if node.op_type == "BatchNormalization":
                        scale, var = const_array(node.inputs[1]), const_array(node.inputs[4])
                        eps = node.attributes.get_float("epsilon", 1e-5)
                        in_norms = in_norms * np.abs(scale) / np.sqrt(var + eps)
                scores = unit_scores(in_norms, out_norms)
            else:
                scores = unit_scores(None, out_norms, np.sqrt(st["var"]))
            keep = keep_units(scores, remove)
            removed = np.setdiff1d(np.arange(b.units), keep)
            w2_new: list[np.ndarray] | None = None
            shift = None
            row: dict[str, Any] = {
                "layer": b.label, "op": b.start.op_type, "next": ", ".join(t.name or t.op_type for t in b.terminals),
                "units_before": b.units, "units_after": int(len(keep)),
                "params_before": int(b.w1.size + sum(w.size for w, _ in b.w2s)),
            }
            if st is not None:
                if o.update and not b.conv and len(b.terminals) == 1:
                    cov = st["gram"] - np.outer(st["mean"], st["mean"])
                    refit, delta = refit_rows(out_rows[0], keep, cov, st["mean"], o.damping)
                    w2_new, shift = [refit], [delta]
                else:  # each next layer takes the removed units' mean contribution into its bias
                    shift = [_mean_shift(t, rows, removed, st["mean"]) for t, rows in zip(b.terminals, out_rows)]
                row["output_error"] = round(_removal_error(st, out_rows[0], keep, removed, None if w2_new is None else w2_new[0]), 6)
            _shrink_block(model.graph, b, keep, w2_new, shift)
            row["params_after"] = int(len(keep) * (b.w1.size // b.units) + sum((w.size // b.units) * len(keep) for w, _ in b.w2s))
            self.details.append(row)
            modified = True
        return modified


def _padding_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The boolean [batch, sequence] attention mask of a transformer feed (an input named like '*mask*' of
    rank 2 with 0/1 values), or None."""
    for name, array in feed.items():
        a = np.asarray(array)
        if "mask" in name.lower() and a.ndim == 2 and a.dtype.kind in "biuf" and np.all((a == 0) | (a == 1)):
            return a.astype(bool)
    return None


def _waves(layers: list[_Layer]) -> list[list[_Layer]]:
    """Layers grouped by depth: a layer's wave comes after the waves of every selected layer its input
    depends on, so each wave can be calibrated on the outputs of the model pruned so far."""
    index = {id(layer.node): i for i, layer in enumerate(layers)}
    memo: dict[int, frozenset[int]] = {}

    def upstream(value: ir.Value | None) -> frozenset[int]:
        """Selected layers that ``value`` depends on (iterative DFS over producers)."""
        if value is None:
            return frozenset()
        found: set[int] = set()
        stack, seen = [value], set()
        while stack:
            v = stack.pop()
            prod = v.producer()
            if prod is None or id(prod) in seen:
                continue
            seen.add(id(prod))
            if id(prod) in memo:
                found |= memo[id(prod)]
                continue
            if id(prod) in index:
                found.add(index[id(prod)])
            stack.extend(i for i in prod.inputs if i is not None)
        return frozenset(found)

    level: dict[int, int] = {}
    for i, layer in enumerate(layers):  # graph order: producers come first
        ups = upstream(layer.x)
        memo[id(layer.node)] = ups | {i}
        level[i] = 1 + max((level[u] for u in ups if u in level), default=-1)
    waves: dict[int, list[_Layer]] = {}
    for i, layer in enumerate(layers):
        waves.setdefault(level[i], []).append(layer)
    return [waves[k] for k in sorted(waves)]


def _channel_norms(layer: _Layer, st: dict[str, Any] | None) -> np.ndarray:
    """Sum of squares of each row k of the [K, N] weight's input (Conv: the channel's, for every kernel tap)."""
    sq = np.asarray(st["sq"], np.float64)
    if layer.kind == "Conv":
        taps = int(np.prod(layer.array.shape[2:]))
        return np.repeat(sq, taps)
    return sq


def _mean_shift(t: ir.Node, rows: np.ndarray, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The bias shift of next layer ``t`` ([D], Conv: [C2]; at Conv borders with padding it is approximate)."""
    if t.op_type != "Conv":
        return mean_shift(rows, removed, mean)
    c2 = const_array(t.inputs[1]).shape[0]
    return mean_shift(rows.reshape(rows.shape[0], c2, -1).sum(axis=2), removed, mean)


def _removal_error(st: dict[str, Any], w2: np.ndarray, keep: np.ndarray, removed: np.ndarray, refit: np.ndarray | None) -> float:
    """Relative output error of the next layer on the calibration data (after the mean shift): from the
    full activation covariance when captured (MLP with update), else from its diagonal (an estimate)."""
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
