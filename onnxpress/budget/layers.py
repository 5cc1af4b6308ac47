"""The budget's layers, their candidates, exact stored bytes and reconstructed weights.

A *layer* is one node with a constant float weight that a lossy pass can rewrite: MatMul, Gemm, Conv, and
Gather of an embedding table. A *choice* is what the search may do to it: quantize (int8 per channel,
int4 block-wise; an embedding table also split: the rows the calibration data indexes int4, the others
2-bit), factorize (calibrated low-rank at a ratio) and then quantize the factors. For every
choice this module computes

- the bytes the rewritten weight takes in the saved model (the same layout the passes write), and
- the *reconstruction*: the dense float weight the rewritten layer computes with (``U @ V``,
  ``dequant(quant(W))``), plus the output bias a calibrated factorization adds.

Feeding the reconstruction to the original graph reproduces the rewritten model's output up to float
rounding, which is what makes the sensitivity analysis cheap (``onnxpress.budget.simulate``).

The maths is not re-implemented here: spectra, factors and bias correction come from
``onnxpress.passes.factorize``, scales/codes/GPTQ from ``onnxpress.passes.quant_math``, and which nodes
each pass accepts from the passes' own target finders, so the search never plans a rewrite a pass refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes import factorize as fz
from onnxpress.passes import qdq as qdq_pass
from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import InputStats, collect_input_stats, damped
from onnxpress.passes.graph_utils import existing_bias, node_label

# the quantizations of the default grid ("int4/B": blocks of B); a block size is tried on a layer only where
# it stores fewer bytes than the smaller ones (K = 384 pads blocks of 256 to 512: more bytes, more error)
QUANTS = ("int8", "int4/32", "int4/128", "int4/256", "int4/512")
MATMUL_MAX_BLOCK = 256  # MatMulNBits' CPU kernels take blocks of 16..256; GatherBlockQuantized takes larger
RATIOS = (0.5, 0.3, 0.2, 0.1, 0.05)  # calibrated factorization ratios of the default grid
FACTOR_QUANTS = ("int8", "int4/32")  # how the factors of a factorized layer are quantized
# embedding tables: rows the calibration data indexes at int4/H, all others 2-bit/C ("split/H/C")
SPLITS = ("split/32/128", "split/64/128", "split/128/128")
FACTORIZE_MIN_SIZE = fz.FactorizeOptions().min_size
FACTORIZE_DAMPING = fz.FactorizeOptions().damping
FACTORIZE_CENTER = fz.FactorizeOptions().center


# =====================================================================================================
# Choices
# =====================================================================================================
@dataclasses.dataclass(frozen=True, order=True)
class Choice:
    """What is done to one layer: factorize at ``ratio`` (None: no), then quantize with ``quant`` (None: float)."""

    ratio: float | None = None
    quant: str | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.ratio is not None:
            parts.append(f"lowrank {self.ratio:g}")
        if self.quant is not None:
            parts.append(self.quant)
        return " + ".join(parts) or "fp32"

    @property
    def block(self) -> int | None:
        return int(self.quant.split("/")[1]) if self.quant and self.quant.startswith(("int4", "split")) else None

    @property
    def cold_block(self) -> int | None:
        """split/H/C: the block size of the 2-bit rows."""
        return int(self.quant.split("/")[2]) if self.quant and self.quant.startswith("split") else None

    @property
    def technique(self) -> str:
        """A coarse family for colours in the plot."""
        if self.ratio is None:
            return self.quant or "fp32"
        return f"lowrank+{self.quant.split('/')[0]}" if self.quant else "lowrank"


FP32 = Choice()


@dataclasses.dataclass(frozen=True)
class Grid:
    """The candidates tried per layer (each applied alone in the sensitivity analysis)."""

    quants: tuple[str, ...] = QUANTS
    splits: tuple[str, ...] = SPLITS  # embedding tables only, where calibration data shows which rows are used
    ratios: tuple[float, ...] = RATIOS
    factor_quants: tuple[str, ...] = FACTOR_QUANTS
    factorize_float: bool = False  # also try factorization without quantizing the factors
    # a layer's smaller ratios are not tried once a ratio's error alone (d) exceeds this: such a layer is
    # already past what any useful budget allows, and each candidate costs a model run
    max_layer_error: float = 0.03

    def __post_init__(self) -> None:
        for q in (*self.quants, *self.factor_quants):
            if q != "int8" and not (q.startswith("int4/") and q[5:].isdigit() and int(q[5:]) >= 16 and not int(q[5:]) & (int(q[5:]) - 1)):
                raise ValueError(f"unknown quantization '{q}' (valid: int8, int4/B with B a power of 2 >= 16)")
        for q in self.splits:
            parts = q.split("/")
            if len(parts) != 3 or parts[0] != "split" or not all(p.isdigit() and int(p) >= 16 and not int(p) & (int(p) - 1) for p in parts[1:]):
                raise ValueError(f"unknown split '{q}' (valid: split/H/C, H and C powers of 2 >= 16)")
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"factorization ratio {r} must be in (0, 1)")


# =====================================================================================================
# Layers
# =====================================================================================================
@dataclasses.dataclass
class Layer:
    """One rewritable node. ``w`` is the weight as the node stores it (Gemm transB: N x K)."""

    index: int  # position in graph order
    name: str  # node name (the key in pipeline options)
    op: str  # MatMul, Gemm, Conv, Gather
    weight: str  # initializer name
    w: np.ndarray
    trans_b: bool = False  # Gemm transB=1: stored N x K
    x: str | None = None  # activation input name (MatMul/Gemm)
    has_bias: bool = False
    choices: list[Choice] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # technique -> reason
    hot: np.ndarray | None = None  # Gather: the rows the calibration data indexes (split choices)

    @property
    def matrix(self) -> np.ndarray:
        """MatMul layout [K, N] (input features x output features)."""
        return self.w.T if self.trans_b else self.w

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def fp32_bytes(self) -> int:
        return int(self.w.size * 4)


def find_layers(model: ir.Model, grid: Grid, calibration: Sequence[dict[str, np.ndarray]] | None = None) -> tuple[list[Layer], list[dict[str, Any]]]:
    """The layers of ``model`` with the choices of ``grid`` that the passes accept for each.

    Applicability comes from the passes' own target finders: qdq's ``find_targets`` (int8: weight mode,
    int4: int4 mode) and factorize's layer classifier (2-D weight, not shared, big enough, a rank saves).
    A node must be named (the pipeline options select layers by name). With ``calibration``, embedding
    tables also get the split choices (the rows it indexes stay 4-bit, as ``qdq(embedding_split=true)``).
    """
    int8_targets, skipped8 = qdq_pass.find_targets(model, qdq_pass.QdqOptions(mode="weight"))
    int4_targets, skipped4 = qdq_pass.find_targets(model, qdq_pass.QdqOptions(mode="int4"))
    by_index8 = {t.index: t for t in int8_targets}
    int4_ok = {t.index for t in int4_targets}
    gathers = [t for t in int4_targets if t.kind == "gather"]
    hot_rows = qdq_pass.indexed_rows(model, gathers, calibration) if (calibration and grid.splits and gathers) else {}
    skipped: list[dict[str, Any]] = [dict(row) for row in skipped8]
    layers: list[Layer] = []
    for index, node in enumerate(model.graph):
        t = by_index8.get(index)
        if t is None:
            continue
        label = node_label(node, index)
        if not node.name:
            skipped.append({"layer": label, "op": node.op_type, "skipped": "unnamed node (pipeline options select layers by name)"})
            continue
        w = t.weight.const_value.numpy()
        trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        layer = Layer(index, node.name, node.op_type, t.weight.name, np.asarray(w, np.float32), trans_b=trans_b)
        if node.op_type in ("MatMul", "Gemm"):
            layer.x = node.inputs[0].name
            # factorize folds its bias correction into an existing bias, else it adds one (stored bytes)
            layer.has_bias = existing_bias(node, layer.matrix.shape[1]) is not None
        quants = [q for q in grid.quants if q == "int8" or index in int4_ok]
        if index not in int4_ok and any(q != "int8" for q in grid.quants):
            layer.skipped["int4"] = next((row["skipped"] for row in skipped4 if row.get("layer") == node_label(node, index)), "not accepted by qdq(mode=int4)")
        if node.op_type == "Gather" and w.shape[1] % 2:
            quants = [q for q in quants if q == "int8"]
        layer.choices = [Choice(None, q) for q in useful_quants(layer, quants)]
        hot = hot_rows.get(index)
        if hot is not None and 0 < hot.size < w.shape[0] and w.shape[1] % 4 == 0:
            layer.hot = hot
            smallest = min((choice_bytes(layer, c) for c in layer.choices), default=float("inf"))
            layer.choices += [Choice(None, q) for q in grid.splits if choice_bytes(layer, Choice(None, q)) < smallest]
        if node.op_type in ("MatMul", "Gemm"):
            found = fz.classify(node, FACTORIZE_MIN_SIZE)
            if isinstance(found, str):
                layer.skipped["lowrank"] = found or f"fewer than {FACTORIZE_MIN_SIZE} parameters"
            elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                layer.skipped["lowrank"] = "Gemm with transA=1"
            else:
                k, n = layer.matrix.shape
                for r in grid.ratios:
                    if fz.rank_for_ratio(k, n, r) * (k + n) >= k * n:
                        continue
                    if grid.factorize_float:
                        layer.choices.append(Choice(r, None))
                    # Factors are quantized as qdq sees them after factorize: U (K x r) and V (r x N) are MatMul/Gemm weights.
                    for q in grid.factor_quants:
                        if q == "int8" or index in int4_ok:
                            layer.choices.append(Choice(r, q))
        if layer.choices:
            layers.append(layer)
    return layers, skipped


def useful_quants(layer: Layer, quants: Sequence[str]) -> list[str]:
    """The quantizations worth measuring on ``layer``: int4 block sizes the op's kernel takes, each storing
    fewer bytes than every smaller block size (a larger block only ever adds error)."""
    out: list[str] = []
    smallest = float("inf")
    for q in sorted(quants, key=lambda q: (q != "int8", int(q.split("/")[1]) if "/" in q else 0)):
        if q == "int8":
            out.append(q)
            continue
        block = int(q.split("/")[1])
        if layer.op != "Gather" and block > MATMUL_MAX_BLOCK:
            continue
        nbytes = choice_bytes(layer, Choice(None, q))
        if nbytes < smallest:
            out.append(q)
            smallest = nbytes
    return out


# =====================================================================================================
# Statistics of layer inputs (one run over the calibration data)
# =====================================================================================================
def split_coverage(model: ir.Model, layer: Layer, feeds: Sequence[dict[str, np.ndarray]]) -> tuple[int, int]:
    """(index occurrences in rows the split stores in 2 bits, all index occurrences) of an embedding layer
    whose hot rows came from the calibration data, counted on ``feeds`` (the held-out data)."""
    from onnxpress import runtime

    node = list(model.graph)[layer.index]
    name = node.inputs[1].name
    graph_inputs = {v.name for v in model.graph.inputs}
    values = [f[name] for f in feeds] if name in graph_inputs else [c[name] for c in runtime.capture(model, list(feeds), [name])]
    hot = np.zeros(layer.w.shape[0], bool)
    hot[layer.hot] = True
    cold = total = 0
    for v in values:
        idx = np.asarray(v).ravel().astype(np.int64)
        idx = np.where(idx < 0, idx + hot.size, idx)
        total += idx.size
        cold += int((~hot[idx]).sum())
    return cold, total


# =====================================================================================================
# Exact stored bytes
# =====================================================================================================
def quant_bytes(kind: str, shape: tuple[int, ...], quant: str | None) -> int:
    """Bytes of one weight as the qdq pass stores it (codes + scales + zero points).

    kind: ``matmul`` (shape K x N, channels N), ``gemm_t`` (N x K, channels N), ``conv`` (channels = axis 0),
    ``gather`` (V x D, one scale per row).
    """
    size = int(np.prod(shape))
    if quant is None:
        return 4 * size
    if kind == "gather":
        v, d = shape
        if quant == "int8":
            return v * d + 4 * v  # int8 codes + one float scale per row
        return qm.rows_blockwise_bytes(v, d, 4, int(quant.split("/")[1]))  # GatherBlockQuantized
    if kind == "conv":
        channels = shape[0]
    elif kind == "gemm_t":
        channels = shape[0]
    else:
        channels = shape[1]
    if quant == "int8":
        return size + 4 * channels + channels  # uint8 codes, float scale and uint8 zero point per channel
    k = size // channels
    b = int(quant.split("/")[1])
    kb = -(-k // b)
    return channels * kb * (b // 2) + 4 * channels * kb + channels * (-(-kb // 2))  # MatMulNBits: padded blob, scales, packed zps


def choice_bytes(layer: Layer, choice: Choice) -> int:
    kind = {"MatMul": "matmul", "Gemm": "gemm_t" if layer.trans_b else "matmul", "Conv": "conv", "Gather": "gather"}[layer.op]
    if choice.cold_block is not None:
        return qm.split_rows_bytes(layer.shape[0], layer.shape[1], layer.hot.size, choice.block, choice.cold_block)
    if choice.ratio is None:
        return quant_bytes(kind, layer.shape, choice.quant)
    k, n = layer.matrix.shape
    r = fz.rank_for_ratio(k, n, choice.ratio)
    # factorize writes U (K x r) and V (r x N) in MatMul layout (Gemm transB is dropped), then qdq stores each;
    # its bias correction is a new float bias unless it folds into an existing one
    bias = 0 if (layer.has_bias or not FACTORIZE_CENTER) else 4 * n
    return quant_bytes("matmul", (k, r), choice.quant) + quant_bytes("matmul", (r, n), choice.quant) + bias


# =====================================================================================================
# Reconstructions: the dense weight a rewritten layer computes with
# =====================================================================================================
def _pad_hessian(h: np.ndarray, block: int) -> np.ndarray:
    pad = (-h.shape[0]) % block
    return np.pad(h, ((0, pad), (0, pad))) if pad else h


def quantized_matrix(w: np.ndarray, quant: str, hessian: np.ndarray | None) -> np.ndarray:
    """dequant(quant(W)) for a MatMul-layout ``W [K, N]`` as ``qdq(mode=weight|int4)`` computes it
    (GPTQ with the layer input's ``X^T X`` when given, else the MSE clip search)."""
    w = np.asarray(w, np.float32)
    if quant == "int8":
        if hessian is not None:
            q, scale = qm.gptq_per_channel(w, hessian, 127, per_channel=True)
        else:
            q, scale = qm.quantize_weight(w, 1, 127, "mse")
        return qm.dequantize(q, scale[None, :])
    block = int(quant.split("/")[1])
    h = qm.gptq_inverse(_pad_hessian(hessian, block)) if hessian is not None else None
    codes, scales, zps = qm.quantize_blockwise(w, block, 4, False, clip="mse", hessian=h)
    return qm.dequantize_blockwise(codes, scales, zps, block)


def quantized_other(layer: Layer, quant: str) -> np.ndarray:
    """dequant(quant(W)) of a Conv weight or an embedding table, in the node's layout."""
    w = layer.w
    if layer.op == "Conv":
        q, scale = qm.quantize_weight(w, 0, 127, "mse")
        return qm.dequantize(q, qm.per_axis_shape(scale, w.ndim, 0))
    if quant == "int8":  # Gather: one scale per row
        q, scale = qm.quantize_weight(w, 0, 127, "mse")
        return qm.dequantize(q, scale.reshape(-1, 1))
    choice = Choice(None, quant)
    if choice.cold_block is not None:
        return qm.dequantize_split_rows(qm.quantize_split_rows(w, layer.hot, choice.block, choice.cold_block), choice.block, choice.cold_block)
    block = int(quant.split("/")[1])
    return qm.dequantize_rows_blockwise(*qm.quantize_rows_blockwise(w, block, 4, False, "mse"), block)


@dataclasses.dataclass
class Spectra:
    """Per-layer calibrated spectrum (computed once, shared by every ratio)."""

    cache: dict[str, fz.Spectrum] = dataclasses.field(default_factory=dict)

    def of(self, layer: Layer, stats: InputStats) -> fz.Spectrum:
        sp = self.cache.get(layer.name)
        if sp is None:
            s = fz.centered(stats.second_moment, stats.mean) if FACTORIZE_CENTER else stats.second_moment
            sp = fz.spectrum(layer.matrix, damped(s, FACTORIZE_DAMPING))
            self.cache[layer.name] = sp
        return sp


def output_energy(layer: Layer, stats: InputStats) -> float:
    """tr(W^T S W): the layer's mean squared output (S the input second moment), the scale of local errors."""
    w = layer.matrix.astype(np.float64)
    return float(np.einsum("kn,kn->", w, np.asarray(stats.second_moment, np.float64) @ w))


def local_error(layer: Layer, weight: np.ndarray, stats: InputStats) -> float:
    """The layer's own relative output error of a reconstruction: tr(D^T S D) / tr(W^T S W), D = W' - W
    (``weight`` in the node's layout). Cheap (no model run): the sensitivity analysis scales it into a
    prediction of the model-output error."""
    return qm.relative_output_error(layer.matrix, weight.T if layer.trans_b else weight, stats.second_moment) ** 2


def lowrank_tail(layer: Layer, stats: InputStats, spectra: Spectra, ratio: float) -> float:
    """The local error of calibrated factorization at ``ratio`` before its factors are quantized: the output
    energy of the discarded directions (squared singular values past the rank; the bias correction removes
    the mean part) relative to tr(W^T S W)."""
    k, n = layer.matrix.shape
    s = spectra.of(layer, stats).s.astype(np.float64)
    return float(np.sum(s[fz.rank_for_ratio(k, n, ratio) :] ** 2)) / max(output_energy(layer, stats), 1e-30)


def reconstruct(layer: Layer, choice: Choice, stats: InputStats | None, spectra: Spectra) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight in the node's layout, output bias delta or None) of ``layer`` rewritten by ``choice``."""
    if choice == FP32:
        return layer.w, None
    if layer.op in ("Conv", "Gather"):
        return quantized_other(layer, choice.quant).astype(np.float32), None
    h = stats.second_moment if stats is not None else None
    w = layer.matrix
    delta = None
    if choice.ratio is None:
        out = quantized_matrix(w, choice.quant, h)
    else:
        if stats is None:
            raise ValueError("a calibrated factorization needs the layer input statistics")
        k, n = w.shape
        sp = spectra.of(layer, stats)
        u, v = fz.factors(w, sp, fz.rank_for_ratio(k, n, choice.ratio))
        if FACTORIZE_CENTER:
            delta = fz.bias_correction(w, u, v, stats.mean).astype(np.float32).reshape(-1)
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        if choice.quant is not None:
            # qdq runs after factorize: U sees x (second moment S), V sees x U (second moment U^T S U)
            hv = u32.astype(np.float64).T @ h @ u32.astype(np.float64)
            u32 = quantized_matrix(u32, choice.quant, h)
            v32 = quantized_matrix(v32, choice.quant, hv)
        out = u32.astype(np.float64) @ v32.astype(np.float64)
    out = np.asarray(out, np.float32)
    return (np.ascontiguousarray(out.T) if layer.trans_b else out), delta
