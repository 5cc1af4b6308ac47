import numpy as np
import onnx_ir as ir
import pytest
from graphs import check_full, copy_model, init, mlp_model, op_types, text_model
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxpress import runtime
from onnxpress.errors import UsageError
from onnxpress.pass_infra import PassContext, verify_model
from onnxpress.passes import prune as pr
from onnxpress.passes.prune import Prune
from onnxpress.passes.prune.calibration import padding_mask
from onnxpress.passes.prune.plan import depth_waves, terminal_mean_shift
from onnxpress.passes.prune.structure import unit_rows
from onnxpress.pipeline import Pipeline

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def P(**options) -> Prune:
    """The pass with min_size=0: test layers are smaller than the default floor."""
    options.setdefault("min_size", 0)
    return Prune(**options)


def run(pass_: Prune, model: ir.Model, calibration=None) -> tuple[ir.Model, bool]:
    work = copy_model(model)
    pass_.context = PassContext(calibration=calibration)
    result = pass_(work)
    return result.model, result.modified


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def out(model: ir.Model, feed: dict[str, np.ndarray], name: str = "y") -> np.ndarray:
    return runtime.run(runtime.make_session(model), feed)[name]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gelu_mlp(k: int = 8, h: int = 16, n: int = 4, seed: int = 0) -> ir.Model:
    """x -> MatMul W1 -> Add b1 -> erf-GELU (as torch exports it) -> MatMul W2 -> Add b2 -> y."""
    rng = np.random.default_rng(seed)
    return text_model(
        f"""{HEADER} g (float[B,S,{k}] x) => (float[B,S,{n}] y)
        <{init("w1", rng.standard_normal((k, h)))}, {init("b1", rng.standard_normal(h))},
         {init("w2", rng.standard_normal((h, n)))}, {init("b2", rng.standard_normal(n))},
         {init("sqrt2", np.array([1.4142135]))}, {init("one", np.array([1.0]))}, {init("half", np.array([0.5]))}>
        {{
            a = MatMul(x, w1)
            hb = Add(a, b1)
            d = Div(hb, sqrt2)
            e = Erf(d)
            f = Add(e, one)
            gg = Mul(half, f)
            act = Mul(hb, gg)
            z = MatMul(act, w2)
            y = Add(z, b2)
        }}"""
    )


def conv_bn_model(seed: int = 0, c1: int = 8) -> ir.Model:
    """x -> Conv(3->c1, pads 1) -> BatchNorm -> Relu -> Conv(c1->4) -> y."""
    rng = np.random.default_rng(seed)
    return text_model(
        f"""{HEADER} g (float[N,3,8,8] x) => (float[N,4,6,6] y)
        <{init("w1", rng.standard_normal((c1, 3, 3, 3)))}, {init("b1", rng.standard_normal(c1))},
         {init("scale", rng.uniform(0.5, 2.0, c1))}, {init("beta", rng.standard_normal(c1))},
         {init("mean", rng.standard_normal(c1) * 0.1)}, {init("var", rng.uniform(0.5, 2.0, c1))},
         {init("w2", rng.standard_normal((4, c1, 3, 3)))}, {init("b2", rng.standard_normal(4))}>
        {{
            c = Conv<pads=[1,1,1,1]>(x, w1, b1)
            bn = BatchNormalization(c, scale, beta, mean, var)
            r = Relu(bn)
            y = Conv(r, w2, b2)
        }}"""
    )


def kept_columns(original: np.ndarray, pruned: np.ndarray, axis: int) -> list[int]:
    """Which slices of ``original`` along ``axis`` survived in ``pruned`` (matched exactly)."""
    orig = np.moveaxis(original, axis, 0).reshape(original.shape[axis], -1)
    new = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    return [int(np.flatnonzero(np.all(orig == row, axis=1))[0]) for row in new]


# -- pure maths ----------------------------------------------------------------------------------------
def test_prune_count_and_zero_fraction():
    assert pr.prune_count(10, 0.5) == 5
    assert pr.prune_count(10, 0.55) == 6  # rounds up: achieved >= requested
    assert pr.prune_count(3, 0.999) == 3
    assert pr.zero_fraction(np.array([0.0, 1.0, 0.0, 2.0])) == 0.5


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 24), n=st.integers(1, 12), sparsity=st.floats(0.01, 0.99),
    zeros=st.floats(0.0, 0.9), per_output=st.booleans(), seed=st.integers(0, 2**16),
)
def test_keep_mask_properties(k, n, sparsity, zeros, per_output, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n))
    w[rng.random((k, n)) < zeros] = 0.0
    mask = pr.keep_mask(np.abs(w), sparsity, per_output=per_output)
    pruned = np.where(mask, w, 0.0)
    assert pr.zero_fraction(pruned) >= sparsity - 1e-12  # achieved >= requested
    assert np.all((pruned != 0) <= (w != 0))  # surviving non-zeros are original non-zeros
    if per_output:
        assert np.all((~mask).sum(axis=0) == pr.prune_count(k, sparsity))  # every output column alike
        assert np.all(np.sum(pruned == 0, axis=0) >= sparsity * k - 1e-9)
    else:
        assert (~mask).sum() == pr.prune_count(k * n, sparsity)
    # the kept scores are never below the pruned ones (within a comparison group)
    s = np.abs(w)
    if per_output:
        for j in range(n):
            if mask[:, j].any() and (~mask[:, j]).any():
                assert s[mask[:, j], j].min() >= s[~mask[:, j], j].max()
    elif mask.any() and (~mask).any():
        assert s[mask].min() >= s[~mask].max()


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 23), cols=st.integers(1, 6), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]), seed=st.integers(0, 2**16))
def test_nm_mask_pattern_holds(k, cols, nm, seed):
    n, m = nm
    w = np.random.default_rng(seed).standard_normal((k, cols))
    mask = pr.nm_mask(np.abs(w), n, m)
    pruned = np.where(mask, w, 0.0)
    assert pr.nm_holds(pruned, n, m)
    full = (k // m) * m
    assert np.all(mask[:full].reshape(-1, m, cols).sum(axis=1) == n)  # exactly n kept in a full group
    assert pr.zero_fraction(pruned[:full]) == pytest.approx(1 - n / m) if full else True
    tail = k - full
    if tail:
        assert np.all(mask[full:].sum(axis=0) == min(n, tail))


def test_nm_holds_detects_violations():
    w = np.array([[1.0], [1.0], [1.0], [0.0]])
    assert not pr.nm_holds(w, 2, 4)
    assert pr.nm_holds(w, 3, 4)


def test_global_masks_share_one_threshold():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[10.0, 0.5]])
    ma, mb = pr.global_keep_masks([a, b], 0.5)  # 6 scores, 3 pruned: 0.5, 1, 2
    assert ma.tolist() == [[False, False], [True, True]] and mb.tolist() == [[True, False]]


def test_wanda_scores_use_input_norms():
    w = np.array([[0.1, -0.2], [1.0, 1.0]])
    s = pr.wanda_scores(w, np.array([10000.0, 1.0]))  # channel 0 has norm 100
    np.testing.assert_allclose(s, [[10.0, 20.0], [1.0, 1.0]])
    assert pr.keep_mask(s, 0.5, per_output=True)[0].all()  # the small weights on the loud input survive


def _problem(k=48, n=12, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.5 + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mix * rng.uniform(0.2, 3.0, k)  # correlated, uneven channels
    w = rng.standard_normal((k, n))
    return x, w, x.T @ x / tokens


def test_sparsegpt_beats_the_mask_alone_and_keeps_properties():
    x, w, h = _problem()
    w[::7, ::3] = 0.0
    for kwargs, check in [({"sparsity": 0.5}, lambda q: pr.zero_fraction(q) >= 0.5), ({"n": 2, "m": 4}, lambda q: pr.nm_holds(q, 2, 4))]:
        new, mask = pr.sparsegpt(w, h, damping=0.01, blocksize=16, **kwargs)
        assert check(new)
        assert np.all((new != 0) <= (w != 0))
        assert np.array_equal(new != 0, mask & (new != 0))
        wanda = pr.nm_mask(pr.wanda_scores(w, np.diag(h)), 2, 4) if "n" in kwargs else pr.keep_mask(pr.wanda_scores(w, np.diag(h)), 0.5, per_output=True)
        err_wanda = rel_err(x @ np.where(wanda, w, 0.0), x @ w)
        err_gpt = rel_err(x @ new, x @ w)
        assert err_gpt < 0.95 * err_wanda, (kwargs, err_gpt, err_wanda)
    # the exact least-squares re-fit on Wanda's mask is better still (the optimum for that mask)
    wanda = pr.keep_mask(pr.wanda_scores(w, np.diag(h)), 0.5, per_output=True)
    refit = pr.refit_columns(w, h, wanda & (w != 0), damping=1e-6)
    assert np.all(refit[~wanda] == 0)
    opt = np.zeros_like(w)
    for j in range(w.shape[1]):
        s = wanda[:, j] & (w[:, j] != 0)
        opt[s, j] = np.linalg.lstsq(x[:, s], x @ w[:, j], rcond=None)[0]
    np.testing.assert_allclose(x @ refit, x @ opt, rtol=1e-3, atol=1e-3 * np.abs(x @ w).max())
    assert rel_err(x @ refit, x @ w) < 0.8 * rel_err(x @ np.where(wanda, w, 0.0), x @ w)


def test_sparsegpt_with_a_fixed_mask_only_updates_kept_weights():
    x, w, h = _problem(seed=1)
    mask = pr.keep_mask(np.abs(w), 0.5)
    new, out_mask = pr.sparsegpt(w, h, mask=mask, damping=0.01)
    assert np.array_equal(out_mask, mask)
    assert np.all(new[~mask] == 0)
    assert rel_err(x @ new, x @ w) < rel_err(x @ np.where(mask, w, 0.0), x @ w)


def test_structured_unit_maths():
    assert pr.units_to_remove(1536, 0.25) == 384
    assert pr.units_to_remove(3, 0.9) == 2  # one unit always stays
    keep = pr.keep_units(np.array([5.0, 1.0, 3.0, 0.5]), 2)
    assert keep.tolist() == [0, 2]
    np.testing.assert_allclose(pr.unit_scores(np.array([1.0, 2.0]), np.array([3.0, 1.0])), [3.0, 2.0])
    # re-fit: the least-squares rows beat dropping the units and moving their mean into the bias
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 10)) @ (np.eye(10) + 0.5 * rng.standard_normal((10, 10))) + 2.0
    w2 = rng.standard_normal((10, 3))
    mu = a.mean(axis=0)
    cov = np.cov(a.T, bias=True)
    keep = np.array([0, 1, 2, 3, 4, 5, 6])
    removed = np.array([7, 8, 9])
    rows, shift = pr.refit_rows(w2, keep, cov, mu, damping=1e-9)
    ref = a @ w2
    err_refit = rel_err(a[:, keep] @ rows + shift, ref)
    err_mean = rel_err(a[:, keep] @ w2[keep] + pr.mean_shift(w2, removed, mu), ref)
    err_drop = rel_err(a[:, keep] @ w2[keep], ref)
    assert err_refit < err_mean < err_drop



def test_removal_error_is_the_measured_output_error():
    """The predicted relative error of the next layer after removing units (mean moved into the bias, or rows
    re-fitted) is the error measured on the data: exactly from the second moment; from the variances alone
    when the units are zero-mean and uncorrelated."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 6)) @ (np.eye(6) + 0.4 * rng.standard_normal((6, 6))) + 1.5
    w2 = rng.standard_normal((6, 3))
    keep, removed = np.array([0, 2, 3, 5]), np.array([1, 4])
    mu = a.mean(axis=0)
    st = {"gram": a.T @ a / len(a), "mean": mu, "var": a.var(axis=0)}
    measured = rel_err(a[:, keep] @ w2[keep] + pr.mean_shift(w2, removed, mu), a @ w2)
    assert pr.removal_error(st, w2, keep, removed, None) == pytest.approx(measured, rel=1e-9)
    rows, shift = pr.refit_rows(w2, keep, st["gram"] - np.outer(mu, mu), mu, damping=1e-9)
    assert pr.removal_error(st, w2, keep, removed, rows) == pytest.approx(rel_err(a[:, keep] @ rows + shift, a @ w2), rel=1e-6)
    q, _ = np.linalg.qr(np.column_stack([np.ones(300), rng.standard_normal((300, 6))]))
    e = q[:, 1:] * np.array([3.0, 1.0, 0.5, 2.0, 0.1, 1.0]) * np.sqrt(300)  # zero-mean, orthogonal columns
    diagonal = {"mean": np.zeros(6), "var": e.var(axis=0)}
    assert pr.removal_error(diagonal, w2, keep, removed, None) == pytest.approx(rel_err(e[:, keep] @ w2[keep], e @ w2), rel=1e-9)


def test_conv_mean_shift_is_the_removed_channels_constant_output():
    model = conv_bn_model(c1=8)
    conv2 = [n for n in model.graph if n.op_type == "Conv"][1]
    w2 = weight(model, "w2")  # [4, 8, 3, 3]
    mu, removed = np.arange(1.0, 9.0), np.array([1, 5])
    expect = np.einsum("h,chij->c", mu[removed], w2[:, removed])  # a constant input through the kernel
    np.testing.assert_allclose(terminal_mean_shift(conv2, unit_rows("Conv", w2, False, "out"), removed, mu), expect, rtol=1e-6)

# -- magnitude and N:M on graphs -----------------------------------------------------------------------
def test_magnitude_layer_scope_on_mlp():
    model = mlp_model(k=8, h=16, n=4)
    p = P(sparsity=0.5, scope="layer")
    pruned, modified = run(p, model)
    assert modified and op_types(pruned) == op_types(model)
    for name in ("w1", "w2"):
        w0, w = weight(model, name), weight(pruned, name)
        assert np.sum(w == 0) == w.size // 2
        assert np.abs(w0[w != 0]).min() >= np.abs(w0[w == 0]).max()
        np.testing.assert_array_equal(w[w != 0], w0[w != 0])
    rows = [d for d in p.details if "skipped" not in d]
    assert [r["sparsity_after"] for r in rows] == [0.5, 0.5]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    b1 = weight(model, "b1")
    expect = np.maximum(x @ weight(pruned, "w1") + b1, 0) @ weight(pruned, "w2")
    np.testing.assert_allclose(out(pruned, {"x": x}), expect, rtol=1e-5, atol=1e-5)
    check_full(pruned)
    assert not p(pruned).modified  # idempotent
    assert p.details[0]["skipped"] == "already at the requested sparsity"


def test_output_and_global_scopes():
    model = mlp_model(k=8, h=16, n=4)
    pruned, _ = run(P(sparsity=0.75, scope="output"), model)
    w1 = weight(pruned, "w1")
    assert np.all(np.sum(w1 == 0, axis=0) == 6)  # every output unit keeps 2 of its 8 inputs
    p = P(sparsity=0.5, scope="global")
    pruned, _ = run(p, model)
    zeros = sum(int(np.sum(weight(pruned, n) == 0)) for n in ("w1", "w2"))
    assert zeros == (8 * 16 + 16 * 4) // 2
    assert not p(pruned).modified


def test_nm_on_matmul_and_gemm_transb():
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((6, 16)).astype(np.float32)  # Gemm transB=1: stored [N, K]
    model = text_model(
        f"""{HEADER} g (float[M,16] x) => (float[M,6] y) <{init("wt", wt)}, {init("c", np.ones(6))}>
        {{ y = Gemm<transB=1>(x, wt, c) }}"""
    )
    p = P(method="nm")
    pruned, modified = run(p, model)
    assert modified and op_types(pruned) == ["Gemm"]
    w = weight(pruned, "wt")
    assert pr.nm_holds(w.T, 2, 4)  # groups run along K, the reduction axis
    assert np.sum(w == 0) == w.size // 2
    x = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(out(pruned, {"x": x}), x @ w.T + 1.0, rtol=1e-5, atol=1e-5)
    check_full(pruned)
    assert not p(pruned).modified
    mlp, _ = run(P(method="nm", n=1, m=4), mlp_model())
    assert pr.nm_holds(weight(mlp, "w1"), 1, 4) and pr.nm_holds(weight(mlp, "w2"), 1, 4)


def test_conv_weights_pruned_per_filter():
    model = conv_bn_model()
    pruned, modified = run(P(sparsity=0.5), model)
    assert modified
    for name in ("w1", "w2"):
        w = weight(pruned, name)
        per_filter = (w.reshape(w.shape[0], -1) == 0).sum(axis=1)
        assert np.all(per_filter == int(np.ceil(0.5 * w[0].size)))
    check_full(pruned)


def test_calibrated_scores_keep_weights_on_loud_inputs():
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.5, 1.0, (8, 16)) * rng.choice([-1, 1], (8, 16))
    w1[0] *= 0.1  # small weights on input 0 ...
    model = text_model(f"{HEADER} g (float[N,8] x) => (float[N,16] y) <{init('w1', w1)}> {{ y = MatMul(x, w1) }}")
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x[:, 0] *= 100.0  # ... that read a loud input
    plain, _ = run(P(sparsity=0.5), model)
    assert np.all(weight(plain, "w1")[0] == 0)
    p = P(sparsity=0.5, calibrated=True)
    wanda, _ = run(p, model, calibration=[{"x": x[:32]}, {"x": x[32:]}])
    assert np.all(weight(wanda, "w1")[0] != 0)
    assert rel_err(out(wanda, {"x": x}), x @ w1) < 0.5 * rel_err(out(plain, {"x": x}), x @ w1)
    assert 0 < p.details[0]["output_error"] < 1


def test_update_reduces_output_error_in_ort():
    x, w, _ = _problem(k=32, n=16, tokens=256, seed=2)
    x = x.astype(np.float32)
    model = text_model(f"{HEADER} g (float[N,32] x) => (float[N,16] y) <{init('w', w)}> {{ y = MatMul(x, w) }}")
    cal = [{"x": x[:128]}, {"x": x[128:]}]
    ref = x @ w.astype(np.float32)
    errs = {}
    for update, solver in ((False, "refit"), (True, "refit"), (True, "sparsegpt")):
        for method in ("magnitude", "nm"):
            p = P(method=method, calibrated=True, update=update, damping=0.01, solver=solver)
            pruned, _ = run(p, model, calibration=cal)
            wp = weight(pruned, "w")
            assert pr.zero_fraction(wp) >= 0.5 and np.all((wp != 0) <= (w != 0))
            if method == "nm":
                assert pr.nm_holds(wp, 2, 4)
            errs[(method, update, solver)] = rel_err(out(pruned, {"x": x}), ref)
            assert not p(pruned).modified
    for method in ("magnitude", "nm"):
        assert errs[(method, True, "refit")] < 0.8 * errs[(method, False, "refit")], errs
        assert errs[(method, True, "sparsegpt")] < errs[(method, False, "refit")], errs


def test_sequential_calibration_runs_per_depth():
    model = mlp_model(k=8, h=16, n=4)
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    layers = P()._layers(copy_model(model))
    assert [[layer.label for layer in wave] for wave in depth_waves(layers)] == [[layers[0].label], [layers[1].label]]
    pruned, modified = run(P(calibrated=True, update=True, sequential=True), model, calibration=[{"x": x}])
    assert modified and pr.zero_fraction(weight(pruned, "w2")) >= 0.5


def test_padding_rows_are_left_out():
    feed = {"ids": np.zeros((2, 3), np.int64), "attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
    mask = padding_mask(feed)
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    assert padding_mask({"x": np.ones((2, 3))}) is None


def test_options_and_errors():
    model = mlp_model()
    with pytest.raises(UsageError, match="calibration"):
        run(P(calibrated=True), model)
    with pytest.raises(UsageError, match="sparsity"):
        Prune(sparsity=1.0)
    with pytest.raises(UsageError, match="update"):
        Prune(update=True)
    with pytest.raises(UsageError, match="n < m"):
        Prune(method="nm", n=4, m=4)
    text = "prune(method=structured,sparsity=0.25,calibrated=true,update=true,exclude=[node_a,b])"
    assert str(Pipeline.parse(text)) == text
    assert Pipeline.parse(str(Pipeline.parse(text))) == Pipeline.parse(text)
    p = P(exclude=("w2",))
    pruned, _ = run(p, model)
    assert pr.zero_fraction(weight(pruned, "w2")) == 0.0 and pr.zero_fraction(weight(pruned, "w1")) == 0.5
    assert any(d.get("skipped") == "excluded by option" for d in p.details)
    pruned, _ = run(P(include=("w2",)), model)
    assert pr.zero_fraction(weight(pruned, "w1")) == 0.0


def test_shared_and_small_weights_are_skipped():
    w = np.random.default_rng(0).standard_normal((8, 8))
    model = text_model(
        f"""{HEADER} g (float[N,8] x) => (float[N,8] y) <{init('w', w)}>
        {{ a = MatMul(x, w)
           y = MatMul(a, w) }}"""
    )
    p = P()
    _, modified = run(p, model)
    assert not modified and all("shared" in d["skipped"] for d in p.details)
    p = Prune()  # default min_size 4096: the 64-parameter layers are left alone silently
    _, modified = run(p, mlp_model())
    assert not modified and p.details == []


# -- structured ------------------------------------------------------------------------------------------
def test_structured_mlp_equals_zeroed_units_in_ort():
    model = gelu_mlp(k=8, h=16, n=4)
    p = P(method="structured", sparsity=0.25)
    pruned, modified = run(p, model)
    assert modified and op_types(pruned) == op_types(model)
    w1, w2 = weight(pruned, "w1"), weight(pruned, "w2")
    assert w1.shape == (8, 12) and w2.shape == (12, 4) and weight(pruned, "b1").shape == (12,)
    keep = kept_columns(weight(model, "w1"), w1, axis=1)
    assert kept_columns(weight(model, "w2"), w2, axis=0) == keep
    np.testing.assert_array_equal(weight(pruned, "b1"), weight(model, "b1")[keep])
    zeroed = copy_model(model)
    w2z = weight(model, "w2").copy()
    w2z[np.setdiff1d(np.arange(16), keep)] = 0.0
    zeroed.graph.initializers["w2"].const_value = ir.tensor(w2z, name="w2")
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(out(pruned, {"x": x}), out(zeroed, {"x": x}), rtol=1e-5, atol=1e-5)
    (row,) = [d for d in p.details if "skipped" not in d]
    assert (row["units_before"], row["units_after"]) == (16, 12)
    assert row["params_after"] == 8 * 12 + 12 * 4
    act = next(v for n in pruned.graph for v in n.outputs if v.name == "act")
    assert act.shape is None or act.shape[-1] == 12
    verify_model(pruned)  # checker + strict shape inference
    check_full(pruned)
    assert not p(pruned).modified  # already pruned blocks are left alone
    assert "already pruned" in p.details[-1]["skipped"] or any("already" in d.get("skipped", "") for d in p.details)


def test_structured_conv_bn_chain_equals_zeroed_channels_in_ort():
    model = conv_bn_model(c1=8)
    p = P(method="structured", sparsity=0.5)
    pruned, modified = run(p, model)
    assert modified and op_types(pruned) == ["Conv", "BatchNormalization", "Relu", "Conv"]
    w1, w2 = weight(pruned, "w1"), weight(pruned, "w2")
    assert w1.shape == (4, 3, 3, 3) and w2.shape == (4, 4, 3, 3)
    keep = kept_columns(weight(model, "w1"), w1, axis=0)
    for name in ("b1", "scale", "beta", "mean", "var"):
        np.testing.assert_array_equal(weight(pruned, name), weight(model, name)[keep])
    zeroed = copy_model(model)
    w2z = weight(model, "w2").copy()
    w2z[:, np.setdiff1d(np.arange(8), keep)] = 0.0
    zeroed.graph.initializers["w2"].const_value = ir.tensor(w2z, name="w2")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(out(pruned, {"x": x}), out(zeroed, {"x": x}), rtol=1e-5, atol=1e-5)
    verify_model(pruned)
    check_full(pruned)
    assert not p(pruned).modified


def test_structured_three_conv_chain_and_calibrated_bias_shift():
    rng = np.random.default_rng(0)
    model = text_model(
        f"""{HEADER} g (float[N,2,8,8] x) => (float[N,3,2,2] y)
        <{init("w1", rng.standard_normal((8, 2, 3, 3)))}, {init("w2", rng.standard_normal((8, 8, 3, 3)))},
         {init("w3", rng.standard_normal((3, 8, 1, 1)))}, {init("b3", rng.standard_normal(3))}>
        {{
            a = Conv<pads=[1,1,1,1]>(x, w1)
            ra = Relu(a)
            b = Conv(ra, w2)
            rb = Relu(b)
            pb = MaxPool<kernel_shape=[3,3], strides=[3,3]>(rb)
            y = Conv(pb, w3, b3)
        }}"""
    )
    x = rng.standard_normal((16, 2, 8, 8)).astype(np.float32)
    p = P(method="structured", sparsity=0.25, calibrated=True)
    pruned, modified = run(p, model, calibration=[{"x": x}])
    rows = [d for d in p.details if "skipped" not in d]
    assert modified and [(r["units_before"], r["units_after"]) for r in rows] == [(8, 6), (8, 6)]
    assert weight(pruned, "w2").shape == (6, 6, 3, 3) and weight(pruned, "w3").shape == (3, 6, 1, 1)
    verify_model(pruned)
    check_full(pruned)
    assert not p(pruned).modified
    ref = out(model, {"x": x})
    # the removed channels' mean moved into the next biases: better than removing them bare
    bare, _ = run(P(method="structured", sparsity=0.25), model)
    assert rel_err(out(pruned, {"x": x}), ref) < rel_err(out(bare, {"x": x}), ref) or rows[0]["output_error"] < 0.5


def test_structured_calibrated_update_beats_mean_shift_beats_weight_norms():
    model = gelu_mlp(k=16, h=64, n=8, seed=3)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 32, 16)) * rng.uniform(0.1, 3.0, 16)).astype(np.float32)
    cal = [{"x": x[:4]}, {"x": x[4:]}]
    ref = out(model, {"x": x})
    errs = {}
    for name, opts in {"plain": {}, "calibrated": {"calibrated": True}, "update": {"calibrated": True, "update": True, "damping": 0.001}}.items():
        p = P(method="structured", sparsity=0.5, **opts)
        pruned, _ = run(p, model, calibration=cal)
        assert weight(pruned, "w2").shape[0] == 32
        errs[name] = rel_err(out(pruned, {"x": x}), ref)
        check_full(pruned)
    assert errs["update"] < errs["calibrated"] < errs["plain"], errs


def test_structured_skips_unsafe_blocks_with_reasons():
    rng = np.random.default_rng(0)
    residual = text_model(
        f"""{HEADER} g (float[N,8] x) => (float[N,8] y) <{init("w1", rng.standard_normal((8, 8)))}, {init("w2", rng.standard_normal((8, 8)))}>
        {{
            a = MatMul(x, w1)
            r = Relu(a)
            s = Add(r, x)
            y = MatMul(s, w2)
        }}"""
    )
    p = P(method="structured")
    _, modified = run(p, residual)
    assert not modified
    assert "combines the units with 'x'" in p.details[0]["skipped"]
    softmax = text_model(
        f"""{HEADER} g (float[N,8] x) => (float[N,8] y) <{init("w1", rng.standard_normal((8, 8)))}, {init("w2", rng.standard_normal((8, 8)))}>
        {{
            a = MatMul(x, w1)
            r = Softmax(a)
            y = MatMul(r, w2)
        }}"""
    )
    p = P(method="structured")
    _, modified = run(p, softmax)
    assert not modified and p.details[0]["skipped"].startswith("Softmax")
    graph_out = text_model(
        f"""{HEADER} g (float[N,8] x) => (float[N,8] y, float[N,8] r) <{init("w1", rng.standard_normal((8, 8)))}, {init("w2", rng.standard_normal((8, 8)))}>
        {{
            a = MatMul(x, w1)
            r = Relu(a)
            y = MatMul(r, w2)
        }}"""
    )
    p = P(method="structured")
    _, modified = run(p, graph_out)
    assert not modified and "graph output" in p.details[0]["skipped"]
