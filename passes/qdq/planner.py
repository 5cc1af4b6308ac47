"""The ``qdq`` planner: what the budget search may ask of ``qdq`` (``onnxpress.passes.planning``'s storage planner).

Options (short strings):

- ``int8``: int8 weights per output channel (``qdq(mode=weight)``; an embedding table: one scale per row);
- ``int4/B``: block-wise int4 with blocks of ``B`` rows along K (``qdq(mode=int4,block_size=B)``; an embedding
  table: blocks of ``B`` along its rows, ``GatherBlockQuantized``);
- ``split/H/C``: an embedding table whose rows the calibration data indexes stay int4 in blocks of ``H`` and all
  others are 2-bit in blocks of ``C`` (``qdq(mode=int4,embedding_split=true)``).

Which nodes take which option comes from ``find_targets`` (the pass's own rules), so the search never plans a
rewrite the pass refuses; bytes follow the layouts ``rewrite`` writes, and reconstructions call the same
``quant_math`` functions with the same arguments as ``plan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import InputStats
from onnxpress.passes.graph_utils import existing_bias, node_label
from onnxpress.passes.planning import Applicable, Feed, LayerView
from onnxpress.passes.qdq.options import QdqOptions
from onnxpress.passes.qdq.pass_ import Qdq
from onnxpress.passes.qdq.targets import find_targets, index_values, indexed_rows

MATMUL_MAX_BLOCK = 256  # MatMulNBits' CPU kernels take blocks of 16..256; GatherBlockQuantized takes larger
# onnxruntime's CPU session fuses an int8 DequantizeLinear + MatMul into MatMulNBits(bits=8, accuracy_level=4) with
# blocks of this many inputs (its session defaults), so the input is quantized per row in blocks of 32
ORT_INT8_MATMUL_BLOCK = 32
UNNAMED = "unnamed node (pipeline options select layers by name)"


# -- option text -------------------------------------------------------------------------------------------
def _block_size(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) >= 16 and not int(text) & (int(text) - 1) else None


@dataclasses.dataclass(frozen=True)
class QuantOption:
    """A parsed option: ``int8``, ``int4/B`` or ``split/H/C`` (see the module docstring)."""

    kind: Literal["int8", "int4", "split"]
    block: int = 0  # int4: block size; split: block size of the int4 (hot) rows
    cold_block: int = 0  # split: block size of the 2-bit rows

    @classmethod
    def parse(cls, text: str) -> QuantOption:
        parts = str(text).split("/")
        blocks = [_block_size(p) for p in parts[1:]]
        if parts == ["int8"]:
            return cls("int8")
        if parts[0] == "int4" and len(parts) == 2 and blocks[0]:
            return cls("int4", blocks[0])
        if parts[0] == "split" and len(parts) == 3 and all(blocks):
            return cls("split", blocks[0], blocks[1])
        raise ValueError(f"unknown qdq option '{text}' (valid: int8, int4/B, split/H/C with B, H, C powers of 2 >= 16)")

    def __str__(self) -> str:
        return {"int8": "int8", "int4": f"int4/{self.block}", "split": f"split/{self.block}/{self.cold_block}"}[self.kind]


# -- exact stored bytes ------------------------------------------------------------------------------------
def weight_bytes(kind: str, shape: tuple[int, ...], option: QuantOption) -> int:
    """Bytes of one weight as the qdq pass stores it (codes + scales + zero points; ``split``: ``split_bytes``).

    kind: ``matmul`` (shape K x N, channels N), ``gemm_t`` (N x K, channels N), ``conv`` (channels = axis 0),
    ``gather`` (V x D, one scale per row).
    """
    size = int(np.prod(shape))
    if option.kind == "split":
        raise ValueError("split options store embedding tables only: use split_bytes")
    if kind == "gather":
        v, d = shape
        if option.kind == "int8":
            return v * d + 4 * v  # int8 codes + one float scale per row
        return qm.rows_blockwise_bytes(v, d, 4, option.block)  # GatherBlockQuantized
    channels = shape[0] if kind in ("conv", "gemm_t") else shape[1]
    if option.kind == "int8":
        return size + 4 * channels + channels  # 8-bit codes, float scale and 8-bit zero point per channel
    if kind == "conv":
        raise ValueError("qdq quantizes Conv weights as int8 only")
    k = size // channels
    b = option.block
    kb = -(-k // b)
    return channels * kb * (b // 2) + 4 * channels * kb + channels * (-(-kb // 2))  # MatMulNBits: padded blob, scales, packed zps


def split_bytes(layer: LayerView, option: QuantOption) -> int:
    """Bytes of an embedding table stored by ``split/H/C`` (``layer.hot``: the rows kept at int4)."""
    if layer.op != "Gather" or layer.hot is None:
        raise ValueError(f"{option}: split options apply to embedding tables with calibrated hot rows only")
    return qm.split_rows_bytes(layer.shape[0], layer.shape[1], layer.hot.size, option.block, option.cold_block)


def layer_bytes(layer: LayerView, option: QuantOption) -> int:
    if option.kind == "split":
        return split_bytes(layer, option)
    kind = {"MatMul": "matmul", "Gemm": "gemm_t" if layer.trans_b else "matmul", "Conv": "conv", "Gather": "gather"}[layer.op]
    return weight_bytes(kind, layer.shape, option)


def useful_options(layer: LayerView, options: Sequence[QuantOption]) -> list[QuantOption]:
    """The int8/int4 options worth measuring on ``layer``: int4 block sizes the op's kernel takes, each storing
    fewer bytes than every smaller block size (a larger block only ever adds error). int8 first, then blocks
    from the smallest."""
    out: list[QuantOption] = []
    smallest = float("inf")
    for q in sorted(set(options), key=lambda q: (q.kind != "int8", q.block)):
        if q.kind == "int8":
            out.append(q)
            continue
        if layer.op != "Gather" and q.block > MATMUL_MAX_BLOCK:
            continue
        nbytes = layer_bytes(layer, q)
        if nbytes < smallest:
            out.append(q)
            smallest = nbytes
    return out


# -- reconstructions: the dense weight the rewritten layer computes with -------------------------------------
def _pad_hessian(h: np.ndarray, block: int) -> np.ndarray:
    pad = (-h.shape[0]) % block
    return np.pad(h, ((0, pad), (0, pad))) if pad else h


Factor = tuple[np.ndarray, np.ndarray]  # ``quant_math.gptq_inverse``: (upper Cholesky factor of the inverse, dead inputs)


def gptq_factor(hessian: np.ndarray, option: QuantOption) -> Factor:
    """GPTQ's inverse factor of ``hessian`` as ``quantized_codes`` uses it for ``option`` (int4: padded to whole
    blocks; int8: as is). ``gptq_factor_key`` says which options share one."""
    return qm.gptq_inverse(_pad_hessian(hessian, option.block) if option.kind == "int4" else hessian)


def gptq_factor_key(k: int, option: QuantOption) -> int:
    """The size of the factor ``option`` needs for ``K = k`` inputs: options with equal keys share one factor
    (int8 and int4 blocks that divide K: K; other blocks: K padded to whole blocks)."""
    return k + (-k) % option.block if option.kind == "int4" else k


@dataclasses.dataclass
class QuantizedMatrix:
    """A MatMul-layout weight as the pass stores it: the codes (one byte per weight, a quarter of the float32
    reconstruction) with their scales and zero points; ``dense()`` is dequant(quant(W)) in float32."""

    option: QuantOption
    codes: np.ndarray  # int8 [K, N] (int8: symmetric, one scale per column) or uint8 [K, N] (int4 block codes)
    scales: np.ndarray  # int8: [N]; int4: [K / block, N]
    zero_points: np.ndarray | None  # int4: [K / block, N]
    transposed: bool = False  # the node keeps the weight as [N, K] (Gemm transB): ``dense()`` gives that layout

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.zero_points) if a is not None)

    def dense(self) -> np.ndarray:
        if self.option.kind == "int8":
            w = qm.dequantize(self.codes, self.scales[None, :])
        else:
            w = qm.dequantize_blockwise(self.codes, self.scales, self.zero_points, self.option.block).astype(np.float32)
        return np.ascontiguousarray(w.T) if self.transposed else w


def quantized_codes(w: np.ndarray, option: QuantOption, hessian: np.ndarray | None, factor: Factor | None = None) -> QuantizedMatrix:
    """quant(W) of a MatMul-layout ``W [K, N]`` as ``qdq(mode=weight|int4)`` computes it: GPTQ with the layer
    input's ``X^T X`` when given (or its ``factor``, ``gptq_factor``, shared between options and layers with the
    same input, as the pass's plan shares it), else the MSE clip search."""
    w = np.asarray(w, np.float32)
    if factor is None and hessian is not None:
        factor = gptq_factor(hessian, option)
    if option.kind == "int8":
        if factor is not None:
            q, scale = qm.gptq_per_channel(w, factor, 127, per_channel=True)
        else:
            q, scale = qm.quantize_weight(w, 1, 127, "mse")
        return QuantizedMatrix(option, q, np.asarray(scale, np.float32), None)
    if option.kind != "int4":
        raise ValueError(f"{option}: a MatMul/Gemm weight takes int8 or int4/B")
    codes, scales, zps = qm.quantize_blockwise(w, option.block, 4, False, clip="mse", hessian=factor)
    return QuantizedMatrix(option, codes, scales, zps)


def quantized_matrix(w: np.ndarray, option: QuantOption, hessian: np.ndarray | None) -> np.ndarray:
    """dequant(quant(W)) for a MatMul-layout ``W [K, N]`` as ``qdq(mode=weight|int4)`` computes it
    (GPTQ with the layer input's ``X^T X`` when given, else the MSE clip search)."""
    return quantized_codes(w, option, hessian).dense()


def quantized_other(layer: LayerView, option: QuantOption) -> np.ndarray:
    """dequant(quant(W)) of a Conv weight or an embedding table, in the node's layout."""
    w = layer.w
    if layer.op == "Conv":
        if option.kind != "int8":
            raise ValueError(f"{option}: qdq quantizes Conv weights as int8 only")
        q, scale = qm.quantize_weight(w, 0, 127, "mse")
        return qm.dequantize(q, qm.per_axis_shape(scale, w.ndim, 0))
    if option.kind == "int8":  # Gather: one scale per row
        q, scale = qm.quantize_weight(w, 0, 127, "mse")
        return qm.dequantize(q, scale.reshape(-1, 1))
    if option.kind == "split":
        if layer.hot is None:
            raise ValueError(f"{option}: the layer has no calibrated hot rows")
        arrays = qm.quantize_split_rows(w, layer.hot, option.block, option.cold_block)
        return qm.dequantize_split_rows(arrays, option.block, option.cold_block)
    return qm.dequantize_rows_blockwise(*qm.quantize_rows_blockwise(w, option.block, 4, False, "mse"), option.block)


# -- realising a decision with the real pass ---------------------------------------------------------------
def mode_options(option: QuantOption, gather: bool) -> dict[str, Any]:
    """The ``qdq`` options (only those that differ from its defaults) that quantize as ``option``
    (``gather``: an embedding table is among the layers, so its block size follows ``int4/B`` too)."""
    defaults = QdqOptions()
    if option.kind == "int8":
        return {"mode": "weight"}
    if option.kind == "split":
        options: dict[str, Any] = {"mode": "int4", "embedding_split": True}
        if option.block != defaults.embedding_block_size:
            options["embedding_block_size"] = option.block
        if option.cold_block != defaults.embedding_cold_block_size:
            options["embedding_cold_block_size"] = option.cold_block
        return options
    options = {"mode": "int4"}
    if option.block != defaults.block_size:
        options["block_size"] = option.block
    if gather and option.block != defaults.embedding_block_size:
        options["embedding_block_size"] = option.block
    return options


def compress_names(names: Sequence[str], targets: Sequence[tuple[str, str]]) -> list[str]:
    """Replace the names of every target of an op type by the op type (qdq's include/exclude take both)."""
    chosen = set(names)
    by_op: dict[str, list[str]] = {}
    for name, op in targets:
        by_op.setdefault(op, []).append(name)
    out: list[str] = []
    covered: set[str] = set()
    for op, members in by_op.items():
        if all(n in chosen for n in members):
            out.append(op)
            covered |= set(members)
    out.extend(n for n in names if n not in covered)
    return out


def selection(wanted: Sequence[str], excluded: Sequence[str], targets: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """qdq's ``include=`` or ``exclude=`` option, whichever is shorter as text, selecting exactly ``wanted``
    among ``targets`` (name, op type); op types stand for all their targets. Both match whole names."""
    by_exclude = tuple(compress_names(excluded, targets))
    by_include = tuple(compress_names(wanted, targets))
    return {"include": by_include} if len(",".join(by_include)) < len(",".join(by_exclude)) else {"exclude": by_exclude}


# -- the planner -------------------------------------------------------------------------------------------
def _view(index: int, node: ir.Node, weight: ir.Value) -> LayerView:
    trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    view = LayerView(index, node.name, node.op_type, weight.name, np.asarray(weight.const_value.numpy(), np.float32), trans_b=trans_b)
    if node.op_type in ("MatMul", "Gemm"):
        view.x = node.inputs[0].name
        view.has_bias = existing_bias(node, view.matrix.shape[1]) is not None
    return view


class QdqPlanner:
    """The storage planner of ``qdq`` (``onnxpress.passes.planning.StoragePlanner``; options: module docstring)."""

    technique = "quant"
    structural = False

    def parse(self, option: str) -> QuantOption:
        return QuantOption.parse(option)

    def applicable(self, model: ir.Model, options: Sequence[str], calibration: Sequence[Feed] | None = None) -> Applicable:
        """Every named node ``qdq(mode=weight)`` quantizes, with the useful ``options`` there: int4 where
        ``qdq(mode=int4)`` also takes it, split (with ``calibration``) where it stores fewer bytes than every
        int8/int4 option. ``skipped``: why a node gets no view, or (``"int4: ..."``) why a viewed one takes no int4."""
        parsed = [QuantOption.parse(text) for text in options]
        plain = [q for q in parsed if q.kind != "split"]
        splits = [q for q in parsed if q.kind == "split"]
        int8_targets, skipped8 = find_targets(model, QdqOptions(mode="weight"))
        int4_targets, skipped4 = find_targets(model, QdqOptions(mode="int4")) if any(q.kind != "int8" for q in parsed) else ([], [])
        int4_ok = {t.index for t in int4_targets}
        int4_refused = {row["layer"]: row["skipped"] for row in skipped4}
        gathers = [t for t in int4_targets if t.kind == "gather"]
        hot_rows = indexed_rows(model, gathers, calibration) if (calibration and splits and gathers) else {}
        nodes = list(model.graph)
        positions = {node_label(n, i): i for i, n in enumerate(nodes)}
        result = Applicable({}, {}, skipped_rows=[dict(row) for row in skipped8])
        for row in skipped8:
            if row.get("layer") in positions:
                result.skipped[positions[row["layer"]]] = row["skipped"]
        for t in int8_targets:
            node, index = t.node, t.index
            if not node.name:
                result.skipped_rows.append({"layer": t.label, "op": node.op_type, "skipped": UNNAMED})
                result.skipped[index] = UNNAMED
                continue
            view = _view(index, node, t.weight)
            quants = [q for q in plain if q.kind == "int8" or index in int4_ok]
            if index not in int4_ok and any(q.kind != "int8" for q in parsed):
                result.skipped[index] = "int4: " + int4_refused.get(t.label, "not accepted by qdq(mode=int4)")
            if node.op_type == "Gather" and view.shape[1] % 2:
                quants = [q for q in quants if q.kind == "int8"]
            chosen = useful_options(view, quants)
            hot = hot_rows.get(index)
            if hot is not None and 0 < hot.size < view.shape[0] and view.shape[1] % 4 == 0:
                view.hot = hot
                smallest = min((layer_bytes(view, q) for q in chosen), default=float("inf"))
                chosen += [q for q in dict.fromkeys(splits) if split_bytes(view, q) < smallest]
            if chosen:
                result.layers[index] = view
                result.options[index] = [str(q) for q in chosen]
            elif index not in result.skipped:
                result.skipped[index] = "none of the options applies"
        return result

    def stored_bytes(self, layer: LayerView, option: str, then: tuple[Any, str] | None = None) -> int:
        if then is not None:
            raise ValueError("qdq stores weights itself: then= is for structural planners")
        return layer_bytes(layer, QuantOption.parse(option))

    def matrix_bytes(self, shape: tuple[int, int], option: str) -> int:
        return weight_bytes("matmul", tuple(shape), QuantOption.parse(option))

    def __init__(self) -> None:
        # GPTQ factors by (layer input, factor size): the layers reading one input (fused q/k/v; gate and up) and
        # the options of one size (int8 and int4 blocks dividing K) share one, as in the pass's plan
        self._factors: dict[tuple[str, int], Factor] = {}

    def reconstruct(self, layer: LayerView, option: str, stats: InputStats | None,
                    then: tuple[Any, str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight in the node's layout, None): qdq changes no bias. ``stats``: GPTQ rounds MatMul/Gemm weights
        against the input's second moment, as the pass does with calibration data (None: MSE clip search)."""
        if then is not None:
            raise ValueError("qdq stores weights itself: then= is for structural planners")
        q = QuantOption.parse(option)
        if layer.op in ("Conv", "Gather"):
            return quantized_other(layer, q).astype(np.float32), None
        return self.reconstruct_compact(layer, option, stats).dense(), None

    def reconstruct_compact(self, layer: LayerView, option: str, stats: InputStats | None) -> QuantizedMatrix | None:
        """``reconstruct``'s weight of a MatMul/Gemm as its codes (``QuantizedMatrix``: ``dense()`` is the weight,
        in a quarter of its bytes); None for Conv and Gather layers (``reconstruct`` gives their float weight)."""
        q = QuantOption.parse(option)
        if layer.op in ("Conv", "Gather"):
            return None
        factor = None
        if stats is not None and layer.x is not None:
            key = (layer.x, gptq_factor_key(layer.matrix.shape[0], q))
            factor = self._factors.get(key)
            if factor is None:
                factor = self._factors[key] = gptq_factor(stats.second_moment, q)
        compact = quantized_codes(layer.matrix, q, None, factor)
        compact.transposed = bool(layer.trans_b)
        return compact

    def activation_block(self, layer: LayerView, option: str) -> int | None:
        """The block size in which the rewritten layer quantizes its input to int8 when onnxruntime runs it, or None.

        ``int4/B`` on a MatMul/Gemm is MatMulNBits, whose default ``accuracy_level=4`` computes with the input
        quantized per row in blocks of ``B`` (symmetric, max/127); ``int8`` on a MatMul is DequantizeLinear +
        MatMul, which onnxruntime's CPU session may fuse into MatMulNBits(bits=8) at accuracy_level 4 with blocks
        of 32 (both measured bit-exact against that fake quantization; ``activation_block_measured``). On a SmolLM2 mixed build this was +20% on
        the perplexity increase that a simulation with the dequantized weights alone did not see."""
        q = QuantOption.parse(option)
        if q.kind == "int8":
            return ORT_INT8_MATMUL_BLOCK if layer.op == "MatMul" else None
        if q.kind != "int4" or layer.op not in ("MatMul", "Gemm") or QdqOptions().accuracy_level != 4:
            return None
        return q.block

    def activation_block_measured(self, option: str) -> bool:
        """Whether ``activation_block`` of ``option`` depends on the session's fusions (int8: onnxruntime fused it
        on SmolLM2's graph and on one-MatMul graphs, not on the budget tests' MLP), so that the search must check it
        on the model once (``BudgetSearch.check_runtime_quantization``); int4 is MatMulNBits itself."""
        return QuantOption.parse(option).kind == "int8"

    @property
    def held_factors(self) -> list[tuple[str, int]]:
        """The (layer input, size) of the GPTQ factors held now (sorted)."""
        return sorted(self._factors)

    def release(self, input_name: str) -> None:
        """Forget the GPTQ factors of the layer input ``input_name`` (its last reader is reconstructed)."""
        for key in [k for k in self._factors if k[0] == input_name]:
            del self._factors[key]

    def reconstruct_matrix(self, w: np.ndarray, option: str, hessian: np.ndarray | None) -> np.ndarray:
        return quantized_matrix(w, QuantOption.parse(option), hessian)

    def predicted_error(self, layer: LayerView, option: str, stats: InputStats) -> float | None:
        return None  # the reconstruction is cheap; the search measures it

    def passes(self, model: ir.Model, option: str, names: Sequence[str]) -> list[Qdq]:
        """One ``qdq`` that quantizes exactly the weights of the nodes ``names`` as ``option`` (its ``include`` or
        ``exclude``, whichever is shorter, leaves every other node qdq would take in float)."""
        q = QuantOption.parse(option)
        wanted = list(dict.fromkeys(names))
        ops = {n.name: n.op_type for n in model.graph if n.name}
        settings = mode_options(q, gather=any(ops.get(n) == "Gather" for n in wanted))
        targets, _ = find_targets(model, QdqOptions(**settings))
        # include/exclude match labels: an unnamed node can be left out by its label (its output's name)
        target_names = [(t.label, t.node.op_type) for t in targets]
        missing = set(wanted) - {n for n, _ in target_names}
        if missing:
            raise ValueError(f"qdq({settings}) would not quantize {sorted(missing)}")
        excluded = [n for n, _ in target_names if n not in set(wanted)]
        if excluded:
            settings.update(selection(wanted, excluded, target_names))
        return [Qdq(**settings)]

    def rewritten(self, done: Any) -> set[str]:
        """The layers a ``qdq`` from ``passes`` quantized, from its report rows."""
        return {row["layer"] for row in done.details if "skipped" not in row and "bytes_after" in row}

    def heldout_check(self, model: ir.Model, layer: LayerView, option: str, feeds: Sequence[Feed]) -> dict[str, Any] | None:
        """How well a fit-dependent option holds on other data: ``split/H/C`` stores the rows the calibration data
        indexed at 4 bits and the others at 2; on ``feeds`` (held-out data) count the index occurrences that fall
        in 2-bit rows. None for the other options (they depend on the data only through statistics)."""
        if QuantOption.parse(option).kind != "split" or layer.hot is None:
            return None
        name = list(model.graph)[layer.index].inputs[1].name
        values = [v[name] for v in index_values(model, feeds, [name])]
        hot = np.zeros(layer.w.shape[0], bool)
        hot[layer.hot] = True
        cold = total = 0
        for v in values:
            idx = np.asarray(v).ravel().astype(np.int64)
            idx = np.where(idx < 0, idx + hot.size, idx)
            total += idx.size
            cold += int((~hot[idx]).sum())
        return {"layer": layer.name, "held_out_cold_occurrences": cold, "held_out_occurrences": total,
                "misfit": cold / max(1, total), "what": "held-out token occurrences in 2-bit rows"}
