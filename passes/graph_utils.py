"""Graph helpers shared by the passes (onnx-ir): node labels, constants, and folding an output shift into a bias.

Node labels: every pass names a node in its report rows and matches its ``include``/``exclude`` options
against the same string, ``node_label``: the node's name, else its first output's name, else
``<op_type>_<i>`` (``i`` its position in graph order). Exported models name every node; hand-written ones
often name only the values, and an output name is stable where a position is not.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def node_label(node: ir.Node, index: int) -> str:
    """The name reports show and include/exclude options match for ``node`` (``index``: its graph position)."""
    return node.name or (node.outputs[0].name if node.outputs else "") or f"{node.op_type}_{index}"


# -- constants -------------------------------------------------------------------------------------------
def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant input (initializer or Constant output), or None; a graph input is never
    constant (its initializer is only a default a caller can override)."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def unique_initializer_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... : the first one no initializer of ``graph`` has."""
    if name not in graph.initializers:
        return name
    i = 1
    while f"{name}_{i}" in graph.initializers:
        i += 1
    return f"{name}_{i}"


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer (named ``name`` or a free variant of it) and return its value."""
    name = unique_initializer_name(graph, name)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, dtype: np.dtype | type, suffix: str) -> None:
    """Give ``node`` input ``index`` the constant ``array`` (as ``dtype``): in place when only this node reads
    the initializer, else through a new initializer ``<old name><suffix>`` (the old constant is dropped when
    nothing reads it any more): other readers of a shared constant keep their values."""
    old = node.inputs[index]
    array = np.ascontiguousarray(np.asarray(array).astype(dtype))
    if old is not None and old.is_initializer() and not old.is_graph_input() and not old.is_graph_output() and len(old.uses()) == 1:
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    base = (old.name if old is not None and old.name else f"{node.name}_{index}") + suffix
    node.replace_input_with(index, new_initializer(graph, base, array))
    drop_if_unused(graph, old)


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a constant that nothing reads any more: its producer chain (Transpose, Constant) or initializer."""
    if value is None or value.uses() or value.is_graph_output():
        return
    prod = value.producer()
    if prod is not None:
        inputs = list(prod.inputs)
        if all(not out.uses() and not out.is_graph_output() for out in prod.outputs):
            graph.remove(prod, safe=True)
            for inp in inputs:
                drop_if_unused(graph, inp)
        return
    if value.is_initializer() and not value.is_graph_input():
        graph.initializers.pop(value.name, None)


# -- bias ------------------------------------------------------------------------------------------------
def is_bias(value: ir.Value | None, n: int) -> bool:
    """A float constant with ``n`` elements along its last axis only ([N], [1, N], ...): a per-output bias."""
    array = const_array(value)
    return array is not None and array.dtype.kind == "f" and array.ndim >= 1 and array.size == n and array.shape[-1] == n


def existing_bias(node: ir.Node, n: int) -> tuple[ir.Node, int] | None:
    """The constant bias a shift of ``node``'s ``n`` outputs folds into, as (holder, input index): Gemm's C
    (beta != 0) or Conv's B, or the constant side of the bias Add that only this node feeds. None: ``add_bias``
    gives a Gemm/Conv a bias input, or inserts an Add (what a size estimate must count)."""
    if node.op_type in ("Gemm", "Conv"):
        c = node.inputs[2] if len(node.inputs) > 2 else None
        beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
        return (node, 2) if beta != 0.0 and is_bias(c, n) else None
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    user, index = uses[0]
    if user.op_type != "Add" or len(user.inputs) != 2:
        return None
    return (user, 1 - index) if is_bias(user.inputs[1 - index], n) else None


def add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray, tag: str) -> ir.Node | None:
    """Shift the output of MatMul/Gemm/Conv ``node`` by ``delta`` ([N] per output column or channel; for a
    Gemm the shift of its product ``A @ B``, scaled by ``alpha`` here).

    Into the bias ``existing_bias`` finds (in its own dtype; a shared constant is copied first), or a new
    bias input of a Gemm/Conv that has none, else through a new ``Add`` named ``<node>/<tag>_bias`` whose
    output takes over the node's output (and its name, when that is a graph output). Returns that Add, or
    None when the shift went into a bias input."""
    delta = np.asarray(delta, np.float64).reshape(-1)
    base = node.name or node.outputs[0].name
    if node.op_type == "Gemm":
        delta = node.attributes.get_float("alpha", 1.0) * delta
    found = existing_bias(node, delta.size)
    if found is not None:
        holder, index = found
        current = const_array(holder.inputs[index])
        beta = node.attributes.get_float("beta", 1.0) if holder is node and node.op_type == "Gemm" else 1.0
        set_const(graph, holder, index, current.astype(np.float64) + delta.reshape(current.shape) / beta, current.dtype, f"_{tag}")
        return None
    if node.op_type in ("Gemm", "Conv") and (len(node.inputs) < 3 or node.inputs[2] is None):
        node.resize_inputs(3)  # no bias yet: C = delta exactly (Gemm's beta dropped)
        node.replace_input_with(2, new_initializer(graph, f"{base}/{tag}_bias", delta.astype(np.float32)))
        if "beta" in node.attributes:
            node.attributes.pop("beta")
        return None
    out = node.outputs[0]
    name = out.name
    was_output = out.is_graph_output()
    bias = delta.astype(np.float32)
    if node.op_type == "Conv":  # per channel: [C, 1, 1, ...] against [N, C, H, W, ...]
        bias = bias.reshape([-1] + [1] * (len(out.shape) - 2 if out.shape is not None else 2))
    shifted = ir.Value(name=f"{name}/{tag}_shifted", type=out.type, shape=out.shape)
    add = ir.node("Add", [out, new_initializer(graph, f"{base}/{tag}_bias", bias)], outputs=[shifted], name=f"{base}/{tag}_bias")
    graph.insert_after(node, add)
    ir.convenience.replace_all_uses_with(out, shifted, replace_graph_outputs=True)
    add.replace_input_with(0, out)
    if was_output:  # the graph output keeps its name
        out.name = f"{name}/{tag}_unbiased"
        shifted.name = name
    return add
