"""Which layers the ``prune`` pass can touch, read from the graph (nothing here changes it).

- :func:`classify_layer`: a MatMul/Gemm/Conv with a float constant weight of its own, or why not; the
  unstructured path wraps it as a :class:`Layer` (its weight seen as [K, N]).
- :func:`trace_block`: for structured pruning, the block ``W1 -> unit-wise ops -> W2`` that starts at a
  layer: every node and value that carries its hidden units and the layers that read them (the consumers
  that shrink with it), or the reason the units cannot be removed safely.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxpress.passes.graph_utils import const_array

_QUANT_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "MatMulInteger", "QGemm", "QLinearMatMul"}
_UNARY = {
    "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign",
    "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Identity", "Celu", "ThresholdedRelu", "Sign",
    "Floor", "Ceil", "Round", "Cast", "Clip",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
_POOL = {"MaxPool", "AveragePool", "LpPool"}  # channel-wise: allowed in Conv blocks


def is_plain(node: ir.Node) -> bool:
    """Whether ``node`` is in the default ONNX domain (custom-domain ops are never pruned or looked through)."""
    return node.domain in ("", "ai.onnx")


# -- layers of unstructured pruning ---------------------------------------------------------------------
@dataclasses.dataclass
class Layer:
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
        """A [K, N] matrix back in the stored layout of this layer's weight."""
        if self.kind == "Conv":
            return mat.T.reshape(self.array.shape)
        return mat.T if self.trans else mat


def classify_layer(node: ir.Node, min_size: int) -> tuple[np.ndarray, bool] | str:
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


# -- structured blocks: W1 -> unit-wise ops -> W2 -------------------------------------------------------
@dataclasses.dataclass
class Block:
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


@dataclasses.dataclass
class _Walk:
    """What a breadth-first walk from the start layer's output found."""

    region: list[ir.Node]
    values: list[ir.Value]
    terminals: list[tuple[ir.Node, ir.Value]]  # (layer reading the units, the value it reads)


def unit_rows(kind: str, array: np.ndarray, trans: bool, role: str) -> np.ndarray:
    """Per-unit slices of a weight as rows [units, -1]: role 'in' (start: units are outputs), 'out' (terminal)."""
    if kind == "Conv":
        return array.reshape(array.shape[0], -1) if role == "in" else np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
    mat = array.T if trans else array  # [K, N]
    return mat.T if role == "in" else mat


def trace_block(start: ir.Node, label: str, min_size: int) -> Block | str:
    """The block whose hidden units are the outputs of ``start``, or why it cannot shrink ('' = silently)."""
    found = classify_layer(start, min_size)
    if isinstance(found, str):
        return found
    w1, trans1 = found
    conv = start.op_type == "Conv"
    if conv and start.attributes.get_int("group", 1) != 1:
        return "grouped Conv (only group=1 channels are removed)"
    units = int(w1.shape[0]) if conv else int((w1.T if trans1 else w1).shape[1])
    unit_from_right = -(w1.ndim - 1) if conv else -1
    if len(start.outputs) != 1:
        return ""
    walk = _walk_units(start.outputs[0], conv, units, unit_from_right)
    if isinstance(walk, str):
        return walk
    reason = _region_reads_elsewhere(walk)
    if reason:
        return reason
    acts = {id(v): v for _, v in walk.terminals}
    if len(acts) != 1:
        return "the units reach the next layers through different values"
    act = next(iter(acts.values()))
    order = {id(n): i for i, n in enumerate(start.graph)} if start.graph is not None else {}
    walk.region.sort(key=lambda n: order.get(id(n), 0))
    block = Block(start, label, conv, units, unit_from_right, walk.region, walk.values, act, [t for t, _ in walk.terminals], w1, trans1)
    return _attach_terminal_weights(block) or block


def _walk_units(out0: ir.Value, conv: bool, units: int, unit_from_right: int) -> _Walk | str:
    """Every node reading the units, breadth first from ``out0``: unit-wise ops join the region (and their
    outputs are walked too), layers reducing over the units are terminals; anything else is a reason."""
    walk = _Walk([], [out0], [])
    region_ids: set[int] = set()
    value_ids = {id(out0)}
    queue = [out0]
    while queue:
        v = queue.pop(0)
        if v.is_graph_output():
            return f"'{v.name}' is a graph output"
        for user, index in v.uses():
            if id(user) in region_ids or any(t is user for t, _ in walk.terminals):
                continue
            if not is_plain(user):
                return f"{user.domain}::{user.op_type} '{user.name}' reads the units"
            if _terminal(user, index, conv):
                walk.terminals.append((user, v))
                continue
            reason = _unit_wise_reason(user, index, conv, units, unit_from_right)
            if reason:
                return reason
            walk.region.append(user)
            region_ids.add(id(user))
            for out in user.outputs:
                if id(out) not in value_ids:
                    walk.values.append(out)
                    value_ids.add(id(out))
                    queue.append(out)
    if not walk.terminals:
        return "no MatMul/Gemm/Conv with a constant weight reads the units"
    return walk


def _unit_wise_reason(user: ir.Node, index: int, conv: bool, units: int, unit_from_right: int) -> str:
    """Why ``user`` (reading the units as input ``index``) is not a unit-wise op; '' when it is one."""
    op = user.op_type
    if op in _POOL and conv and index == 0 and len(user.outputs) == 1:
        return ""
    if op == "BatchNormalization" and conv and index == 0 and len(user.outputs) == 1:
        for j in range(1, 5):
            p = const_array(user.inputs[j]) if j < len(user.inputs) else None
            if p is None or p.shape != (units,):
                return f"BatchNormalization '{user.name}' has non-constant or mis-shaped parameters"
        return ""
    if op in _UNARY or op in _BINARY:
        for j, inp in enumerate(user.inputs):
            if inp is None or j == index:
                continue
            c = const_array(inp)
            if c is None:
                continue  # must be another unit value: checked by _region_reads_elsewhere
            if op in ("Clip",) and j > 0:
                if c.size != 1:
                    return f"Clip '{user.name}' with non-scalar bounds"
                continue
            if not _unit_slice_ok(c, units, unit_from_right):
                return f"{op} '{user.name}' mixes units with a constant of shape {list(c.shape)}"
            if op == "PRelu" and c.size != 1 and c.ndim != -unit_from_right:
                return f"PRelu '{user.name}' slope of shape {list(c.shape)}"
        return ""
    reason = "reads the units" if index == 0 else f"reads the units as input {index}"
    return f"{op} '{user.name}' {reason}"


def _region_reads_elsewhere(walk: _Walk) -> str:
    """Every non-constant input of a region node must carry the units too; else the reason ('' when fine)."""
    value_ids = {id(v) for v in walk.values}
    for node in walk.region:
        for inp in node.inputs:
            if inp is not None and const_array(inp) is None and id(inp) not in value_ids:
                return f"{node.op_type} '{node.name}' combines the units with '{inp.name}', which comes from elsewhere"
    return ""


def _attach_terminal_weights(block: Block) -> str:
    """Fill ``block.w2s`` with the terminals' weights (as stored, transB); a reason when one does not fit."""
    for t in block.terminals:
        w2 = const_array(t.inputs[1])
        trans = t.op_type == "Gemm" and bool(t.attributes.get_int("transB", 0))
        rows = w2.shape[1] if t.op_type == "Conv" else (w2.T if trans else w2).shape[0]
        if rows != block.units:
            return f"{t.op_type} '{t.name}' reads {rows} units, not {block.units}"
        if len(t.inputs[1].uses()) > 1 or t.inputs[1].is_graph_output():
            return f"weight of '{t.name}' is shared with other nodes"
        block.w2s.append((w2, trans))
    return ""


def _unit_slice_ok(array: np.ndarray, units: int, unit_from_right: int) -> str:
    """'scalar', 'unit' (per-unit broadcast vector) or '' (would mix or misalign units)."""
    if array.size == 1:
        return "scalar"
    if array.ndim >= -unit_from_right and array.shape[unit_from_right] == units and array.size == units:
        return "unit"
    return ""


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
