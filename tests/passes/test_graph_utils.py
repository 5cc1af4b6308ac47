"""Shared graph helpers of the passes: node labels, copy-on-write constants and bias insertion, in onnxruntime."""

import numpy as np
import onnx_ir as ir
import pytest
from graphs import check_full, copy_model, init, op_types, text_model

from onnxpress import runtime
from onnxpress.passes import graph_utils as gu
from onnxpress.passes.qdq import QdqOptions, find_targets

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
DELTA = np.array([0.5, -1.25, 2.0])
X = RNG.standard_normal((5, 4)).astype(np.float32)


def outputs(model: ir.Model, name: str = "y") -> np.ndarray:
    return runtime.run(runtime.make_session(model), {"x": X})[name]


def node(model: ir.Model, op: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op)


def shifted(model: ir.Model, op: str, delta: np.ndarray = DELTA) -> tuple[ir.Model, ir.Node | None]:
    out = copy_model(model)
    add = gu.add_bias(out.graph, node(out, op), delta, "test")
    check_full(out)
    return out, add


def test_node_label_is_name_then_output_name_then_position():
    model = text_model(f"{HEADER} g (float[N,4] x) => (float[N,3] y) <{init('w', W)}> {{ h = Relu(x) y = MatMul(h, w) }}")
    relu, matmul = list(model.graph)
    assert gu.node_label(relu, 0) == "h" and gu.node_label(matmul, 1) == "y"
    matmul.name = "proj"
    assert gu.node_label(matmul, 1) == "proj"
    matmul.outputs[0].name = ""
    matmul.name = ""
    assert gu.node_label(matmul, 1) == "MatMul_1"


def test_qdq_include_exclude_match_the_output_name_of_an_unnamed_node():
    # the text format leaves nodes unnamed: qdq used to label them MatMul_<i> and could not exclude one by name
    model = text_model(
        f"{HEADER} g (float[N,4] x) => (float[N,3] y) <{init('w1', np.eye(4, dtype=np.float32))}, {init('w2', W)}>"
        "{ h = MatMul(x, w1) y = MatMul(h, w2) }"
    )
    targets, skipped = find_targets(model, QdqOptions(mode="weight", exclude=("h",)))
    assert [t.label for t in targets] == ["y"]
    assert skipped == [{"layer": "h", "op": "MatMul", "skipped": "excluded by option"}]
    targets, skipped = find_targets(model, QdqOptions(mode="weight", include=("h",)))
    assert [t.label for t in targets] == ["h"] and skipped[0]["layer"] == "y"


def test_matmul_bias_add_takes_the_shift_in_place():
    model = text_model(f"{HEADER} g (float[N,4] x) => (float[N,3] y) <{init('w', W)}, {init('b', B)}> {{ h = MatMul(x, w) y = Add(h, b) }}")
    assert gu.existing_bias(node(model, "MatMul"), 3) is not None
    out, add = shifted(model, "MatMul")
    assert add is None and op_types(out) == ["MatMul", "Add"] and list(out.graph.initializers) == ["w", "b"]
    np.testing.assert_allclose(outputs(out), X @ W + B + DELTA, rtol=1e-5, atol=1e-5)


def test_shared_bias_is_copied_and_the_other_reader_keeps_its_values():
    model = text_model(
        f"{HEADER} g (float[N,4] x) => (float[N,3] y, float[N,3] z) <{init('w', W)}, {init('b', B)}>"
        "{ h = MatMul(x, w) y = Add(h, b) k = MatMul(x, w) z = Add(k, b) }"
    )
    out, add = shifted(model, "MatMul")
    assert add is None and sorted(out.graph.initializers) == ["b", "b_test", "w"]
    np.testing.assert_allclose(outputs(out, "y"), X @ W + B + DELTA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs(out, "z"), X @ W + B, rtol=1e-5, atol=1e-5)


def test_matmul_without_bias_gets_an_add_and_the_graph_output_keeps_its_name():
    model = text_model(f"{HEADER} g (float[N,4] x) => (float[N,3] y) <{init('w', W)}> {{ y = MatMul(x, w) }}")
    assert gu.existing_bias(node(model, "MatMul"), 3) is None
    out, add = shifted(model, "MatMul")
    assert add is not None and op_types(out) == ["MatMul", "Add"] and out.graph.outputs[0].name == "y"
    np.testing.assert_allclose(outputs(out), X @ W + DELTA, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_shift_is_of_the_product_and_scaled_by_alpha(with_c):
    c = f", {init('c', B)}" if with_c else ""
    model = text_model(
        f"{HEADER} g (float[N,4] x) => (float[N,3] y) <{init('wt', W.T.copy())}{c}>"
        f"{{ y = Gemm<transB=1, alpha=0.5, beta=2.0>(x, wt{', c' if with_c else ''}) }}"
    )
    out, add = shifted(model, "Gemm")
    assert add is None and op_types(out) == ["Gemm"]  # folded into C (new or existing): no extra node
    expected = 0.5 * (X @ W + DELTA) + (2.0 * B if with_c else 0.0)
    np.testing.assert_allclose(outputs(out), expected, rtol=1e-5, atol=1e-5)


def test_conv_bias_and_conv_add_are_per_channel():
    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    model = text_model(f"{HEADER} g (float[1,2,4,4] x) => (float[1,3,4,4] y) <{init('w', w)}> {{ y = Conv(x, w) }}")
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    expected = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + DELTA.reshape(1, 3, 1, 1)
    out, add = shifted(model, "Conv")
    assert add is None and len(node(out, "Conv").inputs) == 3
    np.testing.assert_allclose(runtime.run(runtime.make_session(out), {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_set_const_writes_in_place_only_when_the_node_is_the_only_reader():
    model = text_model(
        f"{HEADER} g (float[N,4] x) => (float[N,3] y, float[N,3] z) <{init('w', W)}> {{ y = MatMul(x, w) z = MatMul(x, w) }}"
    )
    first = list(model.graph)[0]
    gu.set_const(model.graph, first, 1, np.zeros((4, 3)), np.float32, "_new")
    assert first.inputs[1].name == "w_new" and sorted(model.graph.initializers) == ["w", "w_new"]
    gu.set_const(model.graph, list(model.graph)[1], 1, np.ones((4, 3)), np.float32, "_new")
    assert sorted(model.graph.initializers) == ["w", "w_new"]  # the only reader: in place
    check_full(model)
    np.testing.assert_array_equal(outputs(model, "y"), np.zeros((5, 3)))
    np.testing.assert_allclose(outputs(model, "z"), np.repeat(X.sum(1, keepdims=True), 3, axis=1), rtol=1e-5)
