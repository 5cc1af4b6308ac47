"""The graph surgery of ``factorize``: one node (or a group sharing one input) becomes two products whose
weights are the factors. Both products carry the metadata ``MARK`` so a later run leaves them alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxpress.passes.factorize.targets import FLOAT, MARK, Group
from onnxpress.passes.graph_utils import add_bias, drop_if_unused, new_initializer


def _weight(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return new_initializer(graph, name, np.asarray(array, np.float32))


def rewrite_conv(graph: ir.Graph, node: ir.Node, label: str, first_w: np.ndarray, second_w: np.ndarray) -> None:
    """Conv(x, W, b) -> Conv(Conv(x, W1), W2, b): W1 [r, C, kh, kw] keeps the spatial attributes, W2 is 1x1."""
    old_weight = node.inputs[1]
    base = old_weight.name or label
    w1 = _weight(graph, f"{base}/U", first_w)
    mid = ir.Value(name=f"{node.outputs[0].name}/factorize_mid", type=ir.TensorType(FLOAT))
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


def rewrite_linear(graph: ir.Graph, g: Group, u: np.ndarray, v: np.ndarray, delta: np.ndarray | None = None) -> None:
    """x -> first product with U (once per group) -> each member's node with its slice of V; ``delta`` (the
    bias correction, all members' columns) goes into each member's bias where it is not zero."""
    members = g.members
    first_member = members[0]  # graph order: members were collected in order
    base = first_member.weight.name or first_member.label
    u_value = _weight(graph, f"{base}/U", u)
    rank = u.shape[1]
    mid = ir.Value(name=f"{first_member.node.outputs[0].name}/factorize_mid", type=ir.TensorType(FLOAT))
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
