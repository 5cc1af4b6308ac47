import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import check_full, copy_model, init, op_types, text_model
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxpress import runtime
from onnxpress.errors import UsageError
from onnxpress.pass_infra import PassContext
from onnxpress.passes import factorize as fz
from onnxpress.passes.factorize import Factorize
from onnxpress.pipeline import Pipeline
from onnxpress.validate import Tolerance, validate

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def low_rank(k: int, n: int, r: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
    return (w + noise * rng.standard_normal((k, n))).astype(np.float32)


def matmul_model(w: np.ndarray, batched: bool = False) -> ir.Model:
    k, n = w.shape
    shape = f"B,S,{k}" if batched else f"N,{k}"
    out = f"B,S,{n}" if batched else f"N,{n}"
    return text_model(f"{HEADER} g (float[{shape}] x) => (float[{out}] y) <{init('w', w)}> {{ y = MatMul(x, w) }}")


def gemm_model(w_t: np.ndarray, bias: np.ndarray, alpha: float = 0.5, beta: float = 2.0) -> ir.Model:
    n, k = w_t.shape  # transB=1: the weight is stored N x K
    return text_model(
        f"""{HEADER} g (float[M,{k}] x) => (float[M,{n}] y) <{init('wt', w_t)}, {init('c', bias)}>
        {{ y = Gemm<transB=1, alpha={alpha}, beta={beta}>(x, wt, c) }}"""
    )


def F(**options) -> Factorize:
    """The pass with min_size=0: the test layers are smaller than the default floor."""
    options.setdefault("min_size", 0)
    return Factorize(**options)


def run(pass_: Factorize, model: ir.Model, calibration=None) -> tuple[ir.Model, bool]:
    work = copy_model(model)
    pass_.context = PassContext(calibration=calibration)
    result = pass_(work)
    return result.model, result.modified


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = runtime.make_session(model)
    return runtime.run(session, feed)["y"]


# -- pure maths --------------------------------------------------------------------------------------
def test_breakeven_and_ratio_ranks():
    assert fz.breakeven_rank(384, 384) == 191  # 191*768 < 384^2 = 192*768
    assert 191 * 768 < 384 * 384 <= 192 * 768
    assert fz.breakeven_rank(384, 1536) == 307
    assert fz.breakeven_rank(1, 8) == 0
    assert fz.rank_for_ratio(384, 384, 0.5) == 96
    assert fz.rank_for_ratio(384, 1536, 0.75) == 230
    assert fz.rank_for_ratio(10, 10, 0.01) == 1


def test_energy_and_error_ranks():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert fz.rank_for_energy(s, 16 / 22) == 1
    assert fz.rank_for_energy(s, 0.75) == 2
    assert fz.rank_for_energy(s, 1.0) == 4
    np.testing.assert_allclose(fz.tail_error(s), np.sqrt([22, 6, 2, 1, 0]) / np.sqrt(22))
    assert fz.rank_for_error(s, np.sqrt(2 / 22)) == 2
    assert fz.rank_for_error(s, 0.29) == 3
    assert fz.rank_for_error(s, 0.0) == 4


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 24), n=st.integers(2, 24), r=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_plain_svd_error_identity(k, n, r, seed):
    w = np.random.default_rng(seed).standard_normal((k, n))
    r = min(r, min(k, n))
    s = np.linalg.svd(w, compute_uv=False)
    u, v = fz.factorize_matrix(w, r)
    assert u.shape == (k, r) and v.shape == (r, n)
    spec, fro = fz.weight_errors(w, u, v)
    discarded = np.sqrt(np.sum(s[r:] ** 2))
    assert np.linalg.norm(w - u @ v) == pytest.approx(discarded, rel=1e-7, abs=1e-9)
    assert fro == pytest.approx(discarded / np.linalg.norm(w), rel=1e-7, abs=1e-9)
    assert spec == pytest.approx((s[r] if r < len(s) else 0.0) / s[0], rel=1e-7, abs=1e-9)


def test_calibrated_output_error_identity_and_optimality():
    """Output-aware truncation: relative output error == discarded energy of L^T W, and below plain SVD's."""
    rng = np.random.default_rng(1)
    for k, n in ((32, 24), (24, 40)):  # both Gram sides
        r = 6
        x = rng.standard_normal((2000, k)) * np.geomspace(10.0, 0.01, k)  # strongly anisotropic inputs
        x = x @ np.linalg.qr(rng.standard_normal((k, k)))[0]
        w = rng.standard_normal((k, n))
        s2 = x.T @ x / len(x)
        sp = fz.spectrum(w, s2)
        chol = np.linalg.cholesky(s2)
        np.testing.assert_allclose(sp.s, np.linalg.svd(chol.T @ w, compute_uv=False), rtol=1e-6)
        u, v = fz.factors(w, sp, r)
        rel = np.linalg.norm(x @ w - x @ u @ v) / np.linalg.norm(x @ w)
        assert rel == pytest.approx(fz.tail_error(sp.s)[r], rel=1e-6)
        assert fz.output_error(w, u, v, s2) == pytest.approx(rel, rel=1e-6)
        # Eckart-Young: no rank-r output beats it; it equals the truncated SVD of X W itself
        sx = np.linalg.svd(x @ w, compute_uv=False)
        assert rel == pytest.approx(np.sqrt(np.sum(sx[r:] ** 2) / np.sum(sx**2)), rel=1e-6)
        up, vp = fz.factorize_matrix(w, r)
        plain = np.linalg.norm(x @ w - x @ up @ vp) / np.linalg.norm(x @ w)
        assert rel < 0.5 * plain  # measured: 0.22 vs 0.60


def test_singular_second_moment_and_full_rank():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 4)) @ rng.standard_normal((4, 8))  # rank 4 of 8: singular
    s2 = x.T @ x / 100
    for w in (rng.standard_normal((8, 6)), rng.standard_normal((8, 12))):
        u, v = fz.factorize_matrix(w, 4, s2)
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(v))
        np.testing.assert_allclose(x @ u @ v, x @ w, atol=1e-8)  # 4 directions carry all the output
        u, v = fz.factorize_matrix(w, min(w.shape))
        np.testing.assert_allclose(u @ v, w, atol=1e-12)  # full rank is exact
    u, v = fz.factorize_matrix(np.ones((6, 5)), 2, np.zeros((6, 6)))
    assert np.all(np.isfinite(u @ v))


def test_global_allocation_meets_budget_and_favours_compressible_layers():
    k = n = 64
    flat = np.ones(64)
    steep = np.geomspace(1.0, 1e-4, 64)
    ranks = fz.allocate_global([(k, n, flat), (k, n, steep)], ratio=0.75)
    total = sum(r * (k + n) if r is not None else k * n for r in ranks)
    assert total <= 0.75 * 2 * k * n
    assert ranks[0] is None  # the flat layer stays dense, the steep one pays for both
    assert ranks[1] is not None and ranks[1] < 32



@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])  # both branches of spectrum(): N <= K and N > K
def test_direction_energies_give_the_exact_truncation_error(shape):
    """sum_{i >= r} e_i = tr(D^T M D) for D = W - U V at every rank, whatever ridge the spectrum used:
    the error the budget predicts without multiplying (M: the covariance, S: the second moment)."""
    rng = np.random.default_rng(5)
    k, n = shape
    w = low_rank(k, n, 12, seed=5, noise=0.1).astype(np.float64)
    x = rng.standard_normal((300, k)) @ rng.standard_normal((k, k)) + 0.3
    s = x.T @ x / len(x)
    m = fz.centered(s, x.mean(axis=0))
    sp = fz.spectrum(w, m + 0.05 * np.mean(np.diag(m)) * np.eye(k))  # damped, as the pass does
    e = fz.direction_energies(w, sp.q, m)
    assert fz.output_energy(w, s) == pytest.approx(np.sum((x @ w) ** 2) / len(x), rel=1e-10)
    for r in (1, 5, 12, min(k, n) - 1):
        u, v = fz.factors(w, sp, r)
        d = w - u @ v
        assert np.sum(e[r:]) == pytest.approx(np.sum(d * (m @ d)), rel=1e-8, abs=1e-12)


# -- the pass on graphs ------------------------------------------------------------------------------
def test_matmul_full_rank_exact_and_ops():
    w = low_rank(48, 40, 8)
    model = matmul_model(w)
    out, modified = run(F(rank=8), model)
    assert modified
    assert op_types(out) == ["MatMul", "MatMul"]
    assert sorted(tuple(v.const_value.shape) for v in out.graph.initializers.values()) == [(8, 40), (48, 8)]
    assert "w" not in out.graph.initializers
    report = validate(ir.to_proto(model), out, tolerance=Tolerance(1e-4, 1e-4))
    assert report.passed and report.outputs[0].max_abs < 1e-4
    check_full(out)
    again = F(rank=8)
    assert not again(out).modified  # marked nodes are never factorized twice
    first, second = list(out.graph)
    assert first.metadata_props[fz.MARK] == "U rank=8" and second.metadata_props[fz.MARK] == "V rank=8"
    assert first.name == "y/factorize_U" and second.name == "y/factorize_V"


def test_batched_inputs_and_report():
    w = low_rank(64, 32, 4, noise=0.01)
    model = matmul_model(w, batched=True)
    p = F(ratio=0.5)
    out, modified = run(p, model)
    assert modified
    (row,) = p.details
    assert (row["K"], row["N"], row["rank"]) == (64, 32, 10)
    assert row["params_before"] == 2048 and row["params_after"] == 960
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert row["frobenius_error"] == pytest.approx(np.sqrt(np.sum(s[10:] ** 2)) / np.linalg.norm(s), abs=2e-6)
    assert row["spectral_error"] == pytest.approx(s[10] / s[0], abs=2e-6)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)}
    y_ref, y = outputs(model, feed), outputs(out, feed)
    rel = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert 0 < rel < 0.05  # rank 4 + small noise: the rank-10 truncation keeps almost everything
    check_full(out)


def test_gemm_trans_b_bias_alpha_beta_exact_at_full_rank():
    rng = np.random.default_rng(3)
    w_t = low_rank(40, 64, 6, seed=3).T.copy()  # K=40, N=64, stored N x K for transB=1
    bias = rng.standard_normal(64).astype(np.float32)
    model = gemm_model(w_t, bias)
    p = F(energy=1.0)
    out, modified = run(p, model)
    assert modified and p.details[0]["rank"] == 6
    assert op_types(out) == ["Gemm", "Gemm"]
    first, second = list(out.graph)
    assert second.inputs[2].name == "c"  # bias kept on the second product
    assert second.attributes.get_float("alpha") == 0.5 and second.attributes.get_float("beta") == 2.0
    assert first.inputs[1].const_value.shape == (40, 6)
    report = validate(ir.to_proto(model), out, tolerance=Tolerance(1e-4, 1e-4))
    assert report.passed, report.outputs
    check_full(out)
    assert not F(energy=1.0)(out).modified


def test_gemm_trans_a():
    rng = np.random.default_rng(4)
    w = low_rank(32, 48, 5, seed=4)
    model = text_model(
        f"""{HEADER} g (float[32,M] a) => (float[M,48] y) <{init('w', w)}, {init('c', rng.standard_normal(48))}>
        {{ y = Gemm<transA=1>(a, w, c) }}"""
    )
    calib = [{"a": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(3)]
    out, modified = run(F(rank=5, calibrated=True), model, calibration=calib)
    assert modified and op_types(out) == ["Gemm", "Gemm"]
    assert list(out.graph)[0].attributes.get_int("transA") == 1
    feed = {"a": rng.standard_normal((32, 7)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, feed), outputs(model, feed), atol=1e-4, rtol=1e-4)
    check_full(out)


def test_constant_weight_behind_transpose():
    w = low_rank(40, 36, 3, seed=5)
    values = ", ".join(repr(float(v)) for v in w.T.ravel())
    model = text_model(
        f"""{HEADER} g (float[N,40] x) => (float[N,36] y) {{
            wt = Constant<value=float[36,40] {{{values}}}>()
            t = Transpose<perm=[1,0]>(wt)
            y = MatMul(x, t) }}"""
    )
    out, modified = run(F(error=1e-6), model)
    assert modified
    assert op_types(out) == ["MatMul", "MatMul"]  # Constant and Transpose are gone
    report = validate(ir.to_proto(model), out, tolerance=Tolerance(1e-4, 1e-4))
    assert report.passed, report.outputs
    check_full(out)


def test_skips_small_dequantized_shared_and_unprofitable():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    # A shared weight, a weight behind DequantizeLinear, a small weight; then a square layer at rank 60.
    model = text_model(
        f"""{HEADER} g (float[N,64] x, float[N,8] z) => (float[N,64] y, float[N,8] yz)
        <{init('w', w)}, {init('small', w[:8, :8])}, {init('v', w.T.copy())}>
        {{
            a = MatMul(x, w)
            b = MatMul(a, w)
            sc = Constant<value_float=0.1>()
            q8 = QuantizeLinear(v, sc)
            dq = DequantizeLinear(q8, sc)
            c = MatMul(b, dq)
            y = Relu(c)
            yz = MatMul(z, small)
        }}"""
    )
    p = F(rank=60, min_size=100)
    out, modified = run(p, model)
    assert not modified
    reasons = " | ".join(row.get("skipped", "") for row in p.details)
    assert "shared" in reasons and "DequantizeLinear" in reasons
    assert all(row["layer"] != "yz" for row in p.details)  # below min_size: silently left alone
    p = F(rank=60, min_size=0, exclude=("yz",))
    run(p, matmul_model(w))
    assert p.details[0]["skipped"] == "the chosen rank saves no parameters"


def test_include_exclude_select_layers():
    w1, w2 = low_rank(64, 64, 4, seed=7), low_rank(64, 64, 4, seed=8)
    model = text_model(
        f"""{HEADER} g (float[N,64] x) => (float[N,64] y) <{init('w1', w1)}, {init('w2', w2)}>
        {{ a = MatMul(x, w1) y = MatMul(a, w2) }}"""
    )
    for node in model.graph:
        node.name = "attn/q" if node.outputs[0].name == "a" else "ffn/out"
    out, _ = run(F(rank=4, include=("ffn",)), model)
    assert op_types(out) == ["MatMul", "MatMul", "MatMul"]
    assert [n.name for n in out.graph] == ["attn/q", "ffn/out/factorize_U", "ffn/out/factorize_V"]
    out, _ = run(F(rank=4, exclude=("ffn",)), model)
    assert [n.name for n in out.graph] == ["attn/q/factorize_U", "attn/q/factorize_V", "ffn/out"]


def test_calibrated_beats_plain_on_anisotropic_inputs():
    rng = np.random.default_rng(9)
    k, n = 64, 48
    basis = np.linalg.qr(rng.standard_normal((k, k)))[0]
    scales = np.concatenate([np.full(8, 10.0), np.full(k - 8, 0.1)])  # 8 strong input directions

    def sample(rows: int) -> np.ndarray:
        return ((rng.standard_normal((rows, k)) * scales) @ basis.T).astype(np.float32)

    w = rng.standard_normal((k, n)).astype(np.float32)
    model = matmul_model(w, batched=True)
    calib = [{"x": sample(256).reshape(4, 64, k)} for _ in range(4)]
    plain_pass, cal_pass = F(rank=8), F(rank=8, calibrated=True, damping=0.0)
    plain, _ = run(plain_pass, model)
    cal, _ = run(cal_pass, model, calibration=calib)
    feed = {"x": sample(512).reshape(8, 64, k)}
    ref = outputs(model, feed)
    err_plain = np.linalg.norm(outputs(plain, feed) - ref) / np.linalg.norm(ref)
    err_cal = np.linalg.norm(outputs(cal, feed) - ref) / np.linalg.norm(ref)
    assert err_cal < 0.1 * err_plain, (err_cal, err_plain)
    row = cal_pass.details[0]
    assert row["output_error"] == pytest.approx(err_cal, rel=0.3)  # calibration estimate vs held-out data
    assert row["frobenius_error"] > plain_pass.details[0]["frobenius_error"]  # worse weight, better output
    check_full(cal)
    assert not F(rank=8, calibrated=True)(cal).modified


def test_calibrated_error_budget_is_measured_on_outputs():
    rng = np.random.default_rng(10)
    k, n = 48, 48
    scales = np.concatenate([np.geomspace(5.0, 1.0, 6), np.full(k - 6, 0.05)])
    x = (rng.standard_normal((1024, k)) * scales).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    p = F(error=0.05, calibrated=True, damping=0.0)
    out, modified = run(p, matmul_model(w), calibration=[{"x": x[:512]}, {"x": x[512:]}])
    assert modified
    row = p.details[0]
    assert row["output_error"] <= 0.05 and row["rank"] < fz.breakeven_rank(k, n)
    y_ref = x.astype(np.float64) @ w
    y = outputs(out, {"x": x})
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) == pytest.approx(row["output_error"], rel=1e-2)


def test_calibrated_without_data_is_a_usage_error():
    with pytest.raises(UsageError, match="--calibration"):
        run(F(rank=4, calibrated=True), matmul_model(low_rank(64, 64, 4)))


def test_options_validation_and_text_round_trip():
    for text in ("factorize(ratio=0.75,calibrated=true,allocation=global)", "factorize(rank=16,exclude=[lm_head,attn/q])", "factorize(energy=0.9)"):
        assert str(Pipeline.parse(text)) == text
    assert Pipeline.parse("factorize(error=0.1,min_size=0)") == Pipeline([F(error=0.1, min_size=0)])
    for bad in ("factorize", "factorize(rank=4,ratio=0.5)", "factorize(ratio=1.5)", "factorize(energy=0.9,allocation=global)", "factorize(rank=0)"):
        with pytest.raises(UsageError):
            Pipeline.parse(bad)


def test_global_allocation_on_graph_keeps_budget():
    w1 = low_rank(64, 64, 4, seed=11, noise=0.001)  # compressible
    w2 = np.random.default_rng(12).standard_normal((64, 64)).astype(np.float32)  # not
    model = text_model(
        f"""{HEADER} g (float[N,64] x) => (float[N,64] y) <{init('w1', w1)}, {init('w2', w2)}>
        {{ a = MatMul(x, w1) y = MatMul(a, w2) }}"""
    )
    p = F(ratio=0.6, allocation="global")
    out, modified = run(p, model)
    assert modified
    params = sum(v.const_value.size for v in out.graph.initializers.values())
    assert params <= 0.6 * 2 * 64 * 64
    kept = [row for row in p.details if "skipped" in row]
    assert [row["layer"] for row in kept] == ["y"]  # the random layer stays dense
    check_full(out)
    onnx.checker.check_model(ir.to_proto(out), full_check=True)


def test_composes_with_qdq_in_one_pipeline():
    """factorize first, then qdq quantizes U and V; a later factorize leaves the quantized products alone."""
    import onnxpress

    rng = np.random.default_rng(13)
    k, n = 64, 96
    model = text_model(
        f"""{HEADER} g (float[N,{k}] x) => (float[N,{n}] y) <{init('w', low_rank(k, n, 6, seed=13, noise=0.01))}, {init('b', rng.standard_normal(n))}>
        {{ a = MatMul(x, w) y = Add(a, b) }}"""
    )
    calib = [{"x": rng.standard_normal((32, k)).astype(np.float32)} for _ in range(2)]
    out, report = onnxpress.optimize(
        model, "factorize(rank=8,calibrated=true,min_size=0),qdq(mode=weight)", calibration=calib,
        inputs={"x": rng.standard_normal((16, k)).astype(np.float32)},
    )
    assert report.passed and report.validation.min_cosine > 0.99
    ops = op_types(out)
    assert ops.count("MatMul") == 2 and ops.count("DequantizeLinear") == 2
    again = F(rank=4)
    assert not again(out).modified
    for node in out.graph:
        node.metadata_props.pop("onnxpress.factorize", None)  # even unmarked, quantized weights are left alone
    assert not again(out).modified
    assert sum("DequantizeLinear" in row.get("skipped", "") for row in again.details) == 2


def test_share_one_u_for_layers_reading_the_same_input():
    rng = np.random.default_rng(14)
    k = 48
    basis = rng.standard_normal((k, 6))  # q, k, v read the same 6 input directions
    ws = [(basis @ rng.standard_normal((6, 40))).astype(np.float32) for _ in range(3)]
    model = text_model(
        f"""{HEADER} g (float[B,S,{k}] x) => (float[B,S,40] y)
        <{init('wq', ws[0])}, {init('wk', ws[1])}, {init('wv', ws[2])}>
        {{ q = MatMul(x, wq) kk = MatMul(x, wk) v = MatMul(x, wv) s = Add(q, kk) y = Mul(s, v) }}"""
    )
    p = F(rank=6, share=True)
    out, modified = run(p, model)
    assert modified
    assert op_types(out) == ["MatMul", "MatMul", "MatMul", "MatMul", "Add", "Mul"]  # one U, three V
    (row,) = p.details
    assert (row["K"], row["N"], row["rank"]) == (48, 120, 6)
    assert row["params_after"] == 6 * (48 + 120) and row["params_before"] == 3 * 48 * 40
    assert sum(v.const_value.size for v in out.graph.initializers.values()) == row["params_after"]
    report = validate(ir.to_proto(model), out, tolerance=Tolerance(1e-4, 1e-4))
    assert report.passed, report.outputs
    check_full(out)
    assert not F(rank=6, share=True)(out).modified


def test_center_carries_the_input_mean_in_the_bias():
    """Inputs with a large mean: centering spends no rank on the mean; the bias Add absorbs mu (W - UV)."""
    rng = np.random.default_rng(15)
    k, n = 64, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    mean = 3.0 * rng.standard_normal(k)

    def sample(rows: int) -> np.ndarray:
        return (mean + rng.standard_normal((rows, k)) * np.geomspace(3, 0.03, k)).astype(np.float32)

    with_bias = text_model(
        f"""{HEADER} g (float[N,{k}] x) => (float[N,{n}] y) <{init('w', w)}, {init('b', bias)}>
        {{ a = MatMul(x, w) y = Add(a, b) }}"""
    )
    calib = [{"x": sample(256)} for _ in range(4)]
    feed = {"x": sample(1024)}
    ref = outputs(with_bias, feed) - bias
    errors, bias_errors = {}, {}
    for center in (False, True):
        p = F(rank=2, calibrated=True, center=center)
        out, _ = run(p, with_bias, calibration=calib)
        assert op_types(out) == ["MatMul", "MatMul", "Add"]  # the correction is folded into the bias
        residual = outputs(out, feed) - bias - ref
        errors[center] = np.linalg.norm(residual) / np.linalg.norm(ref)
        bias_errors[center] = np.linalg.norm(residual.mean(0)) / np.linalg.norm(ref.mean(0))
        check_full(out)
    assert errors[True] < 0.95 * errors[False], errors  # measured: 0.284 vs 0.308
    assert bias_errors[True] < 0.02, bias_errors  # held-out error is ~zero-mean (measured 0.012)
    # no bias to fold into: one Add is inserted, and the graph output keeps its name
    p = F(rank=2, calibrated=True)
    out, _ = run(p, matmul_model(w), calibration=calib)
    assert op_types(out) == ["MatMul", "MatMul", "Add"]
    assert [v.name for v in out.graph.outputs] == ["y"]
    y = outputs(out, feed)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) == pytest.approx(errors[True], rel=1e-3)
    assert not F(rank=2, calibrated=True)(out).modified


# -- Conv: channel SVD into a KxK conv with r filters and a 1x1 conv ----------------------------------
def conv_model(w: np.ndarray, bias: np.ndarray, attrs: str = "pads=[1, 1, 1, 1], strides=[2, 2]") -> ir.Model:
    o, c, kh, kw = w.shape
    return text_model(
        f"""{HEADER} g (float[N,{c},12,12] x) => (float[N,{o},6,6] y) <{init('w', w)}, {init('b', bias)}>
        {{ y = Conv<{attrs}>(x, w, b) }}"""
    )


def test_conv_matrix_and_factors_compose_to_the_filter_bank():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4, 3, 3))
    mat = fz.conv_matrix(w)
    assert mat.shape == (36, 6)
    u, v = fz.factors(mat, fz.spectrum(mat), 6)
    first, second = fz.conv_factors(w, u, v)
    assert first.shape == (6, 4, 3, 3) and second.shape == (6, 6, 1, 1)
    # composing the two filter banks (1x1 after KxK) gives the original bank
    composed = np.einsum("or,rckl->ockl", second[:, :, 0, 0], first)
    np.testing.assert_allclose(composed, w, atol=1e-10)


def test_conv_of_low_rank_filters_is_exact_and_smaller():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 4)) @ rng.standard_normal((4, 8 * 9))).reshape(16, 8, 3, 3).astype(np.float32)
    model = conv_model(w, rng.standard_normal(16).astype(np.float32))
    out, modified = run(F(rank=4, conv=True), model)
    assert modified and op_types(out) == ["Conv", "Conv"]
    check_full(out)
    feed = {"x": rng.standard_normal((2, 8, 12, 12)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, feed), outputs(model, feed), rtol=1e-4, atol=1e-4)
    params = sum(v.const_value.size for v in out.graph.initializers.values())
    assert params == 4 * 72 + 16 * 4 + 16 < w.size
    assert not run(F(rank=4, conv=True), out)[1]  # marked: a second run leaves it alone


def test_conv_error_identity_and_skips():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    p = F(ratio=0.5, conv=True)
    out, modified = run(p, conv_model(w, np.zeros(16, np.float32)))
    assert modified
    row = p.details[-1]
    s = np.linalg.svd(fz.conv_matrix(w.astype(np.float64)), compute_uv=False)
    expected = np.sqrt(np.sum(s[row["rank"]:] ** 2)) / np.linalg.norm(s)
    assert row["frobenius_error"] == pytest.approx(expected, abs=1e-5)
    # conv=false (default) leaves Conv alone; depthwise convs are skipped with the reason
    assert not run(F(ratio=0.5), conv_model(w, np.zeros(16, np.float32)))[1]
    dw = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    q = F(ratio=0.5, conv=True)
    depthwise = text_model(
        f"""{HEADER} g (float[N,8,12,12] x) => (float[N,8,12,12] y) <{init('w', dw)}>
        {{ y = Conv<group=8, pads=[1, 1, 1, 1]>(x, w) }}"""
    )
    assert not run(q, depthwise)[1]
    assert q.details[-1]["skipped"] == "grouped/depthwise convolution"
