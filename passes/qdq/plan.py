"""The ``qdq`` plan: activation scales and SmoothQuant/AWQ factors, each target's quantized weight (int8 per
channel, int4 blocks, embedding tables; GPTQ where a Hessian is known), bias correction and the per-layer
error report. Pure numpy over the calibration statistics; ``rewrite`` turns a plan into graph nodes."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import blas_threads
from onnxpress.passes.qdq.calibration import ActStats, collect_stats, statistics_wanted
from onnxpress.passes.qdq.cpu import resolved_weight_type
from onnxpress.passes.qdq.options import SMOOTH_ALPHAS, QdqOptions
from onnxpress.passes.qdq.targets import Target, bias_of, indexed_rows, is_float_initializer, rebind_tied, weight_matrix

# What GPTQ gets for a layer input: ``gptq_inverse``'s (factor, dead inputs), or the Hessian with its factor
GptqFactor = tuple[np.ndarray, np.ndarray] | qm.HessianFactor


@dataclasses.dataclass
class ActParams:
    """How one activation is quantized (scale, zero point) and/or scaled (SmoothQuant or AWQ factors), and where."""

    name: str
    scale: float
    zero_point: int
    smooth: np.ndarray | None  # per last-axis channel divisor: x / s is what gets quantized
    consumers: list[tuple[int, int]]  # (target index, input index)
    # the MatMul/Gemm target whose weight columns and bias carry the 1/s (no Mul at run time; see _fold_producer)
    fold_into: int | None = None
    # restricted plans only: the producer is rewritten but not this activation's consumers, so x * s restores x
    compensate: bool = False
    # False: AWQ scaling only (int4): x / s feeds the consumers in float, no QuantizeLinear
    quantize: bool = True
    # AWQ: the initializers (a normalization's scale, and bias if any) that carry 1/s, by name (copies keep names)
    fold_norm: tuple[str, ...] | None = None


@dataclasses.dataclass
class WeightParams:
    """One target's quantized weight: codes, scales and zero points as ``rewrite`` stores them."""

    target: int
    kind: str  # int8, int4, gather8, gather4, gather_split, tied4
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class Plan:
    """Everything ``rewrite.apply_plan`` writes, with the per-layer report rows (``row_targets``: their target index)."""

    acts: list[ActParams]
    weights: list[WeightParams]
    targets: dict[int, Target]
    rows: list[dict[str, Any]]
    row_targets: list[int | None]
    bias_shifts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # target index -> added to its float bias

    def restrict(self, index: int, nodes: Sequence[ir.Node]) -> Plan:
        """The same plan for one target only, rebound to the nodes of a copy of the model."""
        t = self.targets[index]
        node = nodes[index]
        rebound = dataclasses.replace(t, node=node, weight=node.inputs[t.weight_input] if t.weight is not None else None)
        if t.kind == "tied":  # the head may read the table through a Transpose
            rebound = rebind_tied(t, node)
        acts = []
        for a in self.acts:
            consumers = [c for c in a.consumers if c[0] == index]
            if consumers:  # the producer a fold would scale is not rewritten here: use the Mul
                # a norm weight scaled for fewer consumers than all would mis-scale the others: Mul instead
                norm = a.fold_norm if len(consumers) == len(a.consumers) else None
                acts.append(dataclasses.replace(a, consumers=consumers, fold_into=a.fold_into if a.fold_into == index else None, fold_norm=norm))
            elif a.fold_into == index:  # this layer's outputs carry 1/s for consumers not rewritten here
                acts.append(dataclasses.replace(a, consumers=[], compensate=True))
        shifts = {index: self.bias_shifts[index]} if index in self.bias_shifts else {}
        return Plan(acts, [w for w in self.weights if w.target == index], {index: rebound}, [], [], shifts)


class LayerWeights:
    """Each target's float weight as the plan sees it: the model's initializer (``weight_matrix``: [K, N] for
    MatMul/Gemm/tied targets) with the SmoothQuant/AWQ factors decided so far applied in the order they were
    decided: ``scale_rows`` (the layer's input channels carry ``s``) and ``divide_columns`` (a producer whose
    outputs carry ``1/s``). Computed on each request instead of stored: SmolLM2-135M's scaled copies (0.42 GB)
    were all alive from the AWQ search to the end of the plan. ``done`` unmaps a finished target's external data."""

    def __init__(self, targets: list[Target]) -> None:
        self._targets = {t.index: t for t in targets if t.weight is not None}
        self._factors: dict[int, list[tuple[bool, np.ndarray]]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._targets

    def __getitem__(self, index: int) -> np.ndarray:
        t = self._targets[index]
        w = weight_matrix(t) if t.kind in ("matmul", "gemm", "tied") else t.weight.const_value.numpy()
        for rows, s in self._factors.get(index, ()):
            w = w * s[:, None] if rows else w / s[None, :]
        if index in self._factors:  # a copy: the initializer's mapped pages can go
            self._unmap(t)
        return w

    def scale_rows(self, index: int, s: np.ndarray) -> None:
        self._factors.setdefault(index, []).append((True, s))

    def divide_columns(self, index: int, s: np.ndarray) -> None:
        self._factors.setdefault(index, []).append((False, s))

    def done(self, index: int) -> None:
        """The target's weight is planned: forget it and unmap its external data (a large model's weights are
        then never all resident at once; 1 GB scale point: qdq peak 1.81 -> 0.92 GB)."""
        t = self._targets.pop(index, None)
        self._factors.pop(index, None)
        if t is not None:
            self._unmap(t)

    @staticmethod
    def _unmap(t: Target) -> None:
        if isinstance(t.weight.const_value, ir.ExternalTensor):
            with contextlib.suppress(BufferError):  # an array still views it: it stays mapped
                t.weight.const_value.release()


def _plan_weight(t: Target, w: np.ndarray, o: QdqOptions, stats: dict, hessians: set[str], smooth_of: dict[str, np.ndarray],
                 hinv_cache: dict[tuple[str, int], GptqFactor], embeddings: str, hot: dict[int, np.ndarray], row: dict[str, Any]) -> WeightParams:
    """One target's quantized weight (embedding table, int4 blocks or int8 per channel; GPTQ with the layer
    input's Hessian when there is one); fills the layer's report ``row``."""
    qmax_w = 63 if o.reduce_range else 127
    if t.kind == "gather":
        wp = _quantize_table(t, w, embeddings, o, hot.get(t.index))
        if wp.kind == "gather_split":
            row["embedding_split"] = {
                "hot_rows": int(wp.arrays["hot_ids"].size), "cold_rows": int(wp.arrays["cold_ids"].size),
                "hot_bits": 4, "hot_block": o.embedding_block_size, "cold_bits": 2, "cold_block": o.embedding_cold_block_size,
            }
    else:
        act_name = t.node.inputs[0].name
        block = o.embedding_block_size if t.kind == "tied" else o.block_size
        h = None
        if act_name in hessians and t.kind in ("matmul", "gemm", "tied"):
            h = _gptq_factor(stats[act_name], act_name, block, o, smooth_of, hinv_cache)
        method = o.weight_method if (o.weight_method != "gptq" or h is not None) else "mse"
        clip = "none" if method == "rtn" else "mse"
        row["method"] = method
        if o.mode == "int4":
            codes, scales, zps = qm.quantize_blockwise(
                w, block, 4, o.int4_symmetric, clip=clip, hessian=h if method == "gptq" else None, damp=o.gptq_damp, signed=o.int4_signed
            )
            wp = WeightParams(t.index, "tied4" if t.kind == "tied" else "int4", {"codes": codes, "scales": scales, "zero_points": zps})
            row["block_size"] = block
            if t.tied is not None:
                row["tied"] = t.tied.describe()
        else:
            axis = t.axis if o.per_channel else None
            if method == "gptq":
                q, scale = qm.gptq_per_channel(w, h, qmax_w, per_channel=o.per_channel)
            else:
                q, scale = qm.quantize_weight(w, (t.axis if t.kind == "conv" else 1) if o.per_channel else None, qmax_w, clip)
            if t.kind == "gemm" and t.in_axis == 1:
                q = q.T.copy()  # back to the node's [N, K] layout
            wp = WeightParams(t.index, "int8", {"q": q, "scale": scale, "axis": np.array(-1 if axis is None else axis)})
            row["weight_type"] = resolved_weight_type(o)
    return wp


def _gptq_factor(st: ActStats, name: str, block: int, o: QdqOptions, smooth_of: dict[str, np.ndarray],
                 cache: dict[tuple[str, int], GptqFactor]) -> GptqFactor | None:
    """GPTQ's inverse factor of the layer input ``name`` (``quant_math.gptq_inverse``; ``hessian_factor`` when act
    order or the scale refit need the Hessian itself), made once per input and block size; None without a Hessian.
    AWQ/SmoothQuant factors ``s`` rescale it: the layer sees ``x / s``."""
    key = (name, block)
    if key not in cache:
        h = st.hessian
        if h is None:
            return None
        if name in smooth_of:
            inv = 1.0 / smooth_of[name].astype(np.float64)
            h = h * np.outer(inv, inv)
        pad = (-h.shape[0]) % block if o.mode == "int4" else 0
        if pad:
            h = np.pad(h, ((0, pad), (0, pad)))
        if o.mode == "int4" and (o.gptq_act_order or o.gptq_refit):  # the Hessian itself is needed: keep it with the factor
            cache[key] = qm.hessian_factor(h, o.gptq_act_order, o.gptq_damp)
        else:
            cache[key] = qm.gptq_inverse(h, o.gptq_damp)
    return cache[key]


def make_plan(model: ir.Model, targets: list[Target], o: QdqOptions, feeds) -> Plan:
    """The plan for ``targets``: calibration statistics, activation parameters and SmoothQuant/AWQ factors, then
    each target's quantized weight and report row (BLAS on one thread: see ``calib_stats.blas_threads``)."""
    with blas_threads(1):
        return _make_plan(model, targets, o, feeds)


def _make_plan(model: ir.Model, targets: list[Target], o: QdqOptions, feeds) -> Plan:
    by_index = {t.index: t for t in targets}
    consumers, act_values, kinds, hessians = statistics_wanted(targets, o, feeds)
    # int4 uses its row sample only for the layer-error report (1024 rows) and AWQ's search (512): SmolLM2-135M's
    # 121 MatMul inputs x 4096 rows were 1.6 GB of a 3.7 GB peak. Its X^T X are kept in float32 (each batch's
    # product is a float32 matmul already), upper triangles only (calib_stats.GramSum): 0.23 of 0.63 GB.
    int4 = o.mode == "int4"
    rows = min(o.calibration_rows, 1024) if int4 else o.calibration_rows
    stats = collect_stats(model, feeds, kinds, rows, hessians, hessian_dtype=np.float32 if int4 else np.float64) if (feeds and kinds) else {}
    weights = LayerWeights(targets)
    smooth_of: dict[str, np.ndarray] = {}
    acts, act_rows = _plan_activations(consumers, act_values, stats, weights, smooth_of, targets, o)
    awq_rows: dict[int, dict[str, Any]] = {}
    if o.awq and int4 and stats:
        acts.extend(awq_plan(targets, stats, weights, smooth_of, awq_rows, o))
    plan = Plan(acts, [], by_index, [], [])
    embeddings = o.embeddings if o.embeddings != "auto" else ("int4" if int4 else "int8")
    hot = indexed_rows(model, [t for t in targets if t.kind == "gather"], feeds) if (o.embedding_split and embeddings == "int4" and feeds) else {}
    # A layer input's statistics go after its last reader is planned, with its GPTQ factors: on SmolLM2 all of
    # them (0.6 GB, and 0.8 GB of factors) stayed until the lm_head, the largest layer, was planned.
    last_reader = {t.node.inputs[0].name: t.index for t in targets if t.kind in ("matmul", "gemm", "tied") and t.node.inputs[0].name in stats}
    hinv_cache: dict[tuple[str, int], GptqFactor] = {}
    for t in targets:
        row: dict[str, Any] = {"layer": t.label, "op": t.node.op_type}
        if t.weight is not None:
            w = weights[t.index]
            orig = t.weight.const_value
            row.update({"weight": t.weight.name, "shape": list(orig.shape.numpy()), "bytes_before": int(orig.nbytes)})
            wp = _plan_weight(t, w, o, stats, hessians, smooth_of, hinv_cache, embeddings, hot, row)
            plan.weights.append(wp)
            deq = _dequantized(wp, t, o)
            row["bytes_after"] = _stored_bytes(wp, o)
            row["scale"] = _summary(wp.arrays.get("scale", wp.arrays.get("scales", wp.arrays.get("hot_scales"))))
            if wp.kind == "int8" and t.kind == "gemm" and t.in_axis == 1:
                deq = deq.T
            row["weight_rel_error"] = round(qm.relative_error(deq, w), 6)
            w = None
        for i in t.acts:
            name = t.node.inputs[i].name
            row.setdefault("activations", {})[name] = act_rows[name]
        if t.index in awq_rows:
            row["awq"] = awq_rows[t.index]
        if t.kind in ("matmul", "gemm", "tied") and t.node.inputs[0].name in stats:
            shift = None
            if o.bias_correction and t.acts and bias_of(t) is not None:
                shift = _bias_shift(t, stats, deq, acts, o)
                plan.bias_shifts[t.index] = shift
            row.update(_layer_error(t, stats, deq, acts, o, shift))
        plan.rows.append(row)
        plan.row_targets.append(t.index)
        deq = None
        weights.done(t.index)
        name = t.node.inputs[0].name if t.node.inputs and t.node.inputs[0] is not None else None
        if name is not None and last_reader.get(name) == t.index:
            del stats[name]
            for key in [k for k in hinv_cache if k[0] == name]:
                del hinv_cache[key]
    return plan


def _plan_activations(consumers: dict[str, list[tuple[int, int]]], act_values: dict[str, ir.Value], stats: dict[str, ActStats], weights: LayerWeights,
                      smooth_of: dict[str, np.ndarray], targets: list[Target], o: QdqOptions) -> tuple[list[ActParams], dict[str, dict[str, Any]]]:
    """Static mode: each quantized activation's scale and zero point, with SmoothQuant where it helps (its factors
    go into ``weights`` and ``smooth_of``, the ``1/s`` into a producer layer where one can take it); the report
    rows by activation name."""
    by_index = {t.index: t for t in targets}
    target_of = {id(t.node): t for t in targets}
    qmax_w = 63 if o.reduce_range else 127
    a_qmin, a_qmax = qm.QRANGES[o.activation_type]
    acts: list[ActParams] = []
    act_rows: dict[str, dict[str, Any]] = {}
    for name, cs in consumers.items():
        st = stats[name]
        smoothable = [by_index[c[0]] for c in cs]
        smooth = None
        if o.smooth != "off" and all(t.kind in ("matmul", "gemm") and c[1] == 0 for t, c in zip(smoothable, cs)):
            alphas = SMOOTH_ALPHAS if o.smooth == "auto" else (o.smooth_alpha,)
            smooth = _choose_smoothing(
                st, [weights[t.index] for t in smoothable], alphas, o.calibrate, o.percentile, (a_qmin, a_qmax), qmax_w, o.smooth_min_gain
            )
            if smooth is not None:
                smooth_of[name] = smooth
                for t in smoothable:
                    weights.scale_rows(t.index, smooth)
        fold_into = None
        if smooth is not None:
            producer = _fold_producer(act_values[name], len(cs), target_of)
            if producer is not None and producer.index in weights and all(c[0] != producer.index for c in cs):
                weights.divide_columns(producer.index, smooth)
                fold_into = producer.index
        lo, hi, clipped = _act_range(st, smooth, o.calibrate, o.percentile, a_qmin, a_qmax)
        scale, zp = qm.affine_params(lo, hi, a_qmin, a_qmax)
        acts.append(ActParams(name, float(scale), int(zp), smooth, cs, fold_into))
        act_rows[name] = {
            "scale": float(scale), "zero_point": int(zp), "range": [round(lo, 6), round(hi, 6)], "clipped_fraction": clipped,
            "smooth": None if smooth is None else {
                "max": float(smooth.max()), "min": float(smooth.min()), "folded_into": None if fold_into is None else by_index[fold_into].label,
            },
        }
    return acts, act_rows


def _stored_bytes(wp: WeightParams, o: QdqOptions) -> int:
    """Bytes the rewritten weight takes in the saved model (codes packed as written)."""
    a = wp.arrays
    if wp.kind == "gather_split":
        rows, dim = a["remap"].size, a["hot_codes"].shape[1]
        return qm.split_rows_bytes(rows, dim, a["hot_ids"].size, o.embedding_block_size, o.embedding_cold_block_size, o.int4_symmetric)
    codes = int(np.ceil(a["codes"].size / 2)) if wp.kind in ("int4", "gather4", "tied4") else 0
    return int(sum(v.nbytes for k, v in a.items() if k not in ("axis", "codes")) + codes)


def _summary(scale: np.ndarray | None) -> dict[str, float] | None:
    if scale is None:
        return None
    s = np.asarray(scale, dtype=np.float64)
    return {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()), "count": int(s.size)}


def _act_range(st: ActStats, smooth: np.ndarray | None, method: str, percentile: float, qmin: int, qmax: int) -> tuple[float, float, float]:
    sample = st.sample if smooth is None else st.sample / smooth
    cmin = st.chan_min if smooth is None else st.chan_min / smooth
    cmax = st.chan_max if smooth is None else st.chan_max / smooth
    gmin, gmax = float(cmin.min()), float(cmax.max())
    if method == "minmax":
        lo, hi = gmin, gmax
    else:
        lo, hi = qm.activation_range(sample, method, qmin, qmax, percentile)
        lo, hi = max(lo, gmin), min(hi, gmax)
    return lo, hi, round(qm.clipped_fraction(sample, lo, hi), 8)


def _choose_smoothing(st: ActStats, mats: list[np.ndarray], alphas, method, percentile, arange, qmax_w, min_gain: float = 1.0) -> np.ndarray | None:
    """SmoothQuant factors for the alpha (from ``alphas``) with the lowest simulated output error; None if 0 wins,
    or if the best alpha does not divide the error of alpha 0 (when tried) by at least ``min_gain``.

    Ranges and factors are fitted on half of the calibration sample and the error is measured on the other
    half: smoothing brings every channel close to the clip range, so in-sample error would favour it unfairly.
    """
    w_absmax = np.max([np.abs(w).max(axis=1) for w in mats], axis=0)
    x = st.sample[: min(len(st.sample), 2048)]
    fit, held = (x[0::2], x[1::2]) if len(x) >= 64 else (x, x)
    fit_stats = ActStats(chan_min=fit.min(axis=0), chan_max=fit.max(axis=0), sample=fit)
    fit_absmax = np.maximum(np.abs(fit_stats.chan_min), np.abs(fit_stats.chan_max))
    refs = [held @ w for w in mats]
    best_alpha, best_err, plain_err = 0.0, np.inf, None
    for alpha in alphas:
        s = qm.smooth_factors(fit_absmax, w_absmax, alpha) if alpha > 0 else None
        fake = _fake_quant_acts(fit_stats, s, held, method, percentile, *arange)
        err = 0.0
        for w, ref in zip(mats, refs):
            ws = w if s is None else w * s[:, None]
            q, scale = qm.quantize_weight(ws, 1, qmax_w)
            err += qm.relative_error(fake @ qm.dequantize(q, scale[None, :]), ref) ** 2
        if alpha == 0:
            plain_err = err
        if err < best_err:
            best_alpha, best_err = alpha, err
    if best_alpha == 0:
        return None
    if plain_err is not None and best_err * min_gain**2 > plain_err:  # errors are squared: gain = sqrt(plain / best)
        return None
    return qm.smooth_factors(np.maximum(np.abs(st.chan_min), np.abs(st.chan_max)), w_absmax, best_alpha)


def _fake_quant_acts(st: ActStats, smooth, x, method, percentile, qmin, qmax) -> np.ndarray:
    lo, hi, _ = _act_range(st, smooth, method, percentile, qmin, qmax)
    scale, zp = qm.affine_params(lo, hi, qmin, qmax)
    xs = x if smooth is None else x / smooth
    return qm.fake_quant(xs, scale, zp, qmin, qmax)


def _layer_error(t: Target, stats, wq: np.ndarray, acts: list[ActParams], o: QdqOptions, shift: np.ndarray | None = None) -> dict[str, float]:
    """Output error of this layer alone on the calibration sample: quantized (+ bias shift) vs float product.
    ``wq``: the dequantized weight in the layer's [K, N] layout."""
    # at most ~4M output values: an lm_head's 49152 columns x 1024 rows were 0.8 GB of float64 copies in cosine()
    out, ref = _layer_outputs(t, stats, wq, acts, o, rows=max(64, min(1024, (1 << 22) // max(1, wq.shape[1]))))
    result = {"output_rel_error": round(qm.relative_error(out, ref), 6), "output_cosine": round(qm.cosine(out, ref), 6)}
    if shift is not None:
        out = out + shift
        result.update({"output_rel_error_before_bias_correction": result["output_rel_error"], "output_rel_error": round(qm.relative_error(out, ref), 6)})
        result["output_cosine"] = round(qm.cosine(out, ref), 6)
    return result


def _bias_shift(t: Target, stats, wq: np.ndarray, acts: list[ActParams], o: QdqOptions) -> np.ndarray:
    """Mean output error of the quantized layer over the calibration sample (float minus quantized), per output channel.

    Quantization errors that do not average out (clipping, rounding against channels with a non-zero mean, such
    as LayerNorm outliers) shift every output by the same amount; adding the mean back to the float bias
    removes that part exactly (bias correction, Nagel et al. 2019).
    """
    out, ref = _layer_outputs(t, stats, wq, acts, o, rows=None)
    return (ref - out).mean(axis=0).astype(np.float32)


def _layer_outputs(t: Target, stats, wq: np.ndarray, acts: list[ActParams], o: QdqOptions, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    st = stats[t.node.inputs[0].name]
    x = st.sample if rows is None else st.sample[: min(len(st.sample), rows)]
    ref = x @ weight_matrix(t)
    act = next((a for a in acts if (t.index, 0) in a.consumers), None)
    if act is not None:
        qmin, qmax = qm.QRANGES[o.activation_type]
        xs = x if act.smooth is None else x / act.smooth
        xq = qm.fake_quant(xs, act.scale, act.zero_point, qmin, qmax) if act.quantize else xs
    else:
        xq = x
    out = xq @ wq
    fold = next((a for a in acts if a.fold_into == t.index), None)
    if fold is not None:  # the weight columns carry a consumer's 1/s: compare in the float model's units
        out = out * fold.smooth
    return out, ref


def _dequantized(wp: WeightParams, t: Target, o: QdqOptions) -> np.ndarray:
    a = wp.arrays
    if wp.kind == "int8":
        axis = int(a["axis"])
        return qm.dequantize(a["q"], qm.per_axis_shape(a["scale"], a["q"].ndim, None if axis < 0 else axis))
    if wp.kind == "gather8":
        return qm.dequantize(a["q"], a["scale"])
    if wp.kind == "gather_split":
        return qm.dequantize_split_rows(a, o.embedding_block_size, o.embedding_cold_block_size)
    if wp.kind in ("int4", "gather4", "tied4"):
        codes, scales, zps = a["codes"], a["scales"], a["zero_points"]
        if wp.kind == "gather4":  # [V, D] blocks along D
            return qm.dequantize_rows_blockwise(codes, scales, zps, o.embedding_block_size)
        if wp.kind == "tied4":  # [H, V]: the head's layout, blocks along H = the table's rows
            return qm.dequantize_blockwise(codes, scales, zps, o.embedding_block_size)
        return qm.dequantize_blockwise(codes, scales, zps, o.block_size)
    raise AssertionError(wp.kind)


def _quantize_table(t: Target, w: np.ndarray, embeddings: str, o: QdqOptions, hot: np.ndarray | None = None) -> WeightParams:
    rows = w.shape[0]
    if embeddings == "int4" and hot is not None and 0 < hot.size < rows:
        # Frequency split: the rows the data uses keep 4 bits, the never-seen rest (most of a vocabulary) get 2
        clip = "none" if o.weight_method == "rtn" else "mse"
        arrays = qm.quantize_split_rows(w, hot, o.embedding_block_size, o.embedding_cold_block_size, o.int4_symmetric, clip, signed=o.int4_signed)
        return WeightParams(t.index, "gather_split", arrays)
    if embeddings == "int4":
        codes, scales, zps = qm.quantize_rows_blockwise(
            w, o.embedding_block_size, 4, o.int4_symmetric, "none" if o.weight_method == "rtn" else "mse", signed=o.int4_signed
        )
        return WeightParams(t.index, "gather4", {"codes": codes, "scales": scales, "zero_points": zps})
    q, scale = qm.quantize_weight(w, 0, 127, "none" if o.weight_method == "rtn" else "mse")
    return WeightParams(t.index, "gather8", {"q": q, "scale": scale.reshape(-1, 1)})


# -- SmoothQuant folded into the producing layer ------------------------------------------------------
# f(x / s) = f(x) / s channel by channel for every s > 0: a SmoothQuant 1/s can move in front of these
_POSITIVE_HOMOGENEOUS = {"Relu", "LeakyRelu"}


def _fold_producer(x: ir.Value, n_consumers: int, target_of: dict[int, Target]) -> Target | None:
    """The MatMul/Gemm target whose output channels reach ``x`` unmixed, or None.

    ``x`` must be used only by the ``n_consumers`` smoothed layers, and the path back to the producer may pass
    only the producer's own bias Add and Relu/LeakyRelu, each value on it used once. SmoothQuant's ``1/s`` then
    goes into the producer's weight columns and bias instead of a ``Mul`` at run time, which also keeps
    ``Relu -> QuantizeLinear`` next to each other: ORT drops that Relu and fuses the Gemm into QGemm, where the
    Mul in between left a float FusedGemm (Gemm + Relu) that dequantizes its weight on every run.
    """
    if x.is_graph_output() or len(x.uses()) != n_consumers:
        return None
    v = x
    while True:
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in _POSITIVE_HOMOGENEOUS:
            v = node.inputs[0]
        elif node.op_type == "Add":
            for operand in node.inputs:
                t = target_of.get(id(operand.producer())) if operand is not None and operand.producer() is not None else None
                if t is not None and t.kind == "matmul" and t.weight is not None and bias_of(t) is not None:
                    return t
            return None
        else:
            t = target_of.get(id(node))
            if t is None or t.kind not in ("matmul", "gemm") or t.weight is None:
                return None
            if t.kind == "gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and bias_of(t) is None:
                return None
            return t
        if v is None or v.is_graph_output() or len(v.uses()) != 1:
            return None


# -- AWQ: activation-aware scaling of int4 weights ----------------------------------------------------
# normalizations whose output is linear in their scale (and bias) input: op type -> (scale index, bias index or -1)
_NORM_SCALE = {
    "SimplifiedLayerNormalization": (1, -1), "SkipSimplifiedLayerNormalization": (2, -1), "RMSNormalization": (1, -1),
    "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3),
}
# The alpha search multiplies this many calibration rows by this many columns of each weight, 11 times: on
# SmolLM2 (30 layers) 1024 rows x all columns added 177 s to a 179 s GPTQ build; 512 x 512 keep it to seconds per layer.
AWQ_SEARCH_ROWS = 512
AWQ_SEARCH_COLUMNS = 512


def awq_plan(targets: list[Target], stats, weights: LayerWeights, smooth_of: dict[str, np.ndarray], awq_rows: dict[int, dict[str, Any]], o: QdqOptions) -> list[ActParams]:
    """AWQ factors for the input of each group of int4 MatMul/Gemm targets that read the same activation.

    Searched by ``quant_math.awq_search`` on the calibration sample; where a factor helps, the group's weight
    rows are multiplied by it here (``weights``: ``LayerWeights``, so GPTQ/MSE then round the scaled weights, and GPTQ's
    Hessian is rescaled through ``smooth_of``), and ``1/s`` goes into the producer: a normalization's scale
    (and bias), a MatMul/Gemm target's weight columns (also through a SwiGLU ``Mul``), else a ``Mul``.
    Returns scaling-only activations (``quantize=False``) for ``apply_plan``; ``awq_rows`` gets each target's report.
    """
    groups: dict[str, list[Target]] = {}
    for t in targets:
        if t.kind in ("matmul", "gemm") and t.weight is not None:
            groups.setdefault(t.node.inputs[0].name, []).append(t)
    target_of = {id(t.node): t for t in targets}
    result: list[ActParams] = []
    for name, group in groups.items():
        st = stats.get(name)
        if st is None or st.sample is None or len(st.sample) == 0:
            continue
        s, alpha, errors = qm.awq_search(
            st.sample[:AWQ_SEARCH_ROWS], [weights[t.index] for t in group], o.block_size, 4, o.int4_symmetric, max_columns=AWQ_SEARCH_COLUMNS,
            signed=o.int4_signed,
        )
        info: dict[str, Any] = {"alpha": alpha, "error_vs_plain": round(errors[alpha] / errors[0.0], 4) if errors[0.0] > 0 else 1.0}
        if s is None:
            for t in group:
                awq_rows[t.index] = {**info, "folded_into": None}
            continue
        producer, norm, where = _awq_fold(group[0].node.inputs[0], group, target_of)
        for t in group:
            weights.scale_rows(t.index, s)
        if producer is not None:
            weights.divide_columns(producer.index, s)
        smooth_of[name] = s
        result.append(ActParams(name, 0.0, 0, s, [(t.index, 0) for t in group], producer.index if producer else None, quantize=False, fold_norm=norm))
        for t in group:
            awq_rows[t.index] = {**info, "folded_into": where}
    return result


def _awq_fold(x: ir.Value, group: list[Target], target_of: dict[int, Target]) -> tuple[Target | None, tuple[str, ...] | None, str]:
    """Where AWQ's ``1/s`` on ``x`` goes: (producer target whose columns take it, names of a normalization's
    scale and bias initializers, description); both None: a ``Mul`` before the group."""
    members = {t.index for t in group}
    node = x.producer()
    if node is None or x.is_graph_output() or len(x.uses()) != len(group):
        return None, None, "Mul"
    producer = _fold_producer(x, len(group), target_of)
    if producer is not None and producer.index not in members:
        return producer, None, producer.label
    k = weight_matrix(group[0]).shape[0]
    if node.op_type in _NORM_SCALE and node.outputs[0] is x:
        gi, bi = _NORM_SCALE[node.op_type]
        gamma = node.inputs[gi] if len(node.inputs) > gi else None
        beta = node.inputs[bi] if 0 <= bi < len(node.inputs) else None

        def own(v: ir.Value | None) -> bool:
            return is_float_initializer(v) and tuple(v.const_value.shape) == (k,) and len(v.uses()) == 1

        if own(gamma) and (beta is None or own(beta)):
            return None, tuple(v.name for v in (gamma, beta) if v is not None), f"{node.op_type} scale '{gamma.name}'"
    if node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
        # SwiGLU's act(gate) * up: dividing up's output columns by s divides the product
        for operand in node.inputs:
            if operand is None or operand.is_graph_output() or len(operand.uses()) != 1:
                continue
            p = _fold_producer(operand, 1, target_of)
            if p is not None and p.index not in members:
                return p, None, p.label
    return None, None, "Mul"
