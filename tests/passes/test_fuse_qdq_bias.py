"""fuse-qdq-bias: QDQ MatMul + bias Add -> com.microsoft.MatMulIntegerToFloat(bias), same outputs in ORT."""

import numpy as np
import pytest
from graphs import apply_and_check, copy_model, mlp_model, op_types, text_model, init

from onnxpress.pass_infra import PassContext
from onnxpress.passes.fuse_qdq_bias import FuseQdqBias
from onnxpress.passes.qdq import Qdq


def quantized(model, **options):
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    p = Qdq(mode="static", **options)
    p.context = PassContext(calibration=cal)
    return p(copy_model(model)).model, cal[0]


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_add_joins_the_integer_matmul(per_channel):
    model, feed = quantized(mlp_model(), per_channel=per_channel)  # MatMul + Add(b1) -> Relu -> MatMul (no bias)
    out, modified = apply_and_check(FuseQdqBias(), model, atol=1e-5, rtol=1e-5, inputs=feed)
    assert modified
    ops = op_types(out)
    assert ops.count("MatMulIntegerToFloat") == 1 and "Add" not in ops
    assert ops.count("MatMul") == 1  # the bias-less second layer is left to ORT's own QDQ fusion
    fused = next(n for n in out.graph if n.op_type == "MatMulIntegerToFloat")
    assert fused.domain == "com.microsoft" and fused.inputs[6].name == "b1"
    assert "DequantizeLinear" in ops  # the second layer's pairs stay


def test_left_alone_without_quantized_inputs_or_with_a_shared_product():
    # float model: nothing to fuse
    out, modified = apply_and_check(FuseQdqBias(), mlp_model(), atol=0, rtol=0)
    assert not modified
    # the MatMul's product also feeds the graph output: the Add cannot absorb it
    rng = np.random.default_rng(1)
    model = text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,8] x) => (float[N,4] y, float[N,4] p)
        <{init("w", rng.standard_normal((8, 4)))}, {init("b", rng.standard_normal(4))}>
        {{ p = MatMul(x, w) y = Add(p, b) }}
        """
    )
    q, feed = quantized(model)
    out, modified = apply_and_check(FuseQdqBias(), q, atol=0, rtol=0, inputs=feed)
    assert not modified and "MatMulIntegerToFloat" not in op_types(out)
