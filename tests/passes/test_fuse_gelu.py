import numpy as np
from graphs import apply_and_check, init, op_types, text_model

from onnxpress.passes.fuse_gelu import FuseGelu

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def _mlp(bias: bool = True, tanh: bool = False):
    """x -> MatMul -> (+ b) -> GELU written out as exporters emit it -> y."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    pre = "h = Add(m, b)" if bias else "h = Identity(m)"
    if tanh:  # x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))))
        gelu = """
            three = Constant<value_float=3.0>()
            cube = Pow(h, three)
            c1 = Constant<value_float=0.044715>()
            inner0 = Mul(c1, cube)
            inner1 = Add(h, inner0)
            c2 = Constant<value_float=0.7978845834732056>()
            inner = Mul(c2, inner1)
            t = Tanh(inner)
            one = Constant<value_float=1.0>()
            t1 = Add(t, one)
            half = Constant<value_float=0.5>()
            ht = Mul(half, t1)
            y = Mul(h, ht)"""
    else:  # 0.5 * (x * (erf(x / sqrt 2) + 1))
        gelu = """
            sqrt2 = Constant<value_float=1.4142135381698608>()
            d = Div(h, sqrt2)
            e = Erf(d)
            one = Constant<value_float=1.0>()
            e1 = Add(e, one)
            xe = Mul(h, e1)
            half = Constant<value_float=0.5>()
            y = Mul(half, xe)"""
    return text_model(
        f"""{HEADER} g (float[N,8] x) => (float[N,16] y) <{init('w', w)}, {init('b', b)}>
        {{ m = MatMul(x, w)
           {pre}
           {gelu} }}"""
    )


def test_erf_gelu_with_bias_becomes_one_bias_gelu():
    out, modified = apply_and_check(FuseGelu(), _mlp(), atol=1e-5, rtol=1e-5)
    assert modified
    assert op_types(out) == ["MatMul", "BiasGelu"]
    assert out.opset_imports["com.microsoft"] == 1
    p = FuseGelu()
    p(_mlp())
    assert p.details == [{"erf_gelu": 1, "bias_gelu": 1}]


def test_bias_false_keeps_the_add_and_fuses_the_gelu():
    out, modified = apply_and_check(FuseGelu(FuseGelu.Options(bias=False)), _mlp(), atol=1e-5, rtol=1e-5)
    assert modified and "Gelu" in op_types(out) and "Add" in op_types(out) and "Erf" not in op_types(out)


def test_tanh_gelu_becomes_fast_gelu():
    out, modified = apply_and_check(FuseGelu(FuseGelu.Options(bias=False)), _mlp(bias=False, tanh=True), atol=1e-5, rtol=1e-5)
    assert modified and "FastGelu" in op_types(out) and "Tanh" not in op_types(out)


def test_model_without_gelu_is_left_alone():
    from graphs import mlp_model

    model = mlp_model()
    result = FuseGelu()(model)
    assert not result.modified and "com.microsoft" not in result.model.opset_imports
