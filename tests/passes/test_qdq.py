"""The qdq pass on small graphs: op types after the rewrite, ORT numerics within stated tolerances,
idempotence, the full checker, option text round trip and bad input."""

import numpy as np
import onnx_ir as ir
import pytest
from graphs import apply_and_check, check_full, copy_model, init, mlp_model, op_types, text_model

from onnxpress import runtime
from onnxpress.errors import UsageError
from onnxpress.pass_infra import PassContext
from onnxpress.passes.qdq import Qdq
from onnxpress.pipeline import PassFailedError, Pipeline
from onnxpress.validate import Tolerance, validate


def feeds_for(name: str, shape: tuple[int, ...], batches: int = 4, seed: int = 0, scale: np.ndarray | float = 1.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{name: (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(batches)]


def run_pass(p: Qdq, model: ir.Model, calibration=None) -> tuple[ir.Model, bool]:
    work = copy_model(model)
    p.context = PassContext(calibration=calibration)
    result = p(work)
    return result.model, result.modified


def mlp(k=32, h=64, n=16, seed=0):
    return mlp_model(k, h, n, seed)


def test_static_mlp_quantizes_weights_and_matmul_inputs():
    model = mlp()
    cal = feeds_for("x", (16, 32))
    val = feeds_for("x", (16, 32), batches=1, seed=9)[0]
    out, modified = apply_and_check(Qdq(mode="static", weight_type="uint8"), model, min_cosine=0.999, calibration=cal, inputs=val)
    assert modified
    ops = op_types(out)
    assert ops.count("QuantizeLinear") == 2  # x and the ReLU output; the bias Add stays float
    assert ops.count("DequantizeLinear") == 4  # 2 activations + 2 weights
    assert ops.count("MatMul") == 2 and "Add" in ops
    weights = [v for name, v in out.graph.initializers.items() if name.endswith("_quantized")]
    assert len(weights) == 2 and all(v.const_value.dtype == ir.DataType.UINT8 for v in weights)  # both weight matrices are 8-bit now, float copies removed
    assert "w1" not in out.graph.initializers and "w2" not in out.graph.initializers
    dq_w = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w")]
    assert all(n.attributes.get_int("axis") == 1 for n in dq_w)  # MatMul [K, N]: per output column


def test_static_output_error_per_layer_is_reported():
    p = Qdq(mode="static")
    out, _ = run_pass(p, mlp(), feeds_for("x", (16, 32)))
    rows = [r for r in p.details if "skipped" not in r]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["weight_rel_error"] < 0.02
        assert row["output_cosine"] > 0.999
        assert row["bytes_after"] < row["bytes_before"] / 3.5
        (act,) = row["activations"].values()
        assert act["clipped_fraction"] == 0.0  # minmax: nothing clipped on the calibration data
        assert act["scale"] > 0


def test_static_without_calibration_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration"):
        run_pass(Qdq(mode="static"), mlp())


def test_calibration_that_does_not_match_the_model_is_a_usage_error():
    with pytest.raises(UsageError, match="missing x"):
        run_pass(Qdq(mode="static"), mlp(), [{"y": np.zeros((2, 32), np.float32)}])
    with pytest.raises(UsageError, match="rank"):
        run_pass(Qdq(mode="static"), mlp(), [{"x": np.zeros((2, 3, 32), np.float32)}])


def test_weight_mode_needs_no_calibration_and_fuses_in_ort():
    model = mlp()
    val = feeds_for("x", (8, 32), batches=1, seed=3)[0]
    out, modified = apply_and_check(Qdq(mode="weight"), model, min_cosine=0.9999, inputs=val)
    assert modified
    ops = op_types(out)
    assert ops.count("DequantizeLinear") == 2 and "QuantizeLinear" not in ops


def gemm_model(trans_b: int) -> ir.Model:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32) if trans_b else (32, 16)).astype(np.float32)
    w[:, 0 if trans_b else 0] *= 1.0
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,32] x) => (float[N,16] y)
        <{init("w", w)}, {init("b", rng.standard_normal(16))}>
        {{
            y = Gemm<transB={trans_b}>(x, w, b)
        }}
        """
    )


@pytest.mark.parametrize("trans_b,axis", [(1, 0), (0, 1)])
def test_gemm_per_channel_axis_follows_trans_b(trans_b, axis):
    model = gemm_model(trans_b)
    cal = feeds_for("x", (16, 32))
    out, _ = apply_and_check(Qdq(mode="static"), model, min_cosine=0.9995, calibration=cal, inputs=cal[0])
    (dq_w,) = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "w_quantized"]
    assert dq_w.attributes.get_int("axis") == axis
    assert dq_w.inputs[1].const_value.shape == (16,)  # one scale per output channel


def ort_kernels(model: ir.Model) -> list[str]:
    """The op types ORT runs after its graph optimizations (CPU)."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    so = runtime.session_options()
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("trans_b", [1, 0])
def test_static_gemm_bias_becomes_int32_so_ort_runs_qgemm(trans_b):
    """A float C keeps ORT's Gemm in float (weights dequantized every run); an int32 C at a_scale * w_scale fuses."""
    cal = feeds_for("x", (16, 32))
    apply_and_check(Qdq(mode="static"), gemm_model(trans_b), min_cosine=0.9995, calibration=cal, inputs=cal[0])
    p = Qdq(mode="static")
    out, _ = run_pass(p, gemm_model(trans_b), cal)
    (dq_c,) = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "b_quantized"]
    codes, scale = dq_c.inputs[0].const_value.numpy(), dq_c.inputs[1].const_value.numpy()
    assert codes.dtype == np.int32 and scale.shape == (16,)
    a_scale = next(n for n in out.graph if n.op_type == "QuantizeLinear").inputs[1].const_value.numpy()
    w_scale = next(n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "w_quantized").inputs[1].const_value.numpy()
    np.testing.assert_allclose(scale, a_scale * w_scale, rtol=1e-6)
    assert p.details[0]["bias"] == "int32 (QGemm)"
    kernels = ort_kernels(out)
    assert "QGemm" in kernels and "Gemm" not in kernels and "FusedGemm" not in kernels


def gemm_relu_gemm_model(outliers: float = 30.0) -> ir.Model:
    """Gemm(transB) + bias -> Relu -> Gemm + bias; a few hidden channels are far larger than the rest."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w1[[5, 40]] *= outliers
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,32] x) => (float[N,16] y)
        <{init("w1", w1)}, {init("b1", rng.standard_normal(64))}, {init("w2", rng.standard_normal((64, 16)))}, {init("b2", rng.standard_normal(16))}>
        {{
            h = Gemm<transB=1>(x, w1, b1)
            r = Relu(h)
            y = Gemm(r, w2, b2)
        }}
        """
    )


def test_smoothing_folds_into_the_producing_gemm_through_relu():
    """SmoothQuant's 1/s of the Relu output goes into the first Gemm's weight rows and bias: no Mul at run time,
    and Relu -> QuantizeLinear stays adjacent, so ORT fuses both layers into QGemm (with a Mul between them the
    first stays a float FusedGemm)."""
    model = gemm_relu_gemm_model()
    cal = feeds_for("x", (64, 32), batches=8)
    held_out = feeds_for("x", (64, 32), batches=1, seed=9)[0]
    apply_and_check(Qdq(mode="static", smooth="fixed", smooth_alpha=0.5), model, min_cosine=0.999, calibration=cal, inputs=held_out)
    p = Qdq(mode="static", smooth="fixed", smooth_alpha=0.5)
    out, _ = run_pass(p, model, cal)
    assert [n.inputs[0].name for n in out.graph if n.op_type == "Mul"] == ["x"]  # the graph input keeps its Mul
    second = next(r for r in p.details if r.get("weight") == "w2")
    assert second["activations"]["r"]["smooth"]["folded_into"] == next(r for r in p.details if r.get("weight") == "w1")["layer"]
    assert ort_kernels(out).count("QGemm") == 2 and "FusedGemm" not in ort_kernels(out)


def test_fold_through_matmul_bias_add_and_per_layer_report():
    """MatMul + Add(bias) -> Relu producer: the fold also scales the Add's bias; report_errors quantizes each layer
    alone, so the producer alone must undo its 1/s (x * s) for the float consumer: every layer stays faithful."""
    cal = feeds_for("x", (16, 32))
    apply_and_check(Qdq(mode="static", smooth="fixed", smooth_alpha=0.5), mlp(), min_cosine=0.999, calibration=cal, inputs=cal[0])
    p = Qdq(mode="static", smooth="fixed", smooth_alpha=0.5, report_errors=True)
    out, _ = run_pass(p, mlp(), cal)
    assert [n.inputs[0].name for n in out.graph if n.op_type == "Mul"] == ["x"]
    rows = [r for r in p.details if "skipped" not in r]
    assert len(rows) == 2 and all(0.999 < r["model_cosine_alone"] <= 1.0 for r in rows)


def conv_model() -> ir.Model:
    rng = np.random.default_rng(2)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,4,6,6] y)
        <{init("w", rng.standard_normal((4, 3, 3, 3)))}, {init("b", rng.standard_normal(4))}>
        {{
            c = Conv(x, w, b)
            y = Relu(c)
        }}
        """
    )


@pytest.mark.parametrize("mode", ["static", "weight"])
def test_conv_weight_per_output_channel(mode):
    cal = feeds_for("x", (4, 3, 8, 8))
    out, modified = apply_and_check(Qdq(mode=mode), conv_model(), min_cosine=0.9995, calibration=cal, inputs=cal[0])
    assert modified
    dq = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w")]
    assert len(dq) == 1 and dq[0].attributes.get_int("axis") == 0 and dq[0].inputs[1].const_value.shape == (4,)
    assert op_types(out).count("QuantizeLinear") == (1 if mode == "static" else 0)


def embedding_model(vocab=64, dim=64, n=32) -> ir.Model:
    rng = np.random.default_rng(3)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[B,S] ids) => (float[B,S,{n}] y)
        <{init("table", rng.standard_normal((vocab, dim)))}, {init("w", rng.standard_normal((dim, n)) * 0.1)}>
        {{
            e = Gather<axis=0>(table, ids)
            y = MatMul(e, w)
        }}
        """
    )


def id_feeds(batches=8, seed=0):
    """Token ids; 8 batches of 64 cover every row of the 64-row table (calibration must see the rows used later)."""
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 64, (4, 16)).astype(np.int64)} for _ in range(batches)]


def test_embedding_gather_int8_per_row():
    cal = id_feeds()
    out, _ = apply_and_check(Qdq(mode="static"), embedding_model(), min_cosine=0.999, calibration=cal, inputs=id_feeds(1, seed=5)[0])
    ops = op_types(out)
    assert ops.count("Gather") == 2 and "Cast" in ops and "Mul" in ops  # codes and row scales are gathered
    assert out.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.INT8
    assert out.graph.initializers["table_scale"].const_value.shape == (64, 1)
    p = Qdq(mode="static")
    run_pass(p, embedding_model(), cal)
    (row,) = [r for r in p.details if r.get("op") == "Gather"]
    assert row["weight_rel_error"] < 0.01


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_int4_formats(fmt):
    cal = id_feeds()
    p = Qdq(mode="int4", int4_format=fmt, embedding_block_size=32)
    out, modified = apply_and_check(p, embedding_model(), min_cosine=0.99, calibration=cal, inputs=id_feeds(1, seed=5)[0])
    assert modified
    ops = op_types(out)
    if fmt == "matmulnbits":
        assert ops == ["GatherBlockQuantized", "MatMulNBits"]
        node = next(n for n in out.graph if n.op_type == "MatMulNBits")
        assert (node.attributes.get_int("K"), node.attributes.get_int("N"), node.attributes.get_int("block_size")) == (64, 32, 32)
    else:
        assert ops.count("DequantizeLinear") == 2 and "MatMulNBits" not in ops
        dq = [n for n in out.graph if n.op_type == "DequantizeLinear"]
        assert {n.attributes.get_int("block_size") for n in dq} == {32}
        assert all(n.inputs[0].const_value.dtype == ir.DataType.UINT4 for n in dq)
    run_pass(p, embedding_model(), cal)
    rows = [r for r in p.details if r.get("op") == "MatMul"]
    assert rows[0]["method"] == "gptq" and rows[0]["output_cosine"] > 0.99
    assert rows[0]["bytes_after"] < rows[0]["bytes_before"] / 6  # 4-bit codes + one scale and zero point per 32


def test_int4_matmulnbits_pads_k_to_the_block():
    model = mlp(k=40, h=24, n=8)  # K=40 and K=24: not multiples of 32
    val = feeds_for("x", (8, 40), batches=1)[0]
    out, _ = apply_and_check(Qdq(mode="int4", weight_method="mse"), model, min_cosine=0.98, inputs=val)
    assert op_types(out).count("MatMulNBits") == 2


def test_smoothquant_helps_an_activation_with_outlier_channels():
    scale = np.ones(32, np.float32)
    scale[[3, 17]] = 60.0  # two outlier channels, as in transformer LayerNorm outputs
    cal = feeds_for("x", (128, 32), batches=8, scale=scale)
    val = feeds_for("x", (256, 32), batches=1, seed=7, scale=scale)[0]  # held-out data
    errs, layer = {}, {}
    for smooth in ("off", "auto"):
        p = Qdq(mode="static", smooth=smooth, weight_method="rtn")
        out, _ = run_pass(p, mlp(), cal)
        layer[smooth] = p.details[0]["output_rel_error"]
        errs[smooth] = validate(ir.to_proto(mlp()), out, inputs=val, tolerance=Tolerance(min_cosine=0.99)).outputs[0].rel_l2
    assert layer["auto"] < 0.5 * layer["off"]  # first layer on the calibration sample
    assert errs["auto"] < 0.8 * errs["off"]  # whole model on held-out data
    assert "Mul" in op_types(out)  # x / s before QuantizeLinear


def test_exclude_by_name_and_op_type_and_extra_activation_ops():
    model = mlp()
    names = [n.name for n in model.graph if n.op_type == "MatMul"]
    if not names[0]:
        for i, n in enumerate(model.graph):
            n.name = f"n{i}"
        names = [n.name for n in model.graph if n.op_type == "MatMul"]
    cal = feeds_for("x", (16, 32))
    p = Qdq(mode="static", exclude=(names[0],))
    out, _ = run_pass(p, model, cal)
    assert op_types(out).count("QuantizeLinear") == 1
    assert any(r.get("skipped") == "excluded by option" for r in p.details)
    out, modified = run_pass(Qdq(mode="static", exclude=("MatMul",)), model, cal)
    assert not modified and "QuantizeLinear" not in op_types(out)
    out, _ = apply_and_check(Qdq(mode="static", quantize_activations_of=("Add",)), model, min_cosine=0.999, calibration=cal, inputs=cal[0])
    add = next(n for n in out.graph if n.op_type == "Add")
    assert add.inputs[0].producer().op_type == "DequantizeLinear"


def test_already_quantized_model_is_skipped_with_a_reason():
    cal = feeds_for("x", (16, 32))
    out, _ = run_pass(Qdq(mode="static"), mlp(), cal)
    for mode in ("static", "weight", "int4"):
        p = Qdq(mode=mode)
        again, modified = run_pass(p, out, cal)
        assert not modified
        assert op_types(again) == op_types(out)
        assert any("already quantized" in r.get("skipped", "") for r in p.details)
    check_full(out)


def test_report_errors_measures_each_layer_alone_in_ort():
    cal = feeds_for("x", (16, 32))
    p = Qdq(mode="static", report_errors=True)
    run_pass(p, mlp(), cal)
    rows = [r for r in p.details if "skipped" not in r]
    assert len(rows) == 2 and all(0.999 < r["model_cosine_alone"] <= 1.0 for r in rows)


def test_pipeline_text_round_trip_and_option_validation():
    text = "qdq(mode=int4,block_size=64,int4_format=qdq,exclude=[Conv,lm_head])"
    pipe = Pipeline.parse(text)
    assert str(pipe) == text
    assert pipe.passes[0].options.exclude == ("Conv", "lm_head")
    assert Pipeline.parse(str(pipe)) == pipe
    with pytest.raises(UsageError, match="block_size"):
        Pipeline.parse("qdq(block_size=48)")
    with pytest.raises(UsageError, match="not one of"):
        Pipeline.parse("qdq(mode=int3)")


def test_api_optimize_with_calibration_feeds():
    import onnxpress

    model = mlp()
    cal = feeds_for("x", (16, 32))
    out, report = onnxpress.optimize(model, "qdq", calibration=cal, inputs=cal[0])
    assert report.passed and report.validation.min_cosine > 0.999
    assert report.bytes_after < report.bytes_before
    with pytest.raises(PassFailedError, match="calibration"):
        onnxpress.optimize(model, "qdq")


def test_ort_runs_the_quantized_model_with_integer_kernels():
    """ORT fuses the static pattern into MatMulIntegerToFloat (the CPU speedup relies on it)."""
    cal = feeds_for("x", (16, 32))
    out, _ = run_pass(Qdq(mode="static"), mlp(), cal)
    fused = ort_kernels(out)
    # MatMul -> MatMulIntegerToFloat; MatMul+Add+ReLU before a QuantizeLinear -> QGemm
    assert fused.count("MatMulIntegerToFloat") + fused.count("QGemm") == 2
    assert "MatMul" not in fused and "Gemm" not in fused


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["static", "weight"])
def test_digits_accuracy_drop_at_most_half_a_point(kind, mode):
    """On the trained digits classifiers: int8 keeps top-1 accuracy within 0.5 points of fp32."""
    digits = pytest.importorskip("onnxpress.models.digits")
    model = ir.load(digits.build(kind))
    p = Qdq(mode=mode)
    out, modified = run_pass(p, model, digits.calibration_feeds(kind))
    assert modified
    ops = op_types(out)
    assert "Gemm" in ops and ops.count("DequantizeLinear") >= (5 if kind == "cnn" else 3)
    assert ("QuantizeLinear" in ops) == (mode == "static")
    metrics = digits.evaluate(ir.to_proto(out), kind)
    assert metrics["accuracy_drop"] <= 0.005, metrics
    assert metrics["agreement"] >= 0.98, metrics
    check_full(out)
    again, modified = run_pass(Qdq(mode=mode), out, digits.calibration_feeds(kind))
    assert not modified


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_digits_mlp_int4_gemm_keeps_accuracy(fmt):
    """int4 covers the MLP's Gemm layers (transB=1 from torch): top-1 within 0.5 points of fp32, full checker passes."""
    digits = pytest.importorskip("onnxpress.models.digits")
    model = ir.load(digits.build("mlp"))
    p = Qdq(mode="int4", int4_format=fmt)
    out, modified = run_pass(p, model, digits.calibration_feeds("mlp"))
    assert modified
    if fmt == "matmulnbits":
        assert "Gemm" not in op_types(out) and op_types(out).count("MatMulNBits") >= 3
    else:
        assert op_types(out).count("DequantizeLinear") >= 3
    metrics = digits.evaluate(ir.to_proto(out), "mlp")
    assert metrics["accuracy_drop"] <= 0.005 and metrics["agreement"] >= 0.98, metrics
    check_full(out)


def scaled_gemm_model(trans_b: int, k: int = 64) -> ir.Model:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, k) if trans_b else (k, 16)).astype(np.float32)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,{k}] x) => (float[N,16] y)
        <{init("w", w)}, {init("b", rng.standard_normal(16))}>
        {{
            y = Gemm<transB={trans_b}, alpha=0.5, beta=2.0>(x, w, b)
        }}
        """
    )


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_int4_gemm_handles_trans_b_alpha_and_beta(fmt, trans_b):
    cal = feeds_for("x", (16, 64))
    p = Qdq(mode="int4", int4_format=fmt)
    out, modified = apply_and_check(p, scaled_gemm_model(trans_b), min_cosine=0.985, calibration=cal, inputs=feeds_for("x", (8, 64), 1, seed=3)[0])
    assert modified
    ops = op_types(out)
    if fmt == "matmulnbits":
        assert ops == ["MatMulNBits", "Add"]  # alpha folded into the block scales, beta * C into the Add
        node = out.graph.node(0)
        assert (node.attributes.get_int("K"), node.attributes.get_int("N")) == (64, 16)
    else:
        assert ops == ["DequantizeLinear", "Gemm"]
        (dq,) = [n for n in out.graph if n.op_type == "DequantizeLinear"]
        assert dq.attributes.get_int("axis") == (1 if trans_b else 0)  # blocks run along K in the node's layout
        assert dq.inputs[0].const_value.shape == ((16, 64) if trans_b else (64, 16))
        assert dq.inputs[1].const_value.shape == ((16, 2) if trans_b else (2, 16))
    run_pass(p, scaled_gemm_model(trans_b), cal)
    (row,) = [r for r in p.details if r.get("op") == "Gemm"]
    assert row["method"] == "gptq" and row["output_cosine"] > 0.99


def test_int4_gemm_with_a_computed_bias_scales_it_by_beta():
    rng = np.random.default_rng(5)
    model = text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N,32] x, float[16] c) => (float[N,16] y)
        <{init("w", rng.standard_normal((32, 16)))}>
        {{
            y = Gemm<beta=3.0>(x, w, c)
        }}
        """
    )
    feeds = {"x": rng.standard_normal((8, 32)).astype(np.float32), "c": rng.standard_normal(16).astype(np.float32)}
    out, _ = apply_and_check(Qdq(mode="int4", weight_method="rtn"), model, min_cosine=0.98, inputs=feeds)
    assert op_types(out) == ["MatMulNBits", "Mul", "Add"]


def named_mlp() -> tuple[ir.Model, str, str]:
    """mlp() with every node named, and the names of its two MatMuls."""
    model = mlp()
    for i, n in enumerate(model.graph):
        n.name = n.name or f"n{i}"
    first, second = [n.name for n in model.graph if n.op_type == "MatMul"]
    return model, first, second


def test_include_quantizes_only_the_named_nodes_or_op_types():
    model, first, second = named_mlp()
    cal = feeds_for("x", (16, 32))
    p = Qdq(mode="static", include=(second,))
    out, modified = run_pass(p, model, cal)
    assert modified
    quantized = [n.name for n in out.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None]
    assert quantized == [second]
    assert "w1" in out.graph.initializers and "w2" not in out.graph.initializers  # the first weight stays float
    assert [r["layer"] for r in p.details if r.get("skipped") == "not in include"] == [first]
    # op types work too, and exclude wins over include
    out, modified = run_pass(Qdq(mode="weight", include=("MatMul",), exclude=(first,)), model)
    assert modified and "w1" in out.graph.initializers and "w2" not in out.graph.initializers
    out, modified = run_pass(Qdq(mode="weight", include=("Conv",)), model)
    assert not modified
    assert str(Pipeline.parse("qdq(include=[MatMul,lm_head])")) == "qdq(include=[MatMul,lm_head])"


def test_weight_type_auto_follows_the_cpu():
    from onnxpress.passes import qdq as qdq_module

    p = Qdq(mode="weight")
    out, _ = run_pass(p, mlp())
    expected = qdq_module.resolved_weight_type(p.options)
    assert expected == ("int8" if qdq_module.cpu_has_int8_dot() else "uint8")
    weights = [v.const_value.dtype for name, v in out.graph.initializers.items() if name.endswith("_quantized")]
    assert set(weights) == {ir.DataType.INT8 if expected == "int8" else ir.DataType.UINT8}
    assert {r["weight_type"] for r in p.details} == {expected}
    assert qdq_module.resolved_weight_type(Qdq(weight_type="uint8", reduce_range=True).options) == "uint8"  # explicit wins
    assert qdq_module.resolved_weight_type(Qdq(reduce_range=True).options) == "int8"  # 7-bit weights cannot saturate


def test_bias_correction_removes_the_mean_output_error():
    """Activations with a large common offset: weight rounding shifts every output by about the same amount;
    bias correction folds the mean shift into the float bias (held-out data: lower error, bias changed)."""
    offset = np.linspace(-3, 3, 32).astype(np.float32)
    rng = np.random.default_rng(11)
    cal = [{"x": (rng.standard_normal((64, 32)) * 0.3 + offset).astype(np.float32)} for _ in range(4)]
    val = {"x": (rng.standard_normal((256, 32)) * 0.3 + offset).astype(np.float32)}
    errs, biases = {}, {}
    for on in (False, True):
        p = Qdq(mode="static", bias_correction=on, smooth="off", weight_method="rtn", per_channel=False)
        out, _ = run_pass(p, mlp(), cal)
        errs[on] = validate(ir.to_proto(mlp()), out, inputs=val, tolerance=Tolerance(min_cosine=0.99)).outputs[0].rel_l2
        biases[on] = out.graph.initializers["b1"].const_value.numpy().copy()
        first, second = [r for r in p.details if "output_rel_error" in r]  # only the first MatMul has a bias Add
        assert ("output_rel_error_before_bias_correction" in first) == on and "output_rel_error_before_bias_correction" not in second
        if on:
            assert first["output_rel_error"] < first["output_rel_error_before_bias_correction"]
    assert errs[True] < 0.8 * errs[False]
    assert not np.array_equal(biases[True], biases[False])


def test_weight_only_keeps_a_layers_activation_float_but_quantizes_its_weight():
    model, first, second = named_mlp()
    cal = feeds_for("x", (16, 32))
    out, _ = apply_and_check(Qdq(mode="static", weight_only=(first,)), model, min_cosine=0.999, calibration=cal, inputs=cal[0])
    assert op_types(out).count("QuantizeLinear") == 1  # only the second MatMul's input
    by_name = {n.name: n for n in out.graph}
    assert by_name[first].inputs[0].name == "x"  # float activation
    assert by_name[first].inputs[1].producer().op_type == "DequantizeLinear"  # int8 weight
    assert by_name[second].inputs[0].producer().op_type == "DequantizeLinear"
    out, _ = run_pass(Qdq(mode="static", weight_only=("MatMul",)), model, cal)
    assert "QuantizeLinear" not in op_types(out) and op_types(out).count("DequantizeLinear") == 2


def test_embedding_split_keeps_used_rows_at_4_bits_and_the_rest_at_2():
    """Rows the calibration ids select stay 4-bit; the others go 2-bit. Lookups of used rows match the plain
    int4 table exactly; unused rows are coarser but still close; the table shrinks."""
    import onnxruntime as ort

    model = embedding_model(vocab=256, dim=64)
    rng = np.random.default_rng(0)
    cal = [{"ids": rng.integers(0, 40, (4, 16)).astype(np.int64)} for _ in range(4)]  # rows 0..39 only
    hot = Qdq(mode="int4", embedding_split=True, embedding_block_size=16, embedding_cold_block_size=32, include=["table", "Gather"])
    plain = Qdq(mode="int4", embedding_block_size=16, include=["Gather"])
    split_model, _ = run_pass(hot, model, cal)
    plain_model, _ = run_pass(plain, model, cal)
    row = next(r for r in hot.details if "embedding_split" in r)
    assert row["embedding_split"]["hot_rows"] == 40 and row["embedding_split"]["cold_rows"] == 216
    assert row["bytes_after"] < next(r for r in plain.details if r.get("op") == "Gather")["bytes_after"] * 0.7
    assert "Where" in op_types(split_model) and op_types(split_model).count("GatherBlockQuantized") == 2
    check_full(split_model)

    def run(m, ids):
        s = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"ids": ids})[0]

    used = np.array([[0, 5, 39, -256]], np.int64)  # -256 is row 0
    np.testing.assert_allclose(run(split_model, used), run(plain_model, used), rtol=1e-6, atol=1e-6)
    unused = np.arange(40, 256, dtype=np.int64).reshape(8, 27)
    ref = run(model, unused)
    err = np.linalg.norm(run(split_model, unused) - ref) / np.linalg.norm(ref)
    err4 = np.linalg.norm(run(plain_model, unused) - ref) / np.linalg.norm(ref)
    assert err4 < err < 0.45  # 2-bit rows: coarser than 4-bit, not garbage


def test_embedding_split_needs_calibration_and_matmulnbits():
    with pytest.raises(PassFailedError, match="calibration"):
        Pipeline.parse("qdq(mode=int4,embedding_split=true)").run(embedding_model())
    with pytest.raises(UsageError, match="matmulnbits"):
        Pipeline.parse("qdq(mode=int4,embedding_split=true,int4_format=qdq)")
    with pytest.raises(UsageError, match="int4 embeddings"):
        Pipeline.parse("qdq(mode=weight,embedding_split=true)")


def test_smooth_min_gain_keeps_only_smoothing_that_pays_for_its_mul():
    """Outlier channels: smoothing cuts the layer error far more than 2x, so it stays at min_gain=2; an absurd
    min_gain drops it (no Mul), at a measurably larger error."""
    scale = np.ones(32, np.float32)
    scale[[3, 17]] = 60.0
    cal = feeds_for("x", (128, 32), batches=8, scale=scale)
    kept, dropped = Qdq(mode="static", smooth_min_gain=2.0), Qdq(mode="static", smooth_min_gain=1000.0)
    out_kept, _ = run_pass(kept, mlp(), cal)
    out_dropped, _ = run_pass(dropped, mlp(), cal)
    assert kept.details[0]["activations"]["x"]["smooth"] is not None
    assert dropped.details[0]["activations"]["x"]["smooth"] is None
    assert [n.inputs[0].name for n in out_kept.graph if n.op_type == "Mul"] == ["x"]
    assert not [n for n in out_dropped.graph if n.op_type == "Mul"]
    assert dropped.details[0]["output_rel_error"] > 2 * kept.details[0]["output_rel_error"]
    with pytest.raises(UsageError, match="smooth_min_gain"):
        Pipeline.parse("qdq(smooth_min_gain=0.5)")


def test_embedding_split_finds_used_rows_behind_other_ops():
    """Indices computed in the graph (here ids + 1) are captured in ORT, not read from the feeds."""
    rng = np.random.default_rng(3)
    model = text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[B,S] ids) => (float[B,S,64] e)
        <{init("table", rng.standard_normal((128, 64)))}, int64 one = {{1}}>
        {{
            j = Add(ids, one)
            e = Gather<axis=0>(table, j)
        }}
        """
    )
    cal = [{"ids": rng.integers(0, 10, (2, 8)).astype(np.int64)} for _ in range(3)]
    p = Qdq(mode="int4", embedding_split=True, embedding_block_size=16, embedding_cold_block_size=32)
    out, _ = run_pass(p, model, cal)
    used = np.unique(np.concatenate([f["ids"].reshape(-1) for f in cal]) + 1)
    row = next(r for r in p.details if "embedding_split" in r)
    assert row["embedding_split"]["hot_rows"] == used.size and used.min() >= 1
    check_full(out)


def test_target_defaults_are_valid_options_with_a_reason_each():
    """Qdq.target_defaults / target_reasons (what --target changes, read by onnxpress.targets): every override
    is a valid qdq option value and says why."""
    from onnxpress import targets

    assert set(Qdq.target_defaults) == set(Qdq.target_reasons) == {"cuda", "mobile"}
    for target, overrides in Qdq.target_defaults.items():
        assert Qdq(**overrides).options != Qdq().options
        assert set(Qdq.target_reasons[target]) == set(overrides)
        assert all(reason for reason in Qdq.target_reasons[target].values())
    assert dict(targets.get_target("mobile").pass_defaults["qdq"]) == Qdq.target_defaults["mobile"]
    assert targets.get_target("cuda").reasons["qdq.weight_type"] == Qdq.target_reasons["cuda"]["weight_type"]
    assert "qdq" not in targets.get_target("cpu").pass_defaults


# -- memory and time at LLM scale: the same results from smaller and faster pieces -----------------------------
def test_gram_sum_stores_the_upper_triangle_and_equals_the_summed_products():
    """calib_stats.GramSum (the X^T X GPTQ rounds against, accumulated over calibration batches): its matrix is
    exactly the sum of each batch's ``(x.T @ x).astype(dtype)``, in about half of the memory."""
    from onnxpress.passes.calib_stats import GramSum

    rng = np.random.default_rng(0)
    for k, dtype in ((300, np.float32), (129, np.float64), (7, np.float32)):
        gram, expected = GramSum(k, dtype), None
        for n in (5, 200, 1):
            x = rng.standard_normal((n, k)).astype(np.float32)
            gram.add(x)
            product = (x.T @ x).astype(dtype)
            expected = product if expected is None else expected + product
        full = gram.full()
        assert full.dtype == dtype and np.array_equal(full, expected)
    big = GramSum(1536, np.float32)
    assert big.nbytes < 0.55 * 1536 * 1536 * 4


def test_gptq_inverse_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U with U^T U = inv(H + damp * mean diag * I), upper triangular with a positive diagonal; a dead input (zero
    on the data) is marked and gets 1 on the diagonal first. Sizes across the halving of the triangular inverse."""
    from onnxpress.passes import quant_math as qm

    rng = np.random.default_rng(1)
    for k in (40, 65, 200):
        x = rng.standard_normal((3 * k, k)) * rng.uniform(0.1, 10.0, k)
        x[:, 3] = 0.0
        h = x.T @ x
        u, dead = qm.gptq_inverse(h, damp=0.01)
        assert np.flatnonzero(dead).tolist() == [3]
        damped = h.copy()
        damped[3, 3] = 1.0
        damped[np.diag_indices(k)] += 0.01 * np.mean(np.diag(damped))
        expected = np.linalg.inv(damped)
        np.testing.assert_allclose(u.T @ u, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
        assert np.array_equal(np.tril(u, -1), np.zeros_like(u)) and np.all(np.diag(u) > 0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", ["mse", "none"])
def test_block_params_equals_the_search_over_fake_quant(symmetric, clip):
    """block_params computes fake_quant by hand with reused buffers (and skips the error without a search): the
    same scales and zero points as trying each clip ratio with fake_quant and keeping the first best one."""
    from onnxpress.passes import quant_math as qm

    rng = np.random.default_rng(2)
    block = rng.standard_normal((32, 300)) * rng.uniform(0.01, 3.0, 300)
    block[:, 7] = 0.0  # an all-zero column
    lo, hi = block.min(axis=0), block.max(axis=0)
    best = (np.full(300, np.inf), np.zeros(300, np.float32), np.zeros(300, np.int64))
    for r in np.linspace(1.0, 0.6, 24) if clip == "mse" else np.array([1.0]):
        if symmetric:
            s, z = qm.symmetric_scale(np.maximum(np.abs(lo), np.abs(hi)) * r, 15 - 8), np.full(300, 8, np.int64)
        else:
            s, z = qm.affine_params(lo * r, hi * r, 0, 15)
        err = ((qm.fake_quant(block, s, z, 0, 15) - block) ** 2).sum(axis=0)
        better = err < best[0]
        best = (np.where(better, err, best[0]), np.where(better, s, best[1]), np.where(better, z, best[2]))
    scales, zero_points = qm.block_params(block, 0, 15, symmetric, clip)
    assert np.array_equal(scales, best[1].astype(np.float32)) and np.array_equal(zero_points, best[2])


def test_layer_weights_apply_factors_in_order_and_unmap_external_data(tmp_path):
    """The plan's weights are computed when asked for: the model's weight with the row factors and column divisors
    in the order they were decided (float32 rounding as if applied one by one); a scaled copy lets the external
    data's mapping go, and ``done`` forgets the target."""
    from onnxpress import io
    from onnxpress.passes.qdq import QdqOptions, find_targets
    from onnxpress.passes.qdq.plan import LayerWeights

    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    model = text_model(f"""<ir_version: 10, opset_import: ["" : 17]> g (float[N,32] x) => (float[N,16] y) <{init("w", w)}> {{ y = MatMul(x, w) }}""")
    io.save(model, tmp_path / "m.onnx", external_data=True)
    model = io.load(str(tmp_path / "m.onnx"))
    (target,), _ = find_targets(model, QdqOptions(mode="int4", block_size=16))
    tensor = target.weight.const_value
    assert isinstance(tensor, ir.ExternalTensor)
    weights = LayerWeights([target])
    s1, s2 = rng.uniform(0.5, 2.0, 32).astype(np.float32), rng.uniform(0.5, 2.0, 16).astype(np.float32)
    weights.scale_rows(target.index, s1)
    weights.divide_columns(target.index, s2)
    weights.scale_rows(target.index, s1)
    assert np.array_equal(weights[target.index], ((w * s1[:, None]) / s2[None, :]) * s1[:, None])
    assert tensor.raw is None  # unmapped: the result is a copy
    weights.done(target.index)
    assert target.index not in weights


def test_plan_drops_each_input_statistics_after_its_last_reader(monkeypatch):
    """make_plan keeps a layer input's statistics (row sample, X^T X) and GPTQ factors only until the last layer
    that reads it is planned: nothing is left at the end, and the GPTQ factor of an input shared by two layers is
    made once."""
    from onnxpress.passes import quant_math as qm
    from onnxpress.passes.qdq import plan as plan_module

    kept: list[dict] = []
    collect = plan_module.collect_stats
    monkeypatch.setattr(plan_module, "collect_stats", lambda *a, **k: kept.append(collect(*a, **k)) or kept[-1])
    inverses = []
    inverse = qm.gptq_inverse
    monkeypatch.setattr(qm, "gptq_inverse", lambda h, *a: inverses.append(h.shape) or inverse(h, *a))
    rng = np.random.default_rng(4)
    model = text_model(
        f"""<ir_version: 10, opset_import: ["" : 17]> g (float[N,32] x) => (float[N,16] y, float[N,16] z)
        <{init("w1", rng.standard_normal((32, 64)))}, {init("w2", rng.standard_normal((64, 16)))}, {init("w3", rng.standard_normal((32, 16)))}>
        {{ h = MatMul(x, w1)  r = Relu(h)  y = MatMul(r, w2)  z = MatMul(x, w3) }}"""
    )
    p = Qdq(mode="int4", block_size=16, awq=True)
    run_pass(p, model, feeds_for("x", (16, 32)))
    assert len(kept) == 1 and len(kept[0]) == 0  # all dropped
    assert sorted(inverses) == [(32, 32), (64, 64)]  # x (read by two layers) once, r once
    assert all(r["method"] == "gptq" for r in p.details)


def _int4_output_error(p: Qdq, model: ir.Model, cal, held) -> tuple[ir.Model, float]:
    out, _ = run_pass(p, model, cal)
    ref = runtime.make_session(ir.to_proto(model)).run(None, held)[0]
    got = runtime.make_session(ir.to_proto(out)).run(None, held)[0]
    return out, float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_int4_signed_grid_act_order_and_refit_on_a_graph():
    """The full signed grid (no zero points stored, negative scales where a block's largest value is positive),
    GPTQ in act order with static groups and the least-squares scale refit: a lower output error in
    onnxruntime than plain symmetric blocks, on inputs whose channels differ in scale and are correlated."""
    rng = np.random.default_rng(7)
    channel = np.exp(rng.standard_normal(64)).astype(np.float32)
    mix = (np.eye(64) + 0.3 * rng.standard_normal((64, 64))).astype(np.float32)

    def feeds(batches, seed):
        r = np.random.default_rng(seed)
        return [{"x": (r.standard_normal((64, 64)).astype(np.float32) @ mix) * channel} for _ in range(batches)]

    model = mlp(k=64, h=64, n=16)
    cal, held = feeds(8, 0), feeds(1, 99)[0]
    _, plain = _int4_output_error(Qdq(mode="int4", int4_symmetric=True), model, cal, held)
    p = Qdq(mode="int4", int4_symmetric=True, int4_signed=True, gptq_act_order=True, gptq_refit=True)
    out, tuned = _int4_output_error(p, model, cal, held)
    assert tuned < 0.8 * plain, (tuned, plain)
    nodes = [n for n in out.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(len(n.inputs) == 3 for n in nodes)  # A, B, scales: MatMulNBits' implicit zero point 8
    scales = np.concatenate([n.inputs[2].const_value.numpy().ravel() for n in nodes])
    assert (scales < 0).any() and (scales > 0).any()
    assert [r["method"] for r in p.details if r.get("op") == "MatMul"] == ["gptq", "gptq"]
    check_full(out)
    # on the embedding table (Gather and its int4 rows) the signed grid is a layout ORT runs too
    apply_and_check(Qdq(mode="int4", int4_symmetric=True, int4_signed=True, embedding_block_size=32), embedding_model(), min_cosine=0.99,
                    calibration=id_feeds(), inputs=id_feeds(1, seed=5)[0])
    with pytest.raises(UsageError, match="int4_symmetric"):
        Qdq(mode="int4", int4_signed=True)
