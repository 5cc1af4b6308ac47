import numpy as np
from graphs import apply_and_check, init, op_types, redundant_model, text_model

from onnxpress.passes.simplify import Simplify


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
