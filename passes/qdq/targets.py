"""What ``qdq`` quantizes: the targets (nodes with a float weight and/or activations to quantize), why other
nodes are left alone, tables shared by an embedding and an lm_head, and the rows the calibration data indexes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes import quant_math as qm
from onnxpress.passes.graph_utils import node_label
from onnxpress.passes.qdq.options import FLOAT, QUANT_OPS, QdqOptions


@dataclasses.dataclass
class Target:
    """One node to quantize: a weight input (initializer) and/or activation inputs."""

    index: int  # position in graph order (stable across copies of the model)
    node: ir.Node
    kind: str  # matmul, gemm, conv, gather, act
    weight: ir.Value | None = None
    weight_input: int = 1
    axis: int = 1  # per-channel (output channel) axis of the weight
    in_axis: int = 0  # input-channel axis of the weight (SmoothQuant)
    acts: tuple[int, ...] = ()  # input indices of activations to quantize
    tied: Tied | None = None  # kind "tied": the table's Gather and head uses

    @property
    def label(self) -> str:
        return node_label(self.node, self.index)


def infer_types(model: ir.Model) -> None:
    """Fill in value types (needed to know which inputs of arbitrary ops are float)."""
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - best effort: values without a type are then left alone
        pass


def is_float_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None and value.dtype == FLOAT and not value.is_graph_input()


def _from_dq(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type in QUANT_OPS


def find_targets(model: ir.Model, o: QdqOptions) -> tuple[list[Target], list[dict[str, Any]]]:
    targets: list[Target] = []
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
    wanted: dict[str, list[Target]] = {}
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
                if isinstance(tied, Target):
                    if t.weight.name not in tied_done:
                        tied_done.add(t.weight.name)
                        keep.append(tied)
                    continue
                why = f" ({tied})" if isinstance(tied, str) else ""
                skipped.append({"layer": t.label, "op": t.node.op_type, "skipped": f"weight '{t.weight.name}' is shared with other uses{why}"})
                continue
        keep.append(t)
    return keep, skipped


def _classify(index: int, node: ir.Node, o: QdqOptions, embeddings: str, extra_ops: set[str]) -> Target | str:
    op = node.op_type
    inputs = list(node.inputs)
    if op == "Gather":
        if embeddings == "float" or len(inputs) < 2:
            return ""
        data, idx = inputs[0], inputs[1]
        if _from_dq(data):
            return "already quantized (table behind DequantizeLinear)"
        if not is_float_initializer(data) or idx is None or idx.const_value is not None:
            return ""
        shape = data.const_value.shape
        if len(shape) != 2 or shape[1] < 2 or node.attributes.get_int("axis", 0) != 0:
            return ""
        if embeddings == "int4" and shape[1] % 2:
            return "int4 embeddings need an even row length"
        return Target(index, node, "gather", data, 0, axis=0, in_axis=1)
    if op in ("MatMul", "Gemm", "Conv"):
        w_index = 1
        w = inputs[1] if len(inputs) > 1 else None
        if _from_dq(w):
            return "already quantized (weight behind DequantizeLinear)"
        if is_float_initializer(w):
            if o.mode == "int4" and op == "Conv":
                return "int4 covers MatMul and Gemm only (Conv left float)"
            shape = w.const_value.shape
            act = inputs[0]
            if act is None or act.const_value is not None or (act.dtype is not None and act.dtype != FLOAT):
                return "activation is not a float tensor"
            float_input = node.name in o.weight_only or op in o.weight_only
            acts = (0,) if o.mode == "static" and not _from_dq(act) and not float_input else ()
            if op == "MatMul":
                if len(shape) != 2:
                    return f"weight of rank {len(shape)} (MatMul weights of rank 2 only)"
                return Target(index, node, "matmul", w, w_index, axis=1, in_axis=0, acts=acts)
            if op == "Gemm":
                if node.attributes.get_int("transA", 0):
                    return "Gemm with transA=1"
                trans_b = node.attributes.get_int("transB", 0)
                return Target(index, node, "gemm", w, w_index, axis=0 if trans_b else 1, in_axis=1 if trans_b else 0, acts=acts)
            if o.mode == "int4":
                return ""
            return Target(index, node, "conv", w, w_index, axis=0, in_axis=1, acts=acts)
        if op == "MatMul" and "MatMul" in extra_ops:
            acts = tuple(i for i in (0, 1) if inputs[i] is not None and inputs[i].dtype == FLOAT and not _from_dq(inputs[i]))
            return Target(index, node, "act", acts=acts) if acts else ""
        if op == "MatMul" and o.mode == "static" and w is not None and w.const_value is None:
            return ""  # activation x activation: float unless asked
        return ""
    # other op types listed in quantize_activations_of
    acts = tuple(
        i for i, v in enumerate(inputs) if v is not None and v.const_value is None and v.dtype == FLOAT and not _from_dq(v)
    )
    return Target(index, node, "act", acts=acts) if acts else ""


def weight_matrix(t: Target) -> np.ndarray:
    """The weight as [K_in, N_out] (MatMul layout) for MatMul/Gemm targets; a tied table as the head's [H, V]."""
    w = t.weight.const_value.numpy()
    if t.kind == "tied":
        return w if t.tied.table_is_transposed else w.T
    return w.T if (t.kind == "gemm" and t.in_axis == 1) else w


def bias_of(t: Target) -> tuple[ir.Value, float] | None:
    """The float bias initializer added right after this MatMul/Gemm (only user: this layer), and the factor it is multiplied by."""
    n_out = weight_matrix(t).shape[1]

    def usable(v: ir.Value | None) -> bool:
        return (
            is_float_initializer(v) and tuple(v.const_value.shape) in ((n_out,), (1, n_out)) and len(v.uses()) == 1 and not v.is_graph_output()
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


def index_values(model: ir.Model, feeds, names: list[str]) -> list[dict[str, np.ndarray]]:
    """The values of the index tensors ``names`` per feed: straight from the feeds when they are graph inputs
    (token ids: no model run), else captured in one onnxruntime pass."""
    from onnxpress import runtime

    graph_inputs = {v.name for v in model.graph.inputs}
    if all(n in graph_inputs for n in names):
        return [{n: f[n] for n in names} for f in feeds]
    return runtime.capture(model, list(feeds), names)


def indexed_rows(model: ir.Model, gathers: list[Target], feeds) -> dict[int, np.ndarray]:
    """Per embedding Gather: the table rows its indices select on the calibration data (one ORT pass)."""
    names = sorted({t.node.inputs[1].name for t in gathers})
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in index_values(model, feeds, names):
        for n in names:
            seen[n].append(np.asarray(values[n]))
    return {t.index: qm.used_rows(seen[t.node.inputs[1].name], t.weight.const_value.shape[0]) for t in gathers}


# -- shared (tied) embedding / lm_head tables ----------------------------------------------------------
@dataclasses.dataclass
class Tied:
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


def tied_uses(weight: ir.Value | None) -> Tied | str:
    """The Gather and MatMul/Gemm uses of a table shared between an embedding and an lm_head, or why it is not one.

    Recognised: ``Gather(W)`` or ``Gather(Transpose(W))`` (axis 0, indices computed at run time) together with
    ``MatMul(x, W)``, ``MatMul(x, Transpose(W))`` or ``Gemm(x, W)`` (transA=0, alpha=1; transB either way), as
    long as every use agrees on which axis of W is the vocabulary."""
    if weight is None or not is_float_initializer(weight) or weight.is_graph_output() or len(weight.const_value.shape) != 2:
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
            if act is None or act.const_value is not None or (act.dtype is not None and act.dtype != FLOAT):
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
    return Tied(sides.pop(), heads, gathers, transposes)


def tied_target(model: ir.Model, weight: ir.Value, o: QdqOptions, embeddings: str) -> Target | str:
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
    return Target(positions[id(head)], head, "tied", weight, 1, axis=1, in_axis=0, tied=found)


def rebind_tied(t: Target, node: ir.Node) -> Target:
    """``t`` rebound to its head ``node`` in a copy of the model (the table is the head's weight or its Transpose's input)."""
    w = node.inputs[1]
    if w is not None and w.name != t.weight.name and w.producer() is not None:
        w = w.producer().inputs[0]
    found = tied_uses(w)
    if isinstance(found, str):
        raise AssertionError(f"tied table '{t.weight.name}' not found again in the copy: {found}")
    return dataclasses.replace(t, node=node, weight=w, tied=found)
