"""What ``factorize`` rewrites: MatMul/Gemm nodes with a constant 2-D float weight (``classify``), group-1
Conv filter banks (``classify_conv``), and the groups of layers that share one U (``group_targets``).

A classifier returns what the rewrite needs, or a string saying why the node is left alone (empty: silently,
e.g. a layer too small to be worth a report row).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxpress.passes.factorize.maths import breakeven_rank

MARK = "onnxpress.factorize"  # node metadata key set on both products of a factorized layer
FLOAT = ir.DataType.FLOAT
QUANT_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "MatMulInteger", "QGemm", "QLinearMatMul"}
_QUANTIZED = "already quantized (weight behind DequantizeLinear): run factorize before qdq"


@dataclasses.dataclass
class Target:
    """One MatMul/Gemm layer to factorize."""

    node: ir.Node
    label: str
    w: np.ndarray  # K x N, the effective weight of x @ W
    weight: ir.Value  # the node's weight input (initializer, Constant output or Transpose output)
    x: ir.Value  # the activation input
    trans_x: bool  # Gemm transA: rows of the input are columns of A


@dataclasses.dataclass
class Group:
    """Layers factorized together: one layer, or (share=true) every layer reading the same input, which
    then share one U: x -> MatMul(x, U) -> MatMul(., V_i). Its weight is [W_1 ... W_n] (K x sum N_i)."""

    members: list[Target]

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


def group_targets(targets: list[Target], share: bool) -> list[Group]:
    """One group per target, or (``share``) one per (input, transA, MatMul/Gemm): those share one U."""
    if not share:
        return [Group([t]) for t in targets]
    groups: dict[tuple[str, bool, str], Group] = {}
    for t in targets:
        key = (t.x.name, t.trans_x, "Gemm" if t.node.op_type == "Gemm" else "MatMul")
        groups.setdefault(key, Group([])).members.append(t)
    return list(groups.values())


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def constant_matrix(value: ir.Value | None) -> tuple[np.ndarray | None, str]:
    """The 2-D float constant behind ``value`` (initializer or Constant, optionally through a Transpose)."""
    if value is None:
        return None, ""
    prod = _producer(value)
    if prod is not None and prod.op_type in QUANT_OPS:
        return None, _QUANTIZED
    transpose = False
    source = value
    if prod is not None and prod.op_type == "Transpose" and prod.domain in ("", "ai.onnx"):
        perm = prod.attributes.get_ints("perm", None)
        if perm is not None and list(perm) != [1, 0]:
            return None, ""
        inner = _producer(prod.inputs[0])
        if inner is not None and inner.op_type in QUANT_OPS:
            return None, _QUANTIZED
        source, transpose = prod.inputs[0], True
    if source is None or (source.is_graph_input() and source.const_value is None):
        return None, ""
    if source.is_graph_input():
        return None, "weight is a graph input (can be overridden at run time)"
    tensor = ir.convenience.get_const_tensor(source)
    if tensor is None:
        return None, ""
    if tensor.dtype != FLOAT:
        return None, f"weight of type {tensor.dtype.name} (float32 only)"
    array = tensor.numpy()
    if array.ndim != 2:
        return None, f"weight of rank {array.ndim} (2-D weights only)"
    return (array.T if transpose else array), ""


def classify(node: ir.Node, min_size: int) -> tuple[np.ndarray, ir.Value, bool] | str:
    """(effective weight K x N, activation input, Gemm transA) of a MatMul/Gemm ``factorize`` accepts, or
    why not ('': silently)."""
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None:
        return ""
    x = inputs[0]
    if x.dtype is not None and x.dtype != FLOAT:
        return ""
    array, reason = constant_matrix(inputs[1])
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


def classify_conv(node: ir.Node, min_size: int) -> np.ndarray | str:
    """The float filter bank [O, C, kh, kw] of a group-1 2-D Conv, or why it is skipped ('' : silently)."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return ""
    weight = node.inputs[1]
    tensor = weight.const_value if weight.is_initializer() and not weight.is_graph_input() else None
    if tensor is None or tensor.dtype != FLOAT:
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
