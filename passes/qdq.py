"""The ``qdq`` pass: int8 / int4 quantization in QDQ form (QuantizeLinear/DequantizeLinear) for ONNX Runtime.

The maths (scales, zero points, clip searches, SmoothQuant factors, GPTQ) lives in ``quant_math`` as pure
numpy functions; this module picks what to quantize, calibrates, and rewrites the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxpress.errors import UsageError
from onnxpress.pass_infra import Pass, option
from onnxpress.passes import quant_math as qm
from onnxpress.passes.graph_utils import node_label

_FLOAT = ir.DataType.FLOAT
_QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized",
    "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
}
_MS = "com.microsoft"
# 0.85 and 0.95: on MiniLM 20 of 24 activations picked 0.75 when it was the largest alpha tried (the search sat on its edge).
SMOOTH_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.95)


@dataclasses.dataclass(frozen=True)
class QdqOptions:
    mode: Literal["static", "weight", "int4"] = option(
        "static", "static: int8 weights and activations (needs calibration data); weight: int8 weights only; int4: block-wise 4-bit weights"
    )
    per_channel: bool = option(True, "int8 weights: one scale per output channel (false: one per tensor)")
    activation_type: Literal["uint8", "int8"] = option("uint8", "static: integer type of activations (asymmetric; uint8 is ORT's fast CPU path)")
    calibrate: Literal["minmax", "percentile", "entropy", "mse"] = option("minmax", "static: how activation clip ranges are chosen")
    percentile: float = option(99.999, "calibrate=percentile: percent of calibration values kept inside the range")
    smooth: Literal["auto", "fixed", "off"] = option(
        "auto", "static: SmoothQuant (move activation outlier channels into the weights); auto searches alpha per tensor"
    )
    smooth_alpha: float = option(0.5, "smooth=fixed: migration strength alpha in [0, 1]")
    smooth_min_gain: float = option(
        1.0,
        "smooth=auto: keep SmoothQuant for an activation only where it divides the layer's simulated output error by at "
        "least this factor (1: wherever it helps; each kept one costs a Mul at run time unless folded into its producer)",
    )
    weight_method: Literal["rtn", "mse", "gptq"] = option(
        "gptq", "weights: round-to-nearest, MSE clip search per channel/block, or GPTQ error compensation (needs calibration data; else mse)"
    )
    weight_type: Literal["auto", "int8", "uint8"] = option(
        "auto",
        "8-bit weight storage: int8 (ORT's u8s8 kernels, the fast ones), or uint8 with zero point 128 (u8u8 kernels: no int16 "
        "saturation on x86 CPUs without VNNI, but ~1.7x slower GEMMs on CPUs with it); auto: int8 unless the CPU running the pass is x86 without VNNI",
    )
    reduce_range: bool = option(False, "int8 weights in 7 bits (the other way to avoid u8s8 saturation on AVX2 CPUs without VNNI)")
    quantize_activations_of: tuple[str, ...] = option(
        (), "static: op types whose float activation inputs are also quantized (MatMul: attention activation x activation matmuls; also Add, Softmax, ...)"
    )
    embeddings: Literal["auto", "int8", "int4", "float"] = option("auto", "Gather of embedding tables (auto: int4 in int4 mode, else int8 per row)")
    block_size: int = option(32, "int4: block size along K (power of 2, >= 16)")
    embedding_block_size: int = option(64, "int4 embeddings: block size along the embedding dimension (power of 2, >= 16)")
    int4_format: Literal["matmulnbits", "qdq"] = option(
        "matmulnbits", "int4: com.microsoft MatMulNBits/GatherBlockQuantized (ORT CPU/GPU kernels) or standard DequantizeLinear(block_size) (opset 21)"
    )
    int4_symmetric: bool = option(False, "int4: symmetric blocks (no zero points)")
    embedding_split: bool = option(
        False,
        "int4 embeddings: rows the calibration data indexes keep int4 (embedding_block_size), all others 2-bit "
        "(embedding_cold_block_size); needs calibration data and int4_format=matmulnbits",
    )
    embedding_cold_block_size: int = option(128, "embedding_split: block size of the 2-bit rows (power of 2, >= 16)")
    accuracy_level: int = option(
        4,
        "int4 MatMulNBits accuracy_level, the least accurate compute ORT may use: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 (the input is quantized per block to int8). ORT CPU takes the least accurate level it has a kernel for at "
        "or above the one given: on x86 1-3 run as fp32, 4 as int8. Default 4: SmolLM2-135M decodes 3.5x faster than at 0 "
        "(26.4 vs 7.6 tok/s, 2 threads, AVX2) for +0.5% perplexity",
    )
    awq: bool = option(
        False,
        "int4: activation-aware scaling (AWQ): per input channel factors searched on the calibration activations "
        "(needs calibration data), folded into the producing norm's weight or MatMul where possible, else a Mul; "
        "combines with weight_method (gptq/mse/rtn rounds the scaled weights)",
    )
    include: tuple[str, ...] = option(
        (), "node names or op types to quantize, all others left in float (empty: every eligible node); exclude still wins"
    )
    exclude: tuple[str, ...] = option((), "node names or op types left in float")
    weight_only: tuple[str, ...] = option(
        (), "static: node names or op types whose input activations stay float (int8 weights only), for layers the error report shows are sensitive"
    )
    bias_correction: bool = option(
        True, "static: add to each layer's float bias the mean output error its quantization causes on the calibration sample"
    )
    calibration_rows: int = option(4096, "rows (tokens / pixels) per activation sampled for clip searches and layer errors")
    report_errors: bool = option(False, "measure in ORT the model-output cosine caused by each quantized layer alone (one run per layer)")

    def validate(self) -> None:
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError("smooth_alpha must be in [0, 1]")
        if not self.smooth_min_gain >= 1.0:
            raise ValueError("smooth_min_gain must be >= 1")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (0, 100]")
        for key in ("block_size", "embedding_block_size", "embedding_cold_block_size"):
            size = getattr(self, key)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{key} must be a power of 2 and >= 16")
        if self.calibration_rows < 16:
            raise ValueError("calibration_rows must be >= 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy_level must be 0..4")
        if self.embedding_split:
            if self.int4_format != "matmulnbits":
                raise ValueError("embedding_split needs int4_format=matmulnbits (2-bit rows are GatherBlockQuantized bits=2)")
            if not (self.embeddings == "int4" or (self.embeddings == "auto" and self.mode == "int4")):
                raise ValueError("embedding_split applies to int4 embeddings: use mode=int4 or embeddings=int4")


@dataclasses.dataclass
class _Target:
    """One node to quantize: a weight input (initializer) and/or activation inputs."""

    index: int  # position in graph order (stable across copies of the model)
    node: ir.Node
    kind: str  # matmul, gemm, conv, gather, act
    weight: ir.Value | None = None
    weight_input: int = 1
    axis: int = 1  # per-channel (output channel) axis of the weight
    in_axis: int = 0  # input-channel axis of the weight (SmoothQuant)
    acts: tuple[int, ...] = ()  # input indices of activations to quantize
    tied: _Tied | None = None  # kind "tied": the table's Gather and head uses

    @property
    def label(self) -> str:
        return node_label(self.node, self.index)


@dataclasses.dataclass
class _ActStats:
    chan_min: np.ndarray | None = None
    chan_max: np.ndarray | None = None
    sample: np.ndarray | None = None
    keys: np.ndarray | None = None
    hessian: np.ndarray | None = None
    rows: int = 0


class Qdq(Pass):
    """``qdq``: quantize MatMul, Gemm, Conv weights (and activations in static mode) and embedding Gathers.

    Rewrites (ORT fuses each pattern into an integer kernel at load time):
    - static: ``x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- int8 W`` (ORT CPU:
      MatMulIntegerToFloat, u8s8 with int8 weights). Activations get calibrated per-tensor ranges
      (minmax/percentile/entropy/MSE); SmoothQuant moves outlier channels of an activation into the weights
      through one ``Mul(x, 1/s)`` before the QuantizeLinear (a per-channel QuantizeLinear would save the node
      but ORT's CPU kernel for it is 6-8x slower on MiniLM), or, where ``x`` comes from a MatMul/Gemm through
      only its bias Add and Relu/LeakyRelu, by dividing that layer's weight columns and bias (no node at all).
      Gemm biases become int32 at ``a_scale * w_scale`` (ORT fuses DQ -> Gemm into QGemm only when every input
      is dequantized). Bias correction adds each layer's mean output error
      on the calibration sample to its float bias. Only the inputs of MatMul/Gemm/Conv are quantized by
      default: Softmax, LayerNormalization, residual Add, GELU and attention's activation x activation
      MatMuls stay float (``quantize_activations_of`` adds them); ``weight_only`` keeps chosen layers' inputs
      float, ``include``/``exclude`` choose the layers.
    - weight: int8 per-channel weights behind DequantizeLinear (ORT CPU fuses DQ+MatMul into MatMulNBits).
    - int4: block-wise 4-bit weights of MatMul and Gemm (GPTQ with calibration data, else MSE clip search)
      as com.microsoft MatMulNBits (Gemm: alpha folded into the scales, beta * C added after) or standard
      DequantizeLinear with ``block_size`` (opset 21; Gemm transB=1 gets its blocks along axis 1).
    - embeddings (Gather of a constant table by indices): int8 per row (Gather + Cast + Mul, standard ops) or
      int4 GatherBlockQuantized.
    Applies to float32 initializer weights; a weight already behind DequantizeLinear is skipped (so a second
    run changes nothing). Lossy: each layer reports its scale, clipped fraction and output error on the
    calibration sample (``report_errors`` adds the model-output cosine of each layer quantized alone).
    """

    name = "qdq"
    Options = QdqOptions
    lossless = False
    min_opset = lambda o: 21 if (o.mode == "int4" and o.int4_format == "qdq") else 13  # noqa: E731 - per-axis DequantizeLinear: 13; block_size: 21

    # -- entry ---------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        if o.mode == "static" and o.quantize_activations_of:
            _infer_types(model)
        targets, skipped = find_targets(model, o)
        self.details.extend(skipped)
        if not targets:
            if not skipped:
                self.details.append({"layer": "(model)", "skipped": "no float MatMul/Gemm/Conv/Gather weights to quantize"})
            return ir.passes.PassResult(model, False)
        feeds = self._feeds(model)
        reference = None
        if o.report_errors and feeds:
            from onnxpress import runtime

            # a copy that keeps where external data lives: sessions of it open from any working directory
            reference = runtime.copy_model(model)
        plan = make_plan(model, targets, o, feeds)
        apply_plan(model, plan, o)
        self.details.extend(row for row in plan.rows)
        if reference is not None:
            self._report_errors(reference, plan, feeds)
        return ir.passes.PassResult(model, True)

    def _feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]] | None:
        feeds = self.context.calibration
        o = self.options
        needs = o.mode == "static" or o.report_errors or o.embedding_split or (o.awq and o.mode == "int4")
        if not feeds:
            if o.mode == "static":
                raise UsageError("qdq(mode=static) needs calibration data: pass --calibration PATH (CLI) or calibration= (API), or use mode=weight")
            if o.embedding_split:
                raise UsageError("qdq(embedding_split=true) needs calibration data (it keeps the rows the data uses at 4 bits): pass --calibration PATH or calibration=")
            if o.report_errors:
                raise UsageError("qdq(report_errors=true) needs calibration data: pass --calibration PATH or calibration=")
            if o.awq and o.mode == "int4":
                raise UsageError("qdq(awq=true) needs calibration data (it scales weights by their inputs' magnitudes): pass --calibration PATH or calibration=")
            return None
        from onnxpress.data import check_feeds

        for i, feed in enumerate(feeds):
            check_feeds(feed, model, where=f"calibration batch {i}")
        return feeds if (needs or o.weight_method == "gptq") else None

    def _report_errors(self, reference, plan: _Plan, feeds) -> None:
        from onnxpress import runtime

        feeds = feeds[:4]
        ref_session = runtime.make_session(reference)
        names = [o.name for o in ref_session.get_outputs()]
        expected = [runtime.run(ref_session, f, names) for f in feeds]
        for row, target_index in zip(plan.rows, plan.row_targets):
            if target_index is None:
                continue
            single = runtime.copy_model(reference)
            nodes = list(single.graph)
            sub = plan.restrict(target_index, nodes)
            apply_plan(single, sub, self.options)
            session = runtime.make_session(single)
            cos = min(
                qm.cosine(runtime.run(session, f, names)[n], e[n]) for f, e in zip(feeds, expected) for n in names if e[n].dtype.kind == "f"
            )
            row["model_cosine_alone"] = round(cos, 6)


# -- finding what to quantize -------------------------------------------------------------------------
def _infer_types(model: ir.Model) -> None:
    """Fill in value types (needed to know which inputs of arbitrary ops are float)."""
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - best effort: values without a type are then left alone
        pass


def _is_float_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None and value.dtype == _FLOAT and not value.is_graph_input()


def _from_dq(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type in _QUANT_OPS


def find_targets(model: ir.Model, o: QdqOptions) -> tuple[list[_Target], list[dict[str, Any]]]:
    targets: list[_Target] = []
    skipped: list[dict[str, Any]] = []
    excluded = set(o.exclude)
    included = set(o.include)
    embeddings = o.embeddings if o.embeddings != "auto" else ("int4" if o.mode == "int4" else "int8")
    extra_ops = set(o.quantize_activations_of) if o.mode == "static" else set()
    for index, node in enumerate(model.graph):
        label = node_label(node, index)
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        if op not in ("MatMul", "Gemm", "Conv", "Gather") and op not in extra_ops:
            continue
        if label in excluded or op in excluded:
            skipped.append({"layer": label, "op": op, "skipped": "excluded by option"})
            continue
        t = _classify(index, node, o, embeddings, extra_ops)
        if isinstance(t, str):
            if t:
                skipped.append({"layer": label, "op": op, "skipped": t})
            continue
        # include is checked after classification so only nodes that could have been quantized get a row.
        if included and label not in included and op not in included:
            skipped.append({"layer": label, "op": op, "skipped": "not in include"})
            continue
        targets.append(t)
    # A weight shared with a node we do not rewrite would have to stay float as well: skip those.
    wanted: dict[str, list[_Target]] = {}
    for t in targets:
        if t.weight is not None:
            wanted.setdefault(t.weight.name, []).append(t)
    keep = []
    tied_done: set[str] = set()
    for t in targets:
        if t.weight is not None and t.weight.name in tied_done:
            continue  # another use of a table already quantized once for all its uses
        if t.weight is not None:
            group = wanted[t.weight.name]
            users = {id(u.node) for u in t.weight.uses()}
            if users != {id(g.node) for g in group} or len({(g.kind, g.axis) for g in group}) != 1 or t.weight.is_graph_output():
                # An embedding table that is also the lm_head (tied): quantized once, read by both (int4 only)
                tied = tied_target(model, t.weight, o, embeddings) if o.mode == "int4" else None
                if isinstance(tied, _Target):
                    if t.weight.name not in tied_done:
                        tied_done.add(t.weight.name)
                        keep.append(tied)
                    continue
                why = f" ({tied})" if isinstance(tied, str) else ""
                skipped.append({"layer": t.label, "op": t.node.op_type, "skipped": f"weight '{t.weight.name}' is shared with other uses{why}"})
                continue
        keep.append(t)
    return keep, skipped


def _classify(index: int, node: ir.Node, o: QdqOptions, embeddings: str, extra_ops: set[str]) -> _Target | str:
    op = node.op_type
    inputs = list(node.inputs)
    if op == "Gather":
        if embeddings == "float" or len(inputs) < 2:
            return ""
        data, idx = inputs[0], inputs[1]
        if _from_dq(data):
            return "already quantized (table behind DequantizeLinear)"
        if not _is_float_initializer(data) or idx is None or idx.const_value is not None:
            return ""
        shape = data.const_value.shape
        if len(shape) != 2 or shape[1] < 2 or node.attributes.get_int("axis", 0) != 0:
            return ""
        if embeddings == "int4" and shape[1] % 2:
            return "int4 embeddings need an even row length"
        return _Target(index, node, "gather", data, 0, axis=0, in_axis=1)
    if op in ("MatMul", "Gemm", "Conv"):
        w_index = 1
        w = inputs[1] if len(inputs) > 1 else None
        if _from_dq(w):
            return "already quantized (weight behind DequantizeLinear)"
        if _is_float_initializer(w):
            if o.mode == "int4" and op == "Conv":
                return "int4 covers MatMul and Gemm only (Conv left float)"
            shape = w.const_value.shape
            act = inputs[0]
            if act is None or act.const_value is not None or (act.dtype is not None and act.dtype != _FLOAT):
                return "activation is not a float tensor"
            float_input = node.name in o.weight_only or op in o.weight_only
            acts = (0,) if o.mode == "static" and not _from_dq(act) and not float_input else ()
            if op == "MatMul":
                if len(shape) != 2:
                    return f"weight of rank {len(shape)} (MatMul weights of rank 2 only)"
                return _Target(index, node, "matmul", w, w_index, axis=1, in_axis=0, acts=acts)
            if op == "Gemm":
                if node.attributes.get_int("transA", 0):
                    return "Gemm with transA=1"
                trans_b = node.attributes.get_int("transB", 0)
                return _Target(index, node, "gemm", w, w_index, axis=0 if trans_b else 1, in_axis=1 if trans_b else 0, acts=acts)
            if o.mode == "int4":
                return ""
            return _Target(index, node, "conv", w, w_index, axis=0, in_axis=1, acts=acts)
        if op == "MatMul" and "MatMul" in extra_ops:
            acts = tuple(i for i in (0, 1) if inputs[i] is not None and inputs[i].dtype == _FLOAT and not _from_dq(inputs[i]))
            return _Target(index, node, "act", acts=acts) if acts else ""
        if op == "MatMul" and o.mode == "static" and w is not None and w.const_value is None:
            return ""  # activation x activation: float unless asked
        return ""
    # other op types listed in quantize_activations_of
    acts = tuple(
        i for i, v in enumerate(inputs) if v is not None and v.const_value is None and v.dtype == _FLOAT and not _from_dq(v)
    )
    return _Target(index, node, "act", acts=acts) if acts else ""


# -- planning: calibration, SmoothQuant, scales ------------------------------------------------------
@dataclasses.dataclass
class _ActParams:
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
class _WeightParams:
    target: int
    kind: str  # int8, int4, gather8, gather4
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class _Plan:
    acts: list[_ActParams]
    weights: list[_WeightParams]
    targets: dict[int, _Target]
    rows: list[dict[str, Any]]
    row_targets: list[int | None]
    bias_shifts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # target index -> added to its float bias

    def restrict(self, index: int, nodes: Sequence[ir.Node]) -> _Plan:
        """The same plan for one target only, rebound to the nodes of a copy of the model."""
        t = self.targets[index]
        node = nodes[index]
        rebound = dataclasses.replace(t, node=node, weight=node.inputs[t.weight_input] if t.weight is not None else None)
        if t.kind == "tied":  # the head may read the table through a Transpose
            rebound = _rebind_tied(t, node)
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
        return _Plan(acts, [w for w in self.weights if w.target == index], {index: rebound}, [], [], shifts)


def _channel_rows(array: np.ndarray, kind: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if kind == "conv" and a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def collect_stats(
    model: ir.Model, feeds, kinds: dict[str, str], rows: int, hessians: set[str], seed: int = 0, hessian_dtype: Any = np.float64
) -> dict[str, _ActStats]:
    """One ORT pass over the calibration feeds: per-channel min/max, a row sample and X^T X (for GPTQ)."""
    from onnxpress import runtime

    rng = np.random.default_rng(seed)
    stats = {name: _ActStats() for name in kinds}
    for out in runtime.capture(model, feeds, list(kinds)):
        for name, st in stats.items():
            x = _channel_rows(out[name], kinds[name])
            lo, hi = x.min(axis=0), x.max(axis=0)
            st.chan_min = lo if st.chan_min is None else np.minimum(st.chan_min, lo)
            st.chan_max = hi if st.chan_max is None else np.maximum(st.chan_max, hi)
            keys = rng.random(len(x))
            sample = x if st.sample is None else np.concatenate([st.sample, x])
            all_keys = keys if st.keys is None else np.concatenate([st.keys, keys])
            if len(sample) > rows:
                keep = np.argpartition(all_keys, rows)[:rows]
                sample, all_keys = sample[keep], all_keys[keep]
            st.sample, st.keys = sample, all_keys
            st.rows += len(x)
            if name in hessians:
                h = (x.T @ x).astype(hessian_dtype)
                if st.hessian is None:
                    st.hessian = h
                else:
                    st.hessian += h
    return stats


def _weight_matrix(t: _Target) -> np.ndarray:
    """The weight as [K_in, N_out] (MatMul layout) for MatMul/Gemm targets; a tied table as the head's [H, V]."""
    w = t.weight.const_value.numpy()
    if t.kind == "tied":
        return w if t.tied.table_is_transposed else w.T
    return w.T if (t.kind == "gemm" and t.in_axis == 1) else w


def _statistics_wanted(targets: list[_Target], o: QdqOptions, feeds) -> tuple[dict[str, list[tuple[int, int]]], dict[str, ir.Value], dict[str, str], set[str]]:
    """Which activations the plan needs statistics of: each quantized activation and its consumers (target
    index, input index), how to sample it (conv channels or rows), and the MatMul inputs GPTQ needs a Hessian of."""
    by_index = {t.index: t for t in targets}
    consumers: dict[str, list[tuple[int, int]]] = {}
    act_values: dict[str, ir.Value] = {}
    for t in targets:
        for i in t.acts:
            v = t.node.inputs[i]
            consumers.setdefault(v.name, []).append((t.index, i))
            act_values[v.name] = v
    kinds = {name: ("conv" if any(by_index[c[0]].kind == "conv" for c in cs) else "rows") for name, cs in consumers.items()}
    hessians: set[str] = set()
    if o.weight_method == "gptq" and feeds:
        for t in targets:
            if t.kind in ("matmul", "gemm", "tied"):
                a = t.node.inputs[0]
                kinds.setdefault(a.name, "rows")
                hessians.add(a.name)
    if o.awq and o.mode == "int4" and feeds:  # AWQ searches its factors on each MatMul input's row sample
        for t in targets:
            if t.kind in ("matmul", "gemm"):
                kinds.setdefault(t.node.inputs[0].name, "rows")
    return consumers, act_values, kinds, hessians


def _plan_weight(t: _Target, w: np.ndarray, o: QdqOptions, stats: dict, hessians: set[str], smooth_of: dict[str, np.ndarray],
                 hinv_cache: dict[str, tuple[np.ndarray, np.ndarray]], embeddings: str, hot: dict[int, np.ndarray], row: dict[str, Any]) -> _WeightParams:
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
        h = stats[act_name].hessian if act_name in hessians and t.kind in ("matmul", "gemm", "tied") else None
        if h is not None:
            key = f"{act_name}/{block}"
            if key not in hinv_cache:
                if act_name in smooth_of:  # the layer sees x / s
                    inv = 1.0 / smooth_of[act_name].astype(np.float64)
                    h = h * np.outer(inv, inv)
                pad = (-h.shape[0]) % block if o.mode == "int4" else 0
                if pad:
                    h = np.pad(h, ((0, pad), (0, pad)))
                hinv_cache[key] = qm.gptq_inverse(h)
            h = hinv_cache[key]
        method = o.weight_method if (o.weight_method != "gptq" or h is not None) else "mse"
        clip = "none" if method == "rtn" else "mse"
        row["method"] = method
        if o.mode == "int4":
            codes, scales, zps = qm.quantize_blockwise(w, block, 4, o.int4_symmetric, clip=clip, hessian=h if method == "gptq" else None)
            wp = _WeightParams(t.index, "tied4" if t.kind == "tied" else "int4", {"codes": codes, "scales": scales, "zero_points": zps})
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
            wp = _WeightParams(t.index, "int8", {"q": q, "scale": scale, "axis": np.array(-1 if axis is None else axis)})
            row["weight_type"] = resolved_weight_type(o)
    return wp


def make_plan(model: ir.Model, targets: list[_Target], o: QdqOptions, feeds) -> _Plan:
    by_index = {t.index: t for t in targets}
    qmax_w = 63 if o.reduce_range else 127
    a_qmin, a_qmax = qm.QRANGES[o.activation_type]
    consumers, act_values, kinds, hessians = _statistics_wanted(targets, o, feeds)
    # int4 uses its row sample only for the layer-error report (1024 rows) and AWQ's search (512): SmolLM2-135M's
    # 121 MatMul inputs x 4096 rows were 1.6 GB of a 3.7 GB peak. Its X^T X are kept in float32 (each batch's
    # product is a float32 matmul already): 0.4 of 0.8 GB.
    int4 = o.mode == "int4"
    rows = min(o.calibration_rows, 1024) if int4 else o.calibration_rows
    stats = collect_stats(model, feeds, kinds, rows, hessians, hessian_dtype=np.float32 if int4 else np.float64) if (feeds and kinds) else {}

    weights = {t.index: _weight_matrix(t) if t.kind in ("matmul", "gemm", "tied") else t.weight.const_value.numpy() for t in targets if t.weight is not None}
    rows: list[dict[str, Any]] = []
    row_targets: list[int | None] = []
    acts: list[_ActParams] = []
    act_rows: dict[str, dict[str, Any]] = {}
    smooth_of: dict[str, np.ndarray] = {}
    hinv_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    target_of = {id(t.node): t for t in targets}
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
                    weights[t.index] = weights[t.index] * smooth[:, None]
        fold_into = None
        if smooth is not None:
            producer = _fold_producer(act_values[name], len(cs), target_of)
            if producer is not None and producer.index in weights and all(c[0] != producer.index for c in cs):
                weights[producer.index] = weights[producer.index] / smooth[None, :]
                fold_into = producer.index
        lo, hi, clipped = _act_range(st, smooth, o.calibrate, o.percentile, a_qmin, a_qmax)
        scale, zp = qm.affine_params(lo, hi, a_qmin, a_qmax)
        acts.append(_ActParams(name, float(scale), int(zp), smooth, cs, fold_into))
        act_rows[name] = {
            "scale": float(scale), "zero_point": int(zp), "range": [round(lo, 6), round(hi, 6)], "clipped_fraction": clipped,
            "smooth": None if smooth is None else {
                "max": float(smooth.max()), "min": float(smooth.min()), "folded_into": None if fold_into is None else by_index[fold_into].label,
            },
        }
    awq_rows: dict[int, dict[str, Any]] = {}
    if o.awq and o.mode == "int4" and stats:
        acts.extend(awq_plan(targets, stats, weights, smooth_of, awq_rows, o))
    plan_weights: list[_WeightParams] = []
    bias_shifts: dict[int, np.ndarray] = {}
    embeddings = o.embeddings if o.embeddings != "auto" else ("int4" if o.mode == "int4" else "int8")
    hot = indexed_rows(model, [t for t in targets if t.kind == "gather"], feeds) if (o.embedding_split and embeddings == "int4" and feeds) else {}
    for t in targets:
        row: dict[str, Any] = {"layer": t.label, "op": t.node.op_type}
        if t.weight is not None:
            w = weights[t.index]
            orig = t.weight.const_value.numpy()
            row.update({"weight": t.weight.name, "shape": list(orig.shape), "bytes_before": int(orig.nbytes)})
            wp = _plan_weight(t, w, o, stats, hessians, smooth_of, hinv_cache, embeddings, hot, row)
            plan_weights.append(wp)
            deq = _dequantized(wp, t, o)
            row["bytes_after"] = _stored_bytes(wp, o)
            row["scale"] = _summary(wp.arrays.get("scale", wp.arrays.get("scales", wp.arrays.get("hot_scales"))))
            if wp.kind == "int8" and t.kind == "gemm" and t.in_axis == 1:
                deq = deq.T
            row["weight_rel_error"] = round(qm.relative_error(deq, w), 6)
        for i in t.acts:
            name = t.node.inputs[i].name
            row.setdefault("activations", {})[name] = act_rows[name]
        if t.index in awq_rows:
            row["awq"] = awq_rows[t.index]
        if t.kind in ("matmul", "gemm", "tied") and t.node.inputs[0].name in stats:
            shift = None
            if o.bias_correction and t.acts and _bias_of(t) is not None:
                shift = _bias_shift(t, stats, plan_weights[-1], acts, o)
                bias_shifts[t.index] = shift
            row.update(_layer_error(t, stats, weights, plan_weights[-1], acts, o, shift))
        rows.append(row)
        row_targets.append(t.index)
        # Done with this layer's float copies: drop them and unmap its weight, so a large model's weights are
        # not all resident at once while the plan is made (1 GB scale point: qdq peak 1.81 -> 0.92 GB).
        weights.pop(t.index, None)
        w = orig = deq = None
        if t.weight is not None and isinstance(t.weight.const_value, ir.ExternalTensor):
            with contextlib.suppress(BufferError):
                t.weight.const_value.release()
    return _Plan(acts, plan_weights, by_index, rows, row_targets, bias_shifts)


def _stored_bytes(wp: _WeightParams, o: QdqOptions) -> int:
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


def _act_range(st: _ActStats, smooth: np.ndarray | None, method: str, percentile: float, qmin: int, qmax: int) -> tuple[float, float, float]:
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


def _choose_smoothing(st: _ActStats, mats: list[np.ndarray], alphas, method, percentile, arange, qmax_w, min_gain: float = 1.0) -> np.ndarray | None:
    """SmoothQuant factors for the alpha (from ``alphas``) with the lowest simulated output error; None if 0 wins,
    or if the best alpha does not divide the error of alpha 0 (when tried) by at least ``min_gain``.

    Ranges and factors are fitted on half of the calibration sample and the error is measured on the other
    half: smoothing brings every channel close to the clip range, so in-sample error would favour it unfairly.
    """
    w_absmax = np.max([np.abs(w).max(axis=1) for w in mats], axis=0)
    x = st.sample[: min(len(st.sample), 2048)]
    fit, held = (x[0::2], x[1::2]) if len(x) >= 64 else (x, x)
    fit_stats = _ActStats(chan_min=fit.min(axis=0), chan_max=fit.max(axis=0), sample=fit)
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


def _fake_quant_acts(st: _ActStats, smooth, x, method, percentile, qmin, qmax) -> np.ndarray:
    lo, hi, _ = _act_range(st, smooth, method, percentile, qmin, qmax)
    scale, zp = qm.affine_params(lo, hi, qmin, qmax)
    xs = x if smooth is None else x / smooth
    return qm.fake_quant(xs, scale, zp, qmin, qmax)


def _layer_error(t: _Target, stats, weights, wp: _WeightParams, acts: list[_ActParams], o: QdqOptions, shift: np.ndarray | None = None) -> dict[str, float]:
    """Output error of this layer alone on the calibration sample: quantized (+ bias shift) vs float product."""
    # at most ~4M output values: an lm_head's 49152 columns x 1024 rows were 0.8 GB of float64 copies in cosine()
    out, ref = _layer_outputs(t, stats, wp, acts, o, rows=max(64, min(1024, (1 << 22) // max(1, _weight_matrix(t).shape[1]))))
    result = {"output_rel_error": round(qm.relative_error(out, ref), 6), "output_cosine": round(qm.cosine(out, ref), 6)}
    if shift is not None:
        out = out + shift
        result.update({"output_rel_error_before_bias_correction": result["output_rel_error"], "output_rel_error": round(qm.relative_error(out, ref), 6)})
        result["output_cosine"] = round(qm.cosine(out, ref), 6)
    return result


def _bias_of(t: _Target) -> tuple[ir.Value, float] | None:
    """The float bias initializer added right after this MatMul/Gemm (only user: this layer), and the factor it is multiplied by."""
    n_out = _weight_matrix(t).shape[1]

    def usable(v: ir.Value | None) -> bool:
        return (
            _is_float_initializer(v) and tuple(v.const_value.shape) in ((n_out,), (1, n_out)) and len(v.uses()) == 1 and not v.is_graph_output()
        )

    if t.kind == "gemm":
        c = t.node.inputs[2] if len(t.node.inputs) > 2 else None
        beta = t.node.attributes.get_float("beta", 1.0)
        return (c, beta) if usable(c) and beta != 0 else None
    out = t.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - index]
    return (other, 1.0) if usable(other) else None


def _bias_shift(t: _Target, stats, wp: _WeightParams, acts: list[_ActParams], o: QdqOptions) -> np.ndarray:
    """Mean output error of the quantized layer over the calibration sample (float minus quantized), per output channel.

    Quantization errors that do not average out (clipping, rounding against channels with a non-zero mean, such
    as LayerNorm outliers) shift every output by the same amount; adding the mean back to the float bias
    removes that part exactly (bias correction, Nagel et al. 2019).
    """
    out, ref = _layer_outputs(t, stats, wp, acts, o, rows=None)
    return (ref - out).mean(axis=0).astype(np.float32)


def _layer_outputs(t: _Target, stats, wp: _WeightParams, acts: list[_ActParams], o: QdqOptions, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    st = stats[t.node.inputs[0].name]
    x = st.sample if rows is None else st.sample[: min(len(st.sample), rows)]
    w_orig = _weight_matrix(t)
    ref = x @ w_orig
    act = next((a for a in acts if (t.index, 0) in a.consumers), None)
    if act is not None:
        qmin, qmax = qm.QRANGES[o.activation_type]
        xs = x if act.smooth is None else x / act.smooth
        xq = qm.fake_quant(xs, act.scale, act.zero_point, qmin, qmax) if act.quantize else xs
    else:
        xq = x
    wq = _dequantized(wp, t, o)
    if t.kind == "gemm" and t.in_axis == 1 and wp.kind == "int8":
        wq = wq.T
    out = xq @ wq
    fold = next((a for a in acts if a.fold_into == t.index), None)
    if fold is not None:  # the weight columns carry a consumer's 1/s: compare in the float model's units
        out = out * fold.smooth
    return out, ref


def _dequantized(wp: _WeightParams, t: _Target, o: QdqOptions) -> np.ndarray:
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


def indexed_rows(model: ir.Model, gathers: list[_Target], feeds) -> dict[int, np.ndarray]:
    """Per embedding Gather: the table rows its indices select on the calibration data (one ORT pass)."""
    from onnxpress import runtime

    names = sorted({t.node.inputs[1].name for t in gathers})
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    graph_inputs = {v.name for v in model.graph.inputs}
    # indices fed straight from the graph inputs (token ids) need no model run
    batches = feeds if all(n in graph_inputs for n in names) else runtime.capture(model, feeds, names)
    for values in batches:
        for n in names:
            seen[n].append(np.asarray(values[n]))
    return {t.index: qm.used_rows(seen[t.node.inputs[1].name], t.weight.const_value.shape[0]) for t in gathers}


def _quantize_table(t: _Target, w: np.ndarray, embeddings: str, o: QdqOptions, hot: np.ndarray | None = None) -> _WeightParams:
    rows = w.shape[0]
    if embeddings == "int4" and hot is not None and 0 < hot.size < rows:
        # Frequency split: the rows the data uses keep 4 bits, the never-seen rest (most of a vocabulary) get 2
        clip = "none" if o.weight_method == "rtn" else "mse"
        arrays = qm.quantize_split_rows(w, hot, o.embedding_block_size, o.embedding_cold_block_size, o.int4_symmetric, clip)
        return _WeightParams(t.index, "gather_split", arrays)
    if embeddings == "int4":
        codes, scales, zps = qm.quantize_rows_blockwise(w, o.embedding_block_size, 4, o.int4_symmetric, "none" if o.weight_method == "rtn" else "mse")
        return _WeightParams(t.index, "gather4", {"codes": codes, "scales": scales, "zero_points": zps})
    q, scale = qm.quantize_weight(w, 0, 127, "none" if o.weight_method == "rtn" else "mse")
    return _WeightParams(t.index, "gather8", {"q": q, "scale": scale.reshape(-1, 1)})


# -- graph surgery ---------------------------------------------------------------------------------
def _const(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    name = _unique(graph, name)
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, name: str) -> str:
    taken = graph.initializers
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def _ensure_opset(model: ir.Model, version: int) -> None:
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if current >= version:
        return
    from onnxscript import version_converter

    version_converter.convert_version(model, version)


def apply_plan(model: ir.Model, plan: _Plan, o: QdqOptions) -> None:
    graph = model.graph
    needs = 21 if (o.mode == "int4" and o.int4_format == "qdq") else 13
    if plan.acts or plan.weights:
        _ensure_opset(model, needs)
    a_dtype = ir.DataType.UINT8 if o.activation_type == "uint8" else ir.DataType.INT8
    a_np = np.uint8 if o.activation_type == "uint8" else np.int8
    for act in plan.acts:
        if act.fold_into is not None:
            _fold_smoothing(graph, plan.targets[act.fold_into], act)
        if act.compensate:
            continue
        if not act.quantize:  # AWQ: the float input is scaled by 1/s (norm weight, producer columns or a Mul)
            _apply_awq_scaling(graph, plan, act)
            continue
        cons = [(plan.targets[ti], ii) for ti, ii in act.consumers]
        x = cons[0][0].node.inputs[cons[0][1]]
        base = x.name
        scale = _const(graph, f"{base}_scale", np.array(act.scale, np.float32))
        zp = _const(graph, f"{base}_zero_point", np.array(act.zero_point, a_np))
        first = min((t.node for t, _ in cons), key=lambda n: _position(graph, n))
        q_in = x
        if act.smooth is not None and act.fold_into is None:
            # SmoothQuant: x / s (per last-axis channel) is what gets quantized; the weights carry s.
            inv = _const(graph, f"{base}_smooth_inv", (1.0 / act.smooth).astype(np.float32))
            q_in = ir.Value(name=f"{base}_smoothed", type=ir.TensorType(_FLOAT), shape=_shape(x))
            graph.insert_before(first, ir.node("Mul", [x, inv], outputs=[q_in], name=f"{base}_Smooth"))
        q_out = ir.Value(name=f"{base}_quantized", type=ir.TensorType(a_dtype), shape=_shape(x))
        graph.insert_before(first, ir.node("QuantizeLinear", [q_in, scale, zp], outputs=[q_out], name=f"{base}_QuantizeLinear"))
        for k, (t, ii) in enumerate(cons):
            dq_out = ir.Value(name=f"{base}_dequantized_{k}", type=ir.TensorType(_FLOAT), shape=_shape(x))
            graph.insert_before(t.node, ir.node("DequantizeLinear", [q_out, scale, zp], outputs=[dq_out], name=f"{base}_DequantizeLinear_{k}"))
            t.node.replace_input_with(ii, dq_out)
    folded = {a.fold_into: a.smooth for a in plan.acts if a.fold_into is not None}
    for index, shift in plan.bias_shifts.items():
        # before the weight rewrites: _bias_of looks at the layer's node as it is in the float graph
        found = _bias_of(plan.targets[index])
        if found is not None:
            bias, factor = found
            value = bias.const_value.numpy()
            if index in folded:  # the shift is in the float model's units, this bias already carries 1/s
                shift = shift / folded[index]
            bias.const_value = ir.tensor((value + shift.reshape(value.shape) / np.float32(factor)).astype(np.float32), name=bias.name)
    act_of = {consumer: act for act in plan.acts for consumer in act.consumers}
    for wp in plan.weights:
        t = plan.targets[wp.target]
        old = t.weight
        if wp.kind == "int8":
            _apply_int8(graph, t, wp, resolved_weight_type(o))
            if t.kind == "gemm" and (t.index, 0) in act_of:
                outcome = _quantize_gemm_bias(graph, t, wp, act_of[(t.index, 0)])
                if outcome and t.index in plan.row_targets:
                    plan.rows[plan.row_targets.index(t.index)]["bias"] = outcome
        elif wp.kind == "int4":
            _apply_int4(model, t, wp, o)
        elif wp.kind == "gather8":
            _apply_gather8(graph, t, wp)
        elif wp.kind == "gather4":
            _apply_gather4(model, t, wp, o)
        elif wp.kind == "gather_split":
            _apply_gather_split(model, t, wp, o)
        elif wp.kind == "tied4":
            _apply_tied4(model, t, wp, o)
        if old is not None and not old.uses() and old.name in graph.initializers:
            graph.initializers.pop(old.name)


# f(x / s) = f(x) / s channel by channel for every s > 0: a SmoothQuant 1/s can move in front of these
_POSITIVE_HOMOGENEOUS = {"Relu", "LeakyRelu"}


def _fold_producer(x: ir.Value, n_consumers: int, target_of: dict[int, _Target]) -> _Target | None:
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
                if t is not None and t.kind == "matmul" and t.weight is not None and _bias_of(t) is not None:
                    return t
            return None
        else:
            t = target_of.get(id(node))
            if t is None or t.kind not in ("matmul", "gemm") or t.weight is None:
                return None
            if t.kind == "gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and _bias_of(t) is None:
                return None
            return t
        if v is None or v.is_graph_output() or len(v.uses()) != 1:
            return None


def _fold_smoothing(graph: ir.Graph, producer: _Target, act: _ActParams) -> None:
    """Divide the producer's bias by ``s`` (its weight columns were divided in the plan); ``compensate``: then
    multiply the smoothed activation by ``s`` again for consumers that stay float."""
    found = _bias_of(producer)
    if found is not None:
        bias = found[0]
        value = bias.const_value.numpy()
        bias.const_value = ir.tensor((value / act.smooth.reshape(value.shape)).astype(np.float32), name=bias.name)
    if act.compensate:
        x = _value_named(graph, act.name)
        restored = ir.Value(name=f"{x.name}_unsmoothed", type=x.type, shape=_shape(x))
        factor = _const(graph, f"{x.name}_smooth", act.smooth.astype(np.float32))
        users = list(x.uses())
        node = ir.node("Mul", [x, factor], outputs=[restored], name=f"{x.name}_Unsmooth")
        graph.insert_after(x.producer(), node)
        for user, index in users:
            user.replace_input_with(index, restored)


def _value_named(graph: ir.Graph, name: str) -> ir.Value:
    for node in graph:
        for out in node.outputs:
            if out.name == name:
                return out
    raise KeyError(name)


def _shape(value: ir.Value) -> ir.Shape | None:
    return None if value.shape is None else ir.Shape(value.shape)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    raise KeyError(node.name)


@functools.cache  # asked once per quantized layer; the CPU does not change within a process
def cpu_has_int8_dot() -> bool:
    """Whether this CPU multiplies u8 x s8 without int16 saturation: x86 with VNNI/AMX, or any non-x86 CPU."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return True  # unknown: the portable, fast default


def resolved_weight_type(o: QdqOptions) -> str:
    if o.weight_type != "auto":
        return o.weight_type
    return "int8" if (o.reduce_range or cpu_has_int8_dot()) else "uint8"


def _apply_int8(graph: ir.Graph, t: _Target, wp: _WeightParams, weight_type: str) -> None:
    w = t.weight
    axis = int(wp.arrays["axis"])
    codes, zero = (wp.arrays["q"], np.int8(0)) if weight_type == "int8" else ((wp.arrays["q"].astype(np.int16) + 128).astype(np.uint8), np.uint8(128))
    q = _const(graph, f"{w.name}_quantized", codes)
    scale = _const(graph, f"{w.name}_scale", wp.arrays["scale"] if axis >= 0 else wp.arrays["scale"].reshape(()))
    zp = _const(graph, f"{w.name}_zero_point", np.full(wp.arrays["scale"].shape if axis >= 0 else (), zero))
    out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(w))
    attrs = {"axis": axis} if axis >= 0 else {}
    graph.insert_before(t.node, ir.node("DequantizeLinear", [q, scale, zp], attrs, outputs=[out], name=f"{w.name}_DequantizeLinear"))
    t.node.replace_input_with(t.weight_input, out)


def _quantize_gemm_bias(graph: ir.Graph, t: _Target, wp: _WeightParams, act: _ActParams) -> str | None:
    """Give a static-mode Gemm an int32 bias behind DequantizeLinear; returns what became of the bias (None: none).

    ORT fuses ``DQ(A), DQ(B), DQ(C) -> Gemm`` into one integer QGemm only when every input comes from a
    DequantizeLinear: with a float C the Gemm stays float and dequantizes its weight on every run (MiniLM after
    ``simplify``, whose Gemms carry their bias: 55 ms per batch instead of 16, slower than fp32). C becomes
    int32 codes at scale ``a_scale * w_scale`` per output channel, the layout ORT's own quantizer writes and
    QGemm adds to its int32 accumulator; the rounding error (at most half of that scale) is far below the
    activation's own quantization step.
    """
    node = t.node
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
    n = wp.arrays["q"].shape[0 if t.in_axis == 1 else 1]
    if alpha != 1.0 or beta != 1.0:
        return "float (alpha/beta != 1: ORT keeps this Gemm in float)"
    if not _is_float_initializer(c) or c.const_value.numpy().size != n or c.const_value.numpy().ndim != 1:
        return "float (not a constant [N] float bias: ORT keeps this Gemm in float)"
    scale = (np.float32(act.scale) * np.asarray(wp.arrays["scale"], np.float32)).reshape(-1)
    scale = np.broadcast_to(scale, (n,)).astype(np.float32)
    bias = c.const_value.numpy().astype(np.float64)
    codes = np.round(bias / np.maximum(scale, np.finfo(np.float32).tiny))
    if np.abs(codes).max(initial=0.0) > np.iinfo(np.int32).max:
        return "float (int32 bias would overflow)"
    q = _const(graph, f"{c.name}_quantized", codes.astype(np.int32))
    s = _const(graph, f"{c.name}_scale", scale)
    zp = _const(graph, f"{c.name}_zero_point", np.zeros(n, np.int32))
    out = ir.Value(name=f"{c.name}_dequantized", type=ir.TensorType(_FLOAT), shape=ir.Shape([n]))
    graph.insert_before(node, ir.node("DequantizeLinear", [q, s, zp], {"axis": 0}, outputs=[out], name=f"{c.name}_DequantizeLinear"))
    node.replace_input_with(2, out)
    if not c.uses() and c.name in graph.initializers:
        graph.initializers.pop(c.name)
    return "int32 (QGemm)"


def _replace_node(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_out: ir.Value) -> None:
    graph.insert_after(old, new_nodes)
    old_out = old.outputs[0]
    name = old_out.name
    was_output = old_out.is_graph_output()
    ir.convenience.replace_all_uses_with(old_out, new_out, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    if was_output:
        old_out.name = f"{name}_replaced"
        new_out.name = name


def _apply_int4(model: ir.Model, t: _Target, wp: _WeightParams, o: QdqOptions) -> None:
    graph = model.graph
    w = t.weight
    codes, scales, zps = wp.arrays["codes"], wp.arrays["scales"], wp.arrays["zero_points"]
    k, n = codes.shape
    kb = scales.shape[0]
    if o.int4_format == "qdq":
        dtype = ir.DataType.UINT4
        if not o.int4_symmetric:
            zps_stored = zps
        else:
            zps_stored = np.full(scales.shape, 8, np.uint8)
        axis = 0
        if t.kind == "gemm" and t.in_axis == 1:  # Gemm transB=1 holds W as [N, K]: blocks run along axis 1
            codes, scales, zps_stored, axis = codes.T.copy(), scales.T.copy(), zps_stored.T.copy(), 1
        q = _const(graph, f"{w.name}_quantized", codes, dtype)
        scale = _const(graph, f"{w.name}_scale", scales)
        inputs = [q, scale, _const(graph, f"{w.name}_zero_point", zps_stored, dtype)]
        out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(w))
        graph.insert_before(t.node, ir.node("DequantizeLinear", inputs, {"axis": axis, "block_size": o.block_size}, outputs=[out], name=f"{w.name}_DequantizeLinear"))
        t.node.replace_input_with(t.weight_input, out)
        return
    model.opset_imports.setdefault(_MS, 1)
    padded = np.zeros((kb * o.block_size, n), np.uint8)
    padded[:k] = codes
    if not o.int4_symmetric:
        padded[k:] = zps[-1]  # padded rows dequantize to 0
    else:
        padded[k:] = 8
    blob = qm.pack_codes(padded.T.reshape(n, kb, o.block_size), 4)  # [N, kb, block/2]
    alpha, beta, bias = 1.0, 1.0, None
    if t.kind == "gemm":  # Y = alpha * A @ W + beta * C: alpha goes into the block scales, C into an Add
        alpha = t.node.attributes.get_float("alpha", 1.0)
        beta = t.node.attributes.get_float("beta", 1.0)
        bias = t.node.inputs[2] if len(t.node.inputs) > 2 else None
    b = _const(graph, f"{w.name}_q4", blob)
    s = _const(graph, f"{w.name}_scales", (scales.T * np.float32(alpha)).reshape(-1).astype(np.float32))
    inputs = [t.node.inputs[0], b, s]
    if not o.int4_symmetric:
        inputs.append(_const(graph, f"{w.name}_zero_points", qm.pack_codes(zps.T, 4).reshape(-1)))
    result = t.node.outputs[0]
    out = ir.Value(name=f"{result.name}_q4", type=ir.TensorType(_FLOAT), shape=_shape(result))
    nodes = [
        ir.node(
            "MatMulNBits", inputs, {"K": k, "N": n, "bits": 4, "block_size": o.block_size, "accuracy_level": o.accuracy_level},
            domain=_MS, outputs=[out], name=(t.node.name or w.name) + "_MatMulNBits",
        )
    ]
    if bias is not None:
        if beta != 1.0:
            if bias.const_value is not None and bias.is_initializer():
                bias = _const(graph, f"{bias.name}_beta", (bias.const_value.numpy() * np.float32(beta)).astype(np.float32))
            else:
                scaled = ir.Value(name=f"{result.name}_beta_c", type=ir.TensorType(_FLOAT))
                beta_value = _const(graph, f"{result.name}_beta", np.array(beta, np.float32))
                nodes.append(ir.node("Mul", [bias, beta_value], outputs=[scaled], name=f"{result.name}_Beta"))
                bias = scaled
        summed = ir.Value(name=f"{result.name}_q4_bias", type=ir.TensorType(_FLOAT), shape=_shape(result))
        nodes.append(ir.node("Add", [out, bias], outputs=[summed], name=(t.node.name or w.name) + "_Bias"))
        out = summed
    _replace_node(graph, t.node, nodes, out)


def _apply_gather8(graph: ir.Graph, t: _Target, wp: _WeightParams) -> None:
    w = t.weight
    idx = t.node.inputs[1]
    q = _const(graph, f"{w.name}_quantized", wp.arrays["q"])
    scale = _const(graph, f"{w.name}_scale", wp.arrays["scale"])
    base = t.node.outputs[0].name
    gq = ir.Value(name=f"{base}_q", type=ir.TensorType(ir.DataType.INT8))
    gs = ir.Value(name=f"{base}_row_scale", type=ir.TensorType(_FLOAT))
    gf = ir.Value(name=f"{base}_cast", type=ir.TensorType(_FLOAT))
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(t.node.outputs[0]))
    nodes = [
        ir.node("Gather", [q, idx], {"axis": 0}, outputs=[gq], name=f"{base}_GatherQ"),
        ir.node("Gather", [scale, idx], {"axis": 0}, outputs=[gs], name=f"{base}_GatherScale"),
        ir.node("Cast", [gq], {"to": _FLOAT}, outputs=[gf], name=f"{base}_Cast"),
        ir.node("Mul", [gf, gs], outputs=[out], name=f"{base}_Dequantize"),
    ]
    _replace_node(graph, t.node, nodes, out)


def _apply_gather4(model: ir.Model, t: _Target, wp: _WeightParams, o: QdqOptions) -> None:
    graph = model.graph
    w = t.weight
    idx = t.node.inputs[1]
    codes, scales, zps = wp.arrays["codes"], wp.arrays["scales"], wp.arrays["zero_points"]  # [V,D], [V,D/b], [V,D/b]
    base = t.node.outputs[0].name
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(t.node.outputs[0]))
    if o.int4_format == "qdq":
        dtype = ir.DataType.UINT4
        q = _const(graph, f"{w.name}_quantized", codes, dtype)
        s = _const(graph, f"{w.name}_scale", scales)
        z = _const(graph, f"{w.name}_zero_point", zps, dtype)
        table = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(w))
        nodes = [
            ir.node("DequantizeLinear", [q, s, z], {"axis": 1, "block_size": o.embedding_block_size}, outputs=[table], name=f"{w.name}_DequantizeLinear"),
            ir.node("Gather", [table, idx], {"axis": 0}, outputs=[out], name=f"{base}_Gather"),
        ]
    else:
        model.opset_imports.setdefault(_MS, 1)
        q = _const(graph, f"{w.name}_q4", qm.pack_codes(codes, 4))
        s = _const(graph, f"{w.name}_scales", scales)
        inputs = [q, idx, s]
        if not o.int4_symmetric:
            inputs.append(_const(graph, f"{w.name}_zero_points", qm.pack_codes(zps, 4)))
        nodes = [
            ir.node(
                "GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": o.embedding_block_size, "bits": 4},
                domain=_MS, outputs=[out], name=f"{base}_GatherBlockQuantized",
            )
        ]
    _replace_node(graph, t.node, nodes, out)


def _apply_gather_split(model: ir.Model, t: _Target, wp: _WeightParams, o: QdqOptions) -> None:
    """``remap[ids]`` gives each index its position (hot rows first); two GatherBlockQuantized (4-bit hot rows,
    2-bit cold rows) look up every index with clamped positions and ``Where`` keeps the right one."""
    graph = model.graph
    model.opset_imports.setdefault(_MS, 1)
    a = wp.arrays
    w, idx = t.weight, t.node.inputs[1]
    base = t.node.outputs[0].name
    n_hot = int(a["hot_ids"].size)
    i64 = ir.DataType.INT64

    def value(name: str, dtype: ir.DataType | None = None) -> ir.Value:
        return ir.Value(name=f"{base}_{name}", type=None if dtype is None else ir.TensorType(dtype))

    def table(prefix: str, bits: int, block: int, position: ir.Value, out: ir.Value) -> ir.Node:
        inputs = [position, _const(graph, f"{w.name}_{prefix}_scales", a[f"{prefix}_scales"])]
        inputs.insert(0, _const(graph, f"{w.name}_{prefix}_q{bits}", qm.pack_codes(a[f"{prefix}_codes"], bits)))
        if not o.int4_symmetric:
            inputs.append(_const(graph, f"{w.name}_{prefix}_zero_points", qm.pack_codes(a[f"{prefix}_zero_points"], bits)))
        return ir.node(
            "GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
            domain=_MS, outputs=[out], name=f"{base}_GatherBlockQuantized_{prefix}",
        )

    narrow, position, is_hot = value("position_narrow"), value("position", i64), value("is_hot", ir.DataType.BOOL)
    hot_pos, cold_pos, offset = value("hot_position", i64), value("cold_position", i64), value("cold_offset", i64)
    hot_rows, cold_rows, cond = value("hot_rows", _FLOAT), value("cold_rows", _FLOAT), value("is_hot_rows", ir.DataType.BOOL)
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(t.node.outputs[0]))
    n = _const(graph, f"{w.name}_hot_count", np.array(n_hot, np.int64))
    nodes = [
        ir.node("Gather", [_const(graph, f"{w.name}_remap", a["remap"]), idx], {"axis": 0}, outputs=[narrow], name=f"{base}_Remap"),
        ir.node("Cast", [narrow], {"to": i64}, outputs=[position], name=f"{base}_RemapCast"),
        ir.node("Less", [position, n], outputs=[is_hot], name=f"{base}_IsHot"),
        ir.node("Min", [position, _const(graph, f"{w.name}_hot_last", np.array(n_hot - 1, np.int64))], outputs=[hot_pos], name=f"{base}_HotPosition"),
        ir.node("Sub", [position, n], outputs=[offset], name=f"{base}_ColdOffset"),
        ir.node("Max", [offset, _const(graph, f"{w.name}_zero", np.array(0, np.int64))], outputs=[cold_pos], name=f"{base}_ColdPosition"),
        table("hot", 4, o.embedding_block_size, hot_pos, hot_rows),
        table("cold", 2, o.embedding_cold_block_size, cold_pos, cold_rows),
        ir.node("Unsqueeze", [is_hot, _const(graph, f"{w.name}_last_axis", np.array([-1], np.int64))], outputs=[cond], name=f"{base}_IsHotRows"),
        ir.node("Where", [cond, hot_rows, cold_rows], outputs=[out], name=f"{base}_Select"),
    ]
    _replace_node(graph, t.node, nodes, out)


# -- shared (tied) embedding / lm_head tables ----------------------------------------------------------
@dataclasses.dataclass
class _Tied:
    """A table read by embedding Gathers and by lm_head MatMul/Gemm nodes, directly or through Transposes."""

    table_is_transposed: bool  # the [vocab, hidden] table is W^T (W stored [hidden, vocab]: the genai builder's layout)
    heads: list[ir.Node]
    gathers: list[ir.Node]
    transposes: list[ir.Node]

    def describe(self) -> dict[str, Any]:
        return {
            "gathers": [n.name or n.outputs[0].name for n in self.gathers],
            "heads": [n.name or n.outputs[0].name for n in self.heads],
            "stored": "[hidden, vocab]" if self.table_is_transposed else "[vocab, hidden]",
        }


def tied_uses(weight: ir.Value | None) -> _Tied | str:
    """The Gather and MatMul/Gemm uses of a table shared between an embedding and an lm_head, or why it is not one.

    Recognised: ``Gather(W)`` or ``Gather(Transpose(W))`` (axis 0, indices computed at run time) together with
    ``MatMul(x, W)``, ``MatMul(x, Transpose(W))`` or ``Gemm(x, W)`` (transA=0, alpha=1; transB either way), as
    long as every use agrees on which axis of W is the vocabulary."""
    if weight is None or not _is_float_initializer(weight) or weight.is_graph_output() or len(weight.const_value.shape) != 2:
        return "not a 2-D float initializer"
    uses: list[tuple[ir.Node, int, bool]] = []
    transposes: list[ir.Node] = []
    for node, index in weight.uses():
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            perm = node.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return "read by a Transpose that is not [1, 0]"
            if node.outputs[0].is_graph_output():
                return "its transpose is a graph output"
            transposes.append(node)
            uses.extend((n, i, True) for n, i in node.outputs[0].uses())
        else:
            uses.append((node, index, False))
    heads: list[ir.Node] = []
    gathers: list[ir.Node] = []
    sides: set[bool] = set()  # whether the [vocab, hidden] table is W^T, as each use sees it
    for node, index, through in uses:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return f"also read by {op}"
        if op == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0 and node.inputs[1] is not None and node.inputs[1].const_value is None:
            gathers.append(node)  # Gather's rows are the vocabulary
            sides.add(through)
        elif op in ("MatMul", "Gemm") and index == 1:
            act = node.inputs[0]
            if act is None or act.const_value is not None or (act.dtype is not None and act.dtype != _FLOAT):
                return f"{op} input is not a float activation"
            trans_b = 0
            if op == "Gemm":
                if node.attributes.get_int("transA", 0):
                    return "read by a Gemm with transA=1"
                if node.attributes.get_float("alpha", 1.0) != 1.0:
                    return "read by a Gemm with alpha != 1 (the shared scales cannot carry it)"
                trans_b = node.attributes.get_int("transB", 0)
            # a head computes x @ M with M [hidden, vocab], or x @ M^T (Gemm transB=1) with M [vocab, hidden]
            sides.add(through if trans_b else not through)
            heads.append(node)
        else:
            return f"also read by {op} (input {index})"
    if not heads or not gathers:
        return "not an embedding table that is also a MatMul/Gemm weight"
    if len(sides) != 1:
        return "its uses disagree on which axis is the vocabulary"
    return _Tied(sides.pop(), heads, gathers, transposes)


def tied_target(model: ir.Model, weight: ir.Value, o: QdqOptions, embeddings: str) -> _Target | str:
    """One target for a tied embedding / lm_head table (int4), labelled by its (first) head; or why not."""
    if embeddings != "int4":
        return f"embeddings={o.embeddings} leaves the table float; the shared table is quantized as int4 only"
    found = tied_uses(weight)
    if isinstance(found, str):
        return found
    positions = {id(n): i for i, n in enumerate(model.graph)}
    members = found.heads + found.gathers
    if any(id(n) not in positions for n in members):
        return "used inside a subgraph"
    labels = [(node_label(n, positions[id(n)]), n.op_type) for n in members]
    excluded, included = set(o.exclude), set(o.include)
    if any(label in excluded or op in excluded for label, op in labels):
        return "one of its uses is excluded"
    if included and not any(label in included or op in included for label, op in labels):
        return "not in include"
    head = found.heads[0]
    return _Target(positions[id(head)], head, "tied", weight, 1, axis=1, in_axis=0, tied=found)


def _rebind_tied(t: _Target, node: ir.Node) -> _Target:
    """``t`` rebound to its head ``node`` in a copy of the model (the table is the head's weight or its Transpose's input)."""
    w = node.inputs[1]
    if w is not None and w.name != t.weight.name and w.producer() is not None:
        w = w.producer().inputs[0]
    found = tied_uses(w)
    if isinstance(found, str):
        raise AssertionError(f"tied table '{t.weight.name}' not found again in the copy: {found}")
    return dataclasses.replace(t, node=node, weight=w, tied=found)


def _apply_tied4(model: ir.Model, t: _Target, wp: _WeightParams, o: QdqOptions) -> None:
    """Store the table once as int4 blocks along the hidden dim and make every use read it.

    matmulnbits: the lm_head becomes MatMulNBits over B ``[vocab, blocks, block/2]`` (its rows are the table's
    rows); each Gather becomes GatherBlockQuantized over ``Reshape(B, [vocab, blocks * block/2])``, the same
    bytes, with the same scale (and zero point) tensors — onnxruntime-genai's builder layout. qdq: one blocked
    DequantizeLinear of W in its stored orientation that every use (and its Transpose) reads.
    """
    graph = model.graph
    tied, w = t.tied, t.weight
    codes, scales, zps = wp.arrays["codes"], wp.arrays["scales"], wp.arrays["zero_points"]  # [H, V], [kb, V], [kb, V]
    block = o.embedding_block_size
    hidden, vocab = codes.shape
    kb = scales.shape[0]
    positions = {id(n): i for i, n in enumerate(graph)}
    first = min((u for u, _ in w.uses()), key=lambda n: positions[id(n)])
    if o.int4_format == "qdq":
        dtype = ir.DataType.UINT4
        zps_stored = zps if not o.int4_symmetric else np.full(scales.shape, 8, np.uint8)
        arrays, axis = (codes, scales, zps_stored), 0
        if not tied.table_is_transposed:  # W is [V, H]: blocks run along axis 1
            arrays, axis = tuple(a.T.copy() for a in arrays), 1
        q = _const(graph, f"{w.name}_quantized", arrays[0], dtype)
        s = _const(graph, f"{w.name}_scale", arrays[1])
        z = _const(graph, f"{w.name}_zero_point", arrays[2], dtype)
        out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(w))
        dq = ir.node("DequantizeLinear", [q, s, z], {"axis": axis, "block_size": block}, outputs=[out], name=f"{w.name}_DequantizeLinear")
        users = list(w.uses())
        graph.insert_before(first, dq)
        for user, index in users:
            user.replace_input_with(index, out)
        return
    model.opset_imports.setdefault(_MS, 1)
    padded = np.zeros((kb * block, vocab), np.uint8)
    padded[:hidden] = codes
    padded[hidden:] = 8 if o.int4_symmetric else zps[-1]  # padded rows dequantize to 0
    b = _const(graph, f"{w.name}_q4", qm.pack_codes(padded.T.reshape(vocab, kb, block), 4))  # [V, kb, block/2]
    tail = [_const(graph, f"{w.name}_scales", np.ascontiguousarray(scales.T))]  # [V, kb]: the layout both ops accept
    if not o.int4_symmetric:
        tail.append(_const(graph, f"{w.name}_zero_points", qm.pack_codes(np.ascontiguousarray(zps.T), 4)))  # [V, ceil(kb/2)]
    row_bytes = kb * block // 2
    flat = ir.Value(name=f"{w.name}_q4_rows", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([vocab, row_bytes]))
    shape = _const(graph, f"{w.name}_q4_rows_shape", np.array([vocab, row_bytes], np.int64))
    graph.insert_before(first, ir.node("Reshape", [b, shape], outputs=[flat], name=f"{w.name}_Q4Rows"))
    for gather in tied.gathers:
        base = gather.outputs[0].name
        out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(_FLOAT), shape=_shape(gather.outputs[0]))
        rows = out if kb * block == hidden else ir.Value(name=f"{base}_padded", type=ir.TensorType(_FLOAT))
        nodes = [
            ir.node(
                "GatherBlockQuantized", [flat, gather.inputs[1], *tail], {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4},
                domain=_MS, outputs=[rows], name=f"{base}_GatherBlockQuantized",
            )
        ]
        if rows is not out:  # the padded block columns dequantize to 0: cut them off
            consts = [_const(graph, f"{w.name}_{k}", np.array([v], np.int64)) for k, v in (("slice_start", 0), ("slice_end", hidden), ("slice_axis", -1))]
            nodes.append(ir.node("Slice", [rows, *consts], outputs=[out], name=f"{base}_Slice"))
        _replace_node(graph, gather, nodes, out)
    for head in tied.heads:
        result = head.outputs[0]
        out = ir.Value(name=f"{result.name}_q4", type=ir.TensorType(_FLOAT), shape=_shape(result))
        nodes = [
            ir.node(
                "MatMulNBits", [head.inputs[0], b, *tail], {"K": hidden, "N": vocab, "bits": 4, "block_size": block, "accuracy_level": o.accuracy_level},
                domain=_MS, outputs=[out], name=(head.name or result.name) + "_MatMulNBits",
            )
        ]
        c = head.inputs[2] if head.op_type == "Gemm" and len(head.inputs) > 2 else None
        if c is not None:
            beta = head.attributes.get_float("beta", 1.0)
            if beta != 1.0:
                scaled = ir.Value(name=f"{result.name}_beta_c", type=ir.TensorType(_FLOAT))
                nodes.append(ir.node("Mul", [c, _const(graph, f"{result.name}_beta", np.array(beta, np.float32))], outputs=[scaled], name=f"{result.name}_Beta"))
                c = scaled
            summed = ir.Value(name=f"{result.name}_q4_bias", type=ir.TensorType(_FLOAT), shape=_shape(result))
            nodes.append(ir.node("Add", [out, c], outputs=[summed], name=(head.name or result.name) + "_Bias"))
            out = summed
        _replace_node(graph, head, nodes, out)
    for node in tied.transposes:  # their readers are rewritten
        if not node.outputs[0].uses():
            graph.remove(node, safe=True)


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


def awq_plan(targets: list[_Target], stats, weights: dict[int, np.ndarray], smooth_of: dict[str, np.ndarray], awq_rows: dict[int, dict[str, Any]], o: QdqOptions) -> list[_ActParams]:
    """AWQ factors for the input of each group of int4 MatMul/Gemm targets that read the same activation.

    Searched by ``quant_math.awq_search`` on the calibration sample; where a factor helps, the group's weight
    rows are multiplied by it here (``weights``, so GPTQ/MSE then round the scaled weights, and GPTQ's
    Hessian is rescaled through ``smooth_of``), and ``1/s`` goes into the producer: a normalization's scale
    (and bias), a MatMul/Gemm target's weight columns (also through a SwiGLU ``Mul``), else a ``Mul``.
    Returns scaling-only activations (``quantize=False``) for ``apply_plan``; ``awq_rows`` gets each target's report.
    """
    groups: dict[str, list[_Target]] = {}
    for t in targets:
        if t.kind in ("matmul", "gemm") and t.weight is not None:
            groups.setdefault(t.node.inputs[0].name, []).append(t)
    target_of = {id(t.node): t for t in targets}
    result: list[_ActParams] = []
    for name, group in groups.items():
        st = stats.get(name)
        if st is None or st.sample is None or len(st.sample) == 0:
            continue
        s, alpha, errors = qm.awq_search(
            st.sample[:AWQ_SEARCH_ROWS], [weights[t.index] for t in group], o.block_size, 4, o.int4_symmetric, max_columns=AWQ_SEARCH_COLUMNS
        )
        info: dict[str, Any] = {"alpha": alpha, "error_vs_plain": round(errors[alpha] / errors[0.0], 4) if errors[0.0] > 0 else 1.0}
        if s is None:
            for t in group:
                awq_rows[t.index] = {**info, "folded_into": None}
            continue
        producer, norm, where = _awq_fold(group[0].node.inputs[0], group, target_of)
        for t in group:
            weights[t.index] = weights[t.index] * s[:, None]
        if producer is not None:
            weights[producer.index] = weights[producer.index] / s[None, :]
        smooth_of[name] = s
        result.append(_ActParams(name, 0.0, 0, s, [(t.index, 0) for t in group], producer.index if producer else None, quantize=False, fold_norm=norm))
        for t in group:
            awq_rows[t.index] = {**info, "folded_into": where}
    return result


def _awq_fold(x: ir.Value, group: list[_Target], target_of: dict[int, _Target]) -> tuple[_Target | None, tuple[str, ...] | None, str]:
    """Where AWQ's ``1/s`` on ``x`` goes: (producer target whose columns take it, names of a normalization's
    scale and bias initializers, description); both None: a ``Mul`` before the group."""
    members = {t.index for t in group}
    node = x.producer()
    if node is None or x.is_graph_output() or len(x.uses()) != len(group):
        return None, None, "Mul"
    producer = _fold_producer(x, len(group), target_of)
    if producer is not None and producer.index not in members:
        return producer, None, producer.label
    k = _weight_matrix(group[0]).shape[0]
    if node.op_type in _NORM_SCALE and node.outputs[0] is x:
        gi, bi = _NORM_SCALE[node.op_type]
        gamma = node.inputs[gi] if len(node.inputs) > gi else None
        beta = node.inputs[bi] if 0 <= bi < len(node.inputs) else None

        def own(v: ir.Value | None) -> bool:
            return _is_float_initializer(v) and tuple(v.const_value.shape) == (k,) and len(v.uses()) == 1

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


def _apply_awq_scaling(graph: ir.Graph, plan: _Plan, act: _ActParams) -> None:
    """Give the AWQ-scaled layers ``x / s``: a producer target's columns already carry it (its bias is divided
    by ``_fold_smoothing``); a normalization's scale (and bias) input is divided; else a Mul feeds the group."""
    if act.fold_into is not None:
        return
    if act.fold_norm is not None:
        for name in act.fold_norm:
            v = graph.initializers[name]
            v.const_value = ir.tensor((v.const_value.numpy() / act.smooth).astype(np.float32), name=v.name)
        return
    cons = [(plan.targets[ti], ii) for ti, ii in act.consumers]
    x = cons[0][0].node.inputs[cons[0][1]]
    first = min((t.node for t, _ in cons), key=lambda n: _position(graph, n))
    inv = _const(graph, f"{x.name}_awq_inv", (1.0 / act.smooth).astype(np.float32))
    out = ir.Value(name=f"{x.name}_awq", type=ir.TensorType(_FLOAT), shape=_shape(x))
    graph.insert_before(first, ir.node("Mul", [x, inv], outputs=[out], name=f"{x.name}_AwqScale"))
    for t, ii in cons:
        t.node.replace_input_with(ii, out)
