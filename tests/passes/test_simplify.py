import numpy as np
import onnx
import onnx_ir as ir
from graphs import apply_and_check, init, op_types, redundant_model, text_model

from onnxpress.passes.simplify import Simplify, _same_initializer_values, _structure_text


def test_simplify_removes_redundancy_exactly():
    model = redundant_model()
    out, modified = apply_and_check(Simplify(), model, atol=1e-6, rtol=1e-6)
    assert modified
    assert len(op_types(out)) < len(op_types(model))
    assert "Sigmoid" not in op_types(out)


def test_simplify_folds_shape_computation():
    model = text_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,12] y)
        {
            s = Shape(x)
            idx = Constant<value_ints=[0]>()
            b = Gather(s, idx)
            minus = Constant<value_ints=[-1]>()
            shape = Concat<axis=0>(b, minus)
            y = Reshape(x, shape)
        }
        """
    )
    out, modified = apply_and_check(Simplify(), model, atol=0, rtol=0)
    assert op_types(out) == ["Reshape"]


def test_simplify_keeps_bn_when_asked():
    rng = np.random.default_rng(1)
    model = text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,2,5,5] x) => (float[1,3,3,3] y)
        <{init("w", rng.standard_normal((3, 2, 3, 3)))}, {init("scale", rng.random(3) + 0.5)}, {init("bias", rng.standard_normal(3))},
         {init("mean", rng.standard_normal(3))}, {init("var", rng.random(3) + 0.5)}>
        {{
            c = Conv(x, w)
            y = BatchNormalization(c, scale, bias, mean, var)
        }}
        """
    )
    fused, _ = apply_and_check(Simplify(), model, atol=1e-5, rtol=1e-4)
    assert "BatchNormalization" not in op_types(fused)
    kept, _ = apply_and_check(Simplify(skip_fuse_bn=True), model, atol=1e-5, rtol=1e-4)
    assert "BatchNormalization" in op_types(kept)


# How simplify decides whether onnxsim changed the graph: structure printed without weight values and
# value_info, initializers compared bitwise (printing 90 MB of weights as text took 3.5 s per call on MiniLM).
def _model(w: np.ndarray) -> ir.Model:
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,3] x) => (float[N,3] y)
        <{init("w", w)}>
        {{
            y = MatMul(x, w)
        }}
        """
    )


def test_structure_text_leaves_out_values_and_value_info():
    w = np.arange(9, dtype=np.float32).reshape(3, 3)
    a = ir.to_proto(_model(w)).graph
    b = ir.to_proto(_model(w + 1)).graph
    b.value_info.add().CopyFrom(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3]))
    assert _structure_text(a) == _structure_text(b)
    assert "w:1:[3, 3]" in _structure_text(a)  # name, type and shape still count
    c = ir.to_proto(_model(np.zeros((3, 3), np.float32).reshape(3, 3))).graph
    c.node[0].op_type = "Add"
    assert _structure_text(c) != _structure_text(a)


def test_same_initializer_values_is_bitwise_and_storage_independent():
    w = np.arange(9, dtype=np.float32).reshape(3, 3)
    model = _model(w)
    same = ir.to_proto(_model(w)).graph
    assert _same_initializer_values(model, same)
    # the same values stored in float_data instead of raw_data still compare equal
    moved = onnx.GraphProto()
    moved.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    moved.initializer[0].ClearField("raw_data")
    moved.initializer[0].float_data.extend(w.ravel().tolist())
    assert _same_initializer_values(model, moved)
    changed = w.copy()
    changed[1, 1] = np.nextafter(changed[1, 1], np.float32(100))  # one ulp
    assert not _same_initializer_values(model, ir.to_proto(_model(changed)).graph)
    renamed = ir.to_proto(_model(w)).graph
    renamed.initializer[0].name = "other"
    assert not _same_initializer_values(model, renamed)


def test_simplify_twice_reports_no_change_the_second_time():
    w = np.arange(9, dtype=np.float32).reshape(3, 3)
    once, _ = apply_and_check(Simplify(), _model(w), atol=0, rtol=0)
    again = Simplify()(once)
    assert not again.modified
