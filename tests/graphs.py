"""Shared builders of tiny test graphs and the common pass-test procedure.

The procedure follows onnxscript's rewriter tests: checker -> copy -> apply -> op types -> compare in
onnxruntime with explicit tolerances -> idempotence -> onnx.checker full check.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.pass_infra import Pass, PassContext
from onnxpress.validate import Tolerance, validate


def copy_model(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def text_model(text: str) -> ir.Model:
    return ir.from_onnx_text(text)


def _array_text(a: np.ndarray) -> str:
    return ", ".join(repr(float(v)) for v in a.ravel())


def init(name: str, array: np.ndarray) -> str:
    """One initializer in ONNX text syntax."""
    dims = ",".join(str(d) for d in array.shape)
    return f"float[{dims}] {name} = {{{_array_text(array.astype(np.float32))}}}"


def redundant_model() -> ir.Model:
    """Duplicated initializers, a constant subexpression, a repeated node and an unused branch."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y)
        <{init("w1", w)}, {init("w2", w)}, {init("c", np.array([2.0]))}, {init("unused", np.ones(3))}>
        {{
            c2 = Mul(c, c)
            a = MatMul(x, w1)
            b = MatMul(x, w2)
            a1 = Relu(a)
            a2 = Relu(a)
            s = Add(a1, a2)
            t = Mul(s, c2)
            dead = Sigmoid(x)
            y = Add(t, b)
        }}
        """
    )


def mlp_model(k: int = 8, h: int = 16, n: int = 4, seed: int = 0) -> ir.Model:
    """x[N,k] -> MatMul -> Add bias -> Relu -> MatMul -> y[N,n]."""
    rng = np.random.default_rng(seed)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,{k}] x) => (float[N,{n}] y)
        <{init("w1", rng.standard_normal((k, h)))}, {init("b1", rng.standard_normal(h))}, {init("w2", rng.standard_normal((h, n)))}>
        {{
            a = MatMul(x, w1)
            b = Add(a, b1)
            r = Relu(b)
            y = MatMul(r, w2)
        }}
        """
    )


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def check_full(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def apply_and_check(
    pass_: Pass,
    model: ir.Model,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    min_cosine: float | None = None,
    calibration=None,
    inputs=None,
    idempotent: bool = True,
) -> tuple[ir.Model, bool]:
    """Apply a pass to a copy, check ORT equality with the original, idempotence and the full checker."""
    check_full(model)
    work = copy_model(model)
    pass_.context = PassContext(calibration=calibration)
    result = pass_(work)
    report = validate(ir.to_proto(model), result.model, inputs=inputs, tolerance=Tolerance(atol, rtol, min_cosine))
    assert report.passed, report.outputs
    if idempotent:
        again = pass_(result.model)
        assert not again.modified, f"{pass_} is not idempotent"
    check_full(result.model)
    return result.model, result.modified
