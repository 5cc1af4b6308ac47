"""The ``fuse-qdq-bias`` pass."""

from __future__ import annotations

import onnx_ir as ir

from onnxpress.pass_infra import Pass

_MS = "com.microsoft"
_INTEGER = (ir.DataType.INT8, ir.DataType.UINT8)


class FuseQdqBias(Pass):
    """``fuse-qdq-bias``: a quantized MatMul and its bias Add become one onnxruntime ``MatMulIntegerToFloat``.

    Rewrites ``Add(MatMul(DQ(q_x), DQ(q_W)), b)``, where ``q_x`` comes from a QuantizeLinear with a per-tensor
    scale, ``q_W`` is a constant int8/uint8 ``[K, N]`` weight (per-tensor or per-column scale) and ``b`` a constant
    ``[N]`` float bias, into ``com.microsoft.MatMulIntegerToFloat(q_x, q_W, scales, zero points, b)``: the node
    onnxruntime's own dynamic quantizer ends in. Why: ORT fuses the QDQ MatMul into MatMulIntegerToFloat at load
    time but leaves the bias Add as a separate node (its fusion only takes a bias from the MatMulInteger form),
    and on small batches those node launches are a measurable share of the latency (MiniLM, 18-30 Adds). Applies
    after ``qdq(mode=static)``, to models that run on onnxruntime's CPU provider (a contrib op: QDQ-only
    consumers such as NNAPI or QNN need the QDQ form, so it is not in the default pipeline). Lossless: the same
    integer GEMM and float bias add (outputs agree to float rounding).
    """

    name = "fuse-qdq-bias"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            found = _match(node)
            if found is None:
                continue
            add, bias, dq_x, dq_w = found
            inputs = [dq_x.inputs[0], dq_w.inputs[0], dq_x.inputs[1], dq_w.inputs[1], _input(dq_x, 2), _input(dq_w, 2), bias]
            out = add.outputs[0]
            fused_out = ir.Value(name=f"{out.name}_fused", type=out.type, shape=None if out.shape is None else ir.Shape(out.shape))
            new = ir.node("MatMulIntegerToFloat", inputs, domain=_MS, outputs=[fused_out], name=f"{node.name or out.name}_MatMulIntegerToFloat")
            graph.insert_before(node, new)
            name, was_output = out.name, out.is_graph_output()
            ir.convenience.replace_all_uses_with(out, fused_out, replace_graph_outputs=True)
            graph.remove([add, node], safe=True)
            for dq in (dq_w, dq_x):
                if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                    graph.remove(dq, safe=True)
            if was_output:
                out.name = f"{name}_unfused"
                fused_out.name = name
            fused += 1
        if fused:
            model.opset_imports.setdefault(_MS, 1)
            self.details.append({"fused": fused})
        return ir.passes.PassResult(model, fused > 0)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _dequantize(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if node.attributes.get_int("block_size", 0):
        return None
    return node


def _match(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Node, ir.Node] | None:
    """(bias Add, bias, activation DQ, weight DQ) of a fusable MatMul, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    dq_x, dq_w = _dequantize(node.inputs[0]), _dequantize(node.inputs[1])
    if dq_x is None or dq_w is None:
        return None
    q_x, q_w = dq_x.inputs[0], dq_w.inputs[0]
    if q_x.producer() is None or q_x.producer().op_type != "QuantizeLinear" or q_x.dtype not in _INTEGER:
        return None
    if not _constant(q_w) or q_w.const_value.dtype not in _INTEGER or len(q_w.const_value.shape) != 2:
        return None
    n = q_w.const_value.shape[1]
    # activation: per-tensor scale and zero point; weight: per tensor or one per output column (axis 1 of [K, N])
    if not all(_constant(v) and v.const_value.size == 1 for v in (dq_x.inputs[1], _input(dq_x, 2)) if v is not None):
        return None
    w_params = [v for v in (dq_w.inputs[1], _input(dq_w, 2)) if v is not None]
    if not all(_constant(v) and v.const_value.size in (1, n) for v in w_params):
        return None
    if any(v.const_value.size == n and n != 1 for v in w_params) and dq_w.attributes.get_int("axis", 1) not in (1, -1):
        return None
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    bias = add.inputs[1 - index]
    if not _constant(bias) or bias.const_value.dtype != ir.DataType.FLOAT or tuple(bias.const_value.shape) != (n,):
        return None
    return add, bias, dq_x, dq_w
