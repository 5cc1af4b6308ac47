"""Graph surgery of ``qdq``: a plan becomes QuantizeLinear/DequantizeLinear pairs, int8 weights behind
DequantizeLinear, MatMulNBits / blocked DequantizeLinear for int4, and Gather variants for embedding tables
(int8 rows, GatherBlockQuantized, the hot/cold split, a table shared with the lm_head)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxpress.passes import quant_math as qm
from onnxpress.passes.qdq.cpu import resolved_weight_type
from onnxpress.passes.qdq.options import FLOAT, MS_DOMAIN, QdqOptions
from onnxpress.passes.qdq.plan import ActParams, Plan, WeightParams
from onnxpress.passes.qdq.targets import Target, bias_of, is_float_initializer


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


def apply_plan(model: ir.Model, plan: Plan, o: QdqOptions) -> None:
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
            q_in = ir.Value(name=f"{base}_smoothed", type=ir.TensorType(FLOAT), shape=_shape(x))
            graph.insert_before(first, ir.node("Mul", [x, inv], outputs=[q_in], name=f"{base}_Smooth"))
        q_out = ir.Value(name=f"{base}_quantized", type=ir.TensorType(a_dtype), shape=_shape(x))
        graph.insert_before(first, ir.node("QuantizeLinear", [q_in, scale, zp], outputs=[q_out], name=f"{base}_QuantizeLinear"))
        for k, (t, ii) in enumerate(cons):
            dq_out = ir.Value(name=f"{base}_dequantized_{k}", type=ir.TensorType(FLOAT), shape=_shape(x))
            graph.insert_before(t.node, ir.node("DequantizeLinear", [q_out, scale, zp], outputs=[dq_out], name=f"{base}_DequantizeLinear_{k}"))
            t.node.replace_input_with(ii, dq_out)
    folded = {a.fold_into: a.smooth for a in plan.acts if a.fold_into is not None}
    for index, shift in plan.bias_shifts.items():
        # before the weight rewrites: bias_of looks at the layer's node as it is in the float graph
        found = bias_of(plan.targets[index])
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


def _fold_smoothing(graph: ir.Graph, producer: Target, act: ActParams) -> None:
    """Divide the producer's bias by ``s`` (its weight columns were divided in the plan); ``compensate``: then
    multiply the smoothed activation by ``s`` again for consumers that stay float."""
    found = bias_of(producer)
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


def _apply_int8(graph: ir.Graph, t: Target, wp: WeightParams, weight_type: str) -> None:
    w = t.weight
    axis = int(wp.arrays["axis"])
    codes, zero = (wp.arrays["q"], np.int8(0)) if weight_type == "int8" else ((wp.arrays["q"].astype(np.int16) + 128).astype(np.uint8), np.uint8(128))
    q = _const(graph, f"{w.name}_quantized", codes)
    scale = _const(graph, f"{w.name}_scale", wp.arrays["scale"] if axis >= 0 else wp.arrays["scale"].reshape(()))
    zp = _const(graph, f"{w.name}_zero_point", np.full(wp.arrays["scale"].shape if axis >= 0 else (), zero))
    out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(w))
    attrs = {"axis": axis} if axis >= 0 else {}
    graph.insert_before(t.node, ir.node("DequantizeLinear", [q, scale, zp], attrs, outputs=[out], name=f"{w.name}_DequantizeLinear"))
    t.node.replace_input_with(t.weight_input, out)


def _quantize_gemm_bias(graph: ir.Graph, t: Target, wp: WeightParams, act: ActParams) -> str | None:
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
    if not is_float_initializer(c) or c.const_value.numpy().size != n or c.const_value.numpy().ndim != 1:
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
    out = ir.Value(name=f"{c.name}_dequantized", type=ir.TensorType(FLOAT), shape=ir.Shape([n]))
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


def _apply_int4(model: ir.Model, t: Target, wp: WeightParams, o: QdqOptions) -> None:
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
        out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(w))
        graph.insert_before(t.node, ir.node("DequantizeLinear", inputs, {"axis": axis, "block_size": o.block_size}, outputs=[out], name=f"{w.name}_DequantizeLinear"))
        t.node.replace_input_with(t.weight_input, out)
        return
    model.opset_imports.setdefault(MS_DOMAIN, 1)
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
    out = ir.Value(name=f"{result.name}_q4", type=ir.TensorType(FLOAT), shape=_shape(result))
    nodes = [
        ir.node(
            "MatMulNBits", inputs, {"K": k, "N": n, "bits": 4, "block_size": o.block_size, "accuracy_level": o.accuracy_level},
            domain=MS_DOMAIN, outputs=[out], name=(t.node.name or w.name) + "_MatMulNBits",
        )
    ]
    if bias is not None:
        if beta != 1.0:
            if bias.const_value is not None and bias.is_initializer():
                bias = _const(graph, f"{bias.name}_beta", (bias.const_value.numpy() * np.float32(beta)).astype(np.float32))
            else:
                scaled = ir.Value(name=f"{result.name}_beta_c", type=ir.TensorType(FLOAT))
                beta_value = _const(graph, f"{result.name}_beta", np.array(beta, np.float32))
                nodes.append(ir.node("Mul", [bias, beta_value], outputs=[scaled], name=f"{result.name}_Beta"))
                bias = scaled
        summed = ir.Value(name=f"{result.name}_q4_bias", type=ir.TensorType(FLOAT), shape=_shape(result))
        nodes.append(ir.node("Add", [out, bias], outputs=[summed], name=(t.node.name or w.name) + "_Bias"))
        out = summed
    _replace_node(graph, t.node, nodes, out)


def _apply_gather8(graph: ir.Graph, t: Target, wp: WeightParams) -> None:
    w = t.weight
    idx = t.node.inputs[1]
    q = _const(graph, f"{w.name}_quantized", wp.arrays["q"])
    scale = _const(graph, f"{w.name}_scale", wp.arrays["scale"])
    base = t.node.outputs[0].name
    gq = ir.Value(name=f"{base}_q", type=ir.TensorType(ir.DataType.INT8))
    gs = ir.Value(name=f"{base}_row_scale", type=ir.TensorType(FLOAT))
    gf = ir.Value(name=f"{base}_cast", type=ir.TensorType(FLOAT))
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(t.node.outputs[0]))
    nodes = [
        ir.node("Gather", [q, idx], {"axis": 0}, outputs=[gq], name=f"{base}_GatherQ"),
        ir.node("Gather", [scale, idx], {"axis": 0}, outputs=[gs], name=f"{base}_GatherScale"),
        ir.node("Cast", [gq], {"to": FLOAT}, outputs=[gf], name=f"{base}_Cast"),
        ir.node("Mul", [gf, gs], outputs=[out], name=f"{base}_Dequantize"),
    ]
    _replace_node(graph, t.node, nodes, out)


def _apply_gather4(model: ir.Model, t: Target, wp: WeightParams, o: QdqOptions) -> None:
    graph = model.graph
    w = t.weight
    idx = t.node.inputs[1]
    codes, scales, zps = wp.arrays["codes"], wp.arrays["scales"], wp.arrays["zero_points"]  # [V,D], [V,D/b], [V,D/b]
    base = t.node.outputs[0].name
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(t.node.outputs[0]))
    if o.int4_format == "qdq":
        dtype = ir.DataType.UINT4
        q = _const(graph, f"{w.name}_quantized", codes, dtype)
        s = _const(graph, f"{w.name}_scale", scales)
        z = _const(graph, f"{w.name}_zero_point", zps, dtype)
        table = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(w))
        nodes = [
            ir.node("DequantizeLinear", [q, s, z], {"axis": 1, "block_size": o.embedding_block_size}, outputs=[table], name=f"{w.name}_DequantizeLinear"),
            ir.node("Gather", [table, idx], {"axis": 0}, outputs=[out], name=f"{base}_Gather"),
        ]
    else:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        q = _const(graph, f"{w.name}_q4", qm.pack_codes(codes, 4))
        s = _const(graph, f"{w.name}_scales", scales)
        inputs = [q, idx, s]
        if not o.int4_symmetric:
            inputs.append(_const(graph, f"{w.name}_zero_points", qm.pack_codes(zps, 4)))
        nodes = [
            ir.node(
                "GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": o.embedding_block_size, "bits": 4},
                domain=MS_DOMAIN, outputs=[out], name=f"{base}_GatherBlockQuantized",
            )
        ]
    _replace_node(graph, t.node, nodes, out)


def _apply_gather_split(model: ir.Model, t: Target, wp: WeightParams, o: QdqOptions) -> None:
    """``remap[ids]`` gives each index its position (hot rows first); two GatherBlockQuantized (4-bit hot rows,
    2-bit cold rows) look up every index with clamped positions and ``Where`` keeps the right one."""
    graph = model.graph
    model.opset_imports.setdefault(MS_DOMAIN, 1)
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
            domain=MS_DOMAIN, outputs=[out], name=f"{base}_GatherBlockQuantized_{prefix}",
        )

    narrow, position, is_hot = value("position_narrow"), value("position", i64), value("is_hot", ir.DataType.BOOL)
    hot_pos, cold_pos, offset = value("hot_position", i64), value("cold_position", i64), value("cold_offset", i64)
    hot_rows, cold_rows, cond = value("hot_rows", FLOAT), value("cold_rows", FLOAT), value("is_hot_rows", ir.DataType.BOOL)
    out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(t.node.outputs[0]))
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


def _apply_tied4(model: ir.Model, t: Target, wp: WeightParams, o: QdqOptions) -> None:
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
        out = ir.Value(name=f"{w.name}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(w))
        dq = ir.node("DequantizeLinear", [q, s, z], {"axis": axis, "block_size": block}, outputs=[out], name=f"{w.name}_DequantizeLinear")
        users = list(w.uses())
        graph.insert_before(first, dq)
        for user, index in users:
            user.replace_input_with(index, out)
        return
    model.opset_imports.setdefault(MS_DOMAIN, 1)
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
        out = ir.Value(name=f"{base}_dequantized", type=ir.TensorType(FLOAT), shape=_shape(gather.outputs[0]))
        rows = out if kb * block == hidden else ir.Value(name=f"{base}_padded", type=ir.TensorType(FLOAT))
        nodes = [
            ir.node(
                "GatherBlockQuantized", [flat, gather.inputs[1], *tail], {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4},
                domain=MS_DOMAIN, outputs=[rows], name=f"{base}_GatherBlockQuantized",
            )
        ]
        if rows is not out:  # the padded block columns dequantize to 0: cut them off
            consts = [_const(graph, f"{w.name}_{k}", np.array([v], np.int64)) for k, v in (("slice_start", 0), ("slice_end", hidden), ("slice_axis", -1))]
            nodes.append(ir.node("Slice", [rows, *consts], outputs=[out], name=f"{base}_Slice"))
        _replace_node(graph, gather, nodes, out)
    for head in tied.heads:
        result = head.outputs[0]
        out = ir.Value(name=f"{result.name}_q4", type=ir.TensorType(FLOAT), shape=_shape(result))
        nodes = [
            ir.node(
                "MatMulNBits", [head.inputs[0], b, *tail], {"K": hidden, "N": vocab, "bits": 4, "block_size": block, "accuracy_level": o.accuracy_level},
                domain=MS_DOMAIN, outputs=[out], name=(head.name or result.name) + "_MatMulNBits",
            )
        ]
        c = head.inputs[2] if head.op_type == "Gemm" and len(head.inputs) > 2 else None
        if c is not None:
            beta = head.attributes.get_float("beta", 1.0)
            if beta != 1.0:
                scaled = ir.Value(name=f"{result.name}_beta_c", type=ir.TensorType(FLOAT))
                nodes.append(ir.node("Mul", [c, _const(graph, f"{result.name}_beta", np.array(beta, np.float32))], outputs=[scaled], name=f"{result.name}_Beta"))
                c = scaled
            summed = ir.Value(name=f"{result.name}_q4_bias", type=ir.TensorType(FLOAT), shape=_shape(result))
            nodes.append(ir.node("Add", [out, c], outputs=[summed], name=(head.name or result.name) + "_Bias"))
            out = summed
        _replace_node(graph, head, nodes, out)
    for node in tied.transposes:  # their readers are rewritten
        if not node.outputs[0].uses():
            graph.remove(node, safe=True)


def _apply_awq_scaling(graph: ir.Graph, plan: Plan, act: ActParams) -> None:
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
    out = ir.Value(name=f"{x.name}_awq", type=ir.TensorType(FLOAT), shape=_shape(x))
    graph.insert_before(first, ir.node("Mul", [x, inv], outputs=[out], name=f"{x.name}_AwqScale"))
    for t, ii in cons:
        t.node.replace_input_with(ii, out)
