"""Property test: the lossless default pipeline keeps the outputs of random small graphs (hypothesis)."""

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxpress

UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity"]
BINARY = ["Add", "Mul", "Sub", "Max", "Min"]


@st.composite
def random_graphs(draw):
    """A DAG over [2, 4] float tensors: unary/binary elementwise ops, MatMul with constant weights,
    repeated constants (dedup), repeated nodes (cse), constant-only subexpressions (fold) and dead ends."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = ["x"]
    nodes, inits = [], []
    consts = []
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "const", "matmul", "dup"]))
        out = f"v{i}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [draw(st.sampled_from(values))], [out]))
        elif kind == "binary":
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [draw(st.sampled_from(values)), draw(st.sampled_from(values))], [out]))
        elif kind == "const":
            name = f"c{i}"
            array = rng.standard_normal((2, 4)).astype(np.float32) if not consts or draw(st.booleans()) else numpy_helper.to_array(draw(st.sampled_from(consts)))
            tensor = numpy_helper.from_array(array, name)
            inits.append(tensor)
            consts.append(tensor)
            if len(consts) > 1 and draw(st.booleans()):  # constant-only subexpression
                nodes.append(helper.make_node("Add", [name, consts[0].name], [out]))
            else:
                nodes.append(helper.make_node("Mul", [draw(st.sampled_from(values)), name], [out]))
        elif kind == "matmul":
            name = f"w{i}"
            inits.append(numpy_helper.from_array((rng.standard_normal((4, 4)) / 2).astype(np.float32), name))
            nodes.append(helper.make_node("MatMul", [draw(st.sampled_from(values)), name], [out]))
        else:  # duplicate an earlier node on the same inputs
            if not nodes:
                continue
            src = draw(st.sampled_from(nodes))
            nodes.append(helper.make_node(src.op_type, list(src.input), [out]))
        values.append(out)
    if len(values) == 1:
        nodes.append(helper.make_node("Relu", ["x"], ["v_end"]))
        values.append("v_end")
    outputs = sorted(set(draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=2))))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2, 4]) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_default_pipeline_is_exact_on_random_graphs(model):
    onnx.checker.check_model(model, full_check=True)
    out, report = onnxpress.optimize(model)
    assert report.validation.passed, report.validation.outputs
    for comparison in report.validation.outputs:
        assert comparison.max_abs <= 1e-4 + 1e-3 * 10
    onnx.checker.check_model(ir.to_proto(out), full_check=True)
    again, report2 = onnxpress.optimize(out)
    assert not any(s.modified for s in report2.passes), [s.name for s in report2.passes if s.modified]
