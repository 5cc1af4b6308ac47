"""Graph surgery of the ``prune`` pass: write a pruned weight back, or shrink a structured block.

Nothing here decides what to prune (see ``plan``); it only writes the decisions into the graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxpress.passes.graph_utils import add_bias, const_array, set_const
from onnxpress.passes.prune.structure import Block, Layer

UNITS_MARK = "onnxpress.prune.units"  # node metadata on the first layer of a structurally pruned block
INPUTS_MARK = "onnxpress.prune.inputs"  # and on the layers that read its units


def write_weight(graph: ir.Graph, layer: Layer, mat: np.ndarray) -> None:
    """Replace the layer's weight by the [K, N] matrix ``mat`` (stored layout and dtype kept)."""
    set_const(graph, layer.node, 1, layer.stored(mat), layer.array.dtype, "_pruned")


def shrink_block(graph: ir.Graph, b: Block, keep: np.ndarray, w2_new: list[np.ndarray] | None, shifts: list[np.ndarray] | None) -> None:
    """Slice every tensor along the unit axis to ``keep``; terminal weights become ``w2_new`` (rows per unit);
    each terminal's bias moves by its ``shifts`` entry; the start and terminals are marked as pruned."""
    kept = len(keep)
    _shrink_start(graph, b, keep)
    _shrink_region(graph, b, keep)
    _shrink_terminals(graph, b, keep, w2_new)
    _shrink_value_shapes(b, kept)
    for t, delta in zip(b.terminals, shifts or []):
        if np.any(delta):
            add_bias(graph, t, delta, "prune")
    b.start.metadata_props[UNITS_MARK] = f"{b.units}->{kept}"
    for t in b.terminals:
        t.metadata_props[INPUTS_MARK] = f"{b.units}->{kept}"


def _shrink_start(graph: ir.Graph, b: Block, keep: np.ndarray) -> None:
    """The start layer keeps the output units ``keep`` of its weight and bias."""
    s = b.start
    if b.conv:
        set_const(graph, s, 1, b.w1[keep], b.w1.dtype, "_pruned")
        if len(s.inputs) > 2 and s.inputs[2] is not None:
            set_const(graph, s, 2, const_array(s.inputs[2])[keep], b.w1.dtype, "_pruned")
        return
    w1 = b.w1[keep] if b.trans1 else b.w1[:, keep]
    set_const(graph, s, 1, w1, b.w1.dtype, "_pruned")
    if s.op_type == "Gemm" and len(s.inputs) > 2 and s.inputs[2] is not None:
        c = const_array(s.inputs[2])
        if c is not None and c.size == b.units:
            set_const(graph, s, 2, np.take(c, keep, axis=c.ndim - 1), c.dtype, "_pruned")
        elif c is None or c.size != 1:
            raise ValueError(f"Gemm '{s.name}' bias does not match the units")


def _shrink_region(graph: ir.Graph, b: Block, keep: np.ndarray) -> None:
    """Per-unit constants of the unit-wise ops (BatchNorm parameters, biases, slopes) keep ``keep``."""
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


def _shrink_terminals(graph: ir.Graph, b: Block, keep: np.ndarray, w2_new: list[np.ndarray] | None) -> None:
    """The terminals keep the input rows ``keep`` of their weights, or take the re-fitted rows ``w2_new``."""
    for t, (w2, trans), new in zip(b.terminals, b.w2s, w2_new or [None] * len(b.terminals)):
        if t.op_type == "Conv":
            rows = w2[:, keep] if new is None else new
        else:
            rows = (w2.T if trans else w2)[keep] if new is None else new
            rows = rows.T if trans else rows
        set_const(graph, t, 1, rows, w2.dtype, "_pruned")


def _shrink_value_shapes(b: Block, kept: int) -> None:
    """The recorded shapes of the values carrying units say ``kept`` on the unit axis."""
    for v in b.values:
        if v.shape is None:
            continue
        dims = list(v.shape)
        axis = len(dims) + b.unit_from_right
        if 0 <= axis < len(dims) and dims[axis] == b.units:
            dims[axis] = kept
            v.shape = ir.Shape(dims)
