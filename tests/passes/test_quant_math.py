"""The quantization maths of the qdq pass, checked with numpy (and once against onnxruntime's QuantizeLinear)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.passes import quant_math as qm


def test_affine_params_map_range_and_keep_zero_exact():
    scale, zp = qm.affine_params(-1.0, 3.0, 0, 255)
    assert scale == pytest.approx(4.0 / 255, rel=1e-6)
    assert zp == 64  # round(255 / 4)
    assert qm.quantize(np.array([0.0]), scale, zp, 0, 255)[0] == zp
    assert qm.fake_quant(np.array([0.0]), scale, zp, 0, 255)[0] == 0.0
    # lo/hi widen to include 0, int8 asymmetric range
    scale, zp = qm.affine_params(1.0, 2.0, -128, 127)
    assert scale == pytest.approx(2.0 / 255, rel=1e-6) and zp == -128
    scale, zp = qm.affine_params(-2.0, -1.0, 0, 255)
    assert scale == pytest.approx(2.0 / 255, rel=1e-6) and zp == 255


def test_fake_quant_error_is_half_a_step_inside_the_range():
    x = np.random.default_rng(0).uniform(-1, 3, 10_000).astype(np.float32)
    scale, zp = qm.affine_params(-1.0, 3.0, 0, 255)
    err = np.abs(qm.fake_quant(x, scale, zp, 0, 255) - x)
    assert err.max() <= scale / 2 + 1e-6
    # values outside the range clip to its ends
    assert qm.fake_quant(np.array([10.0]), scale, zp, 0, 255)[0] == pytest.approx(3.0, abs=float(scale))


def test_quantize_matches_onnxruntime_quantize_linear():
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) * 3
    scale, zp = qm.affine_params(float(x.min()), float(x.max()), 0, 255)
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 8])], [helper.make_tensor_value_info("y", TensorProto.UINT8, [64, 8])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zp, np.uint8), "z")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got.astype(np.int64), qm.quantize(x, scale, zp, 0, 255))
    onnx.checker.check_model(model)


def test_per_channel_weight_scales_follow_each_column():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 4)).astype(np.float32) * np.array([0.1, 1.0, 10.0, 100.0], np.float32)
    q, scale = qm.quantize_weight(w, 1, 127)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (4,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    err = np.abs(qm.dequantize(q, scale[None, :]) - w)
    assert np.all(err <= scale[None, :] / 2 + 1e-6)
    # per tensor: one scale, the small column loses its precision
    q_t, s_t = qm.quantize_weight(w, None, 127)
    assert s_t.shape == (1,)
    assert qm.relative_error(qm.dequantize(q_t, s_t), w[:, :1] * 0 + w) > qm.relative_error(qm.dequantize(q, scale[None, :]), w)


def test_mse_weight_clip_is_never_worse_than_absmax():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(256, 16)).astype(np.float32)  # heavy tails: clipping pays off
    for qmax in (127, 7):
        plain = qm.weight_scales(w, 1, qmax, "none")
        clipped = qm.weight_scales(w, 1, qmax, "mse")
        e_plain = ((qm.fake_quant(w, plain, 0, -qmax, qmax) - w) ** 2).sum(axis=0)
        e_clip = ((qm.fake_quant(w, clipped, 0, -qmax, qmax) - w) ** 2).sum(axis=0)
        assert np.all(e_clip <= e_plain + 1e-9)
        assert np.all(clipped <= plain + 1e-9)
    assert e_clip.sum() < 0.9 * e_plain.sum()  # 4-bit: a real gain


def test_blockwise_shapes_padding_and_error_bound():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 6)).astype(np.float32)  # K=40 is not a multiple of the block
    codes, scales, zps = qm.quantize_blockwise(w, 32, 4, symmetric=False, clip="none")
    assert codes.shape == (40, 6) and scales.shape == (2, 6) and zps.shape == (2, 6)
    assert codes.max() <= 15 and zps.max() <= 15
    deq = qm.dequantize(codes.astype(np.int64), np.repeat(scales, 32, axis=0)[:40], np.repeat(zps.astype(np.int64), 32, axis=0)[:40])
    assert np.all(np.abs(deq - w) <= np.repeat(scales, 32, axis=0)[:40] / 2 + 1e-5)
    # symmetric: zero point is the middle code
    _, _, zps_sym = qm.quantize_blockwise(w, 32, 4, symmetric=True, clip="none")
    assert np.all(zps_sym == 8)


def test_gptq_lowers_output_error_over_round_to_nearest():
    rng = np.random.default_rng(5)
    k, n = 64, 16
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((2048, k)) @ mix).astype(np.float32)  # correlated inputs
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    ref = x @ w

    def out_err(codes, scales, zps):
        deq = qm.dequantize(codes.astype(np.int64), np.repeat(scales, 32, axis=0), np.repeat(zps.astype(np.int64), 32, axis=0))
        return qm.relative_error(x @ deq, ref)

    rtn = out_err(*qm.quantize_blockwise(w, 32, 4, clip="none"))
    gptq = out_err(*qm.quantize_blockwise(w, 32, 4, clip="none", hessian=h))
    assert gptq < 0.8 * rtn
    q8, s8 = qm.quantize_weight(w, 1, 127)
    g8, gs8 = qm.gptq_per_channel(w, h, 127)
    assert g8.dtype == np.int8 and gs8.shape == (n,)
    assert qm.relative_error(x @ qm.dequantize(g8, gs8[None, :]), ref) < qm.relative_error(x @ qm.dequantize(q8, s8[None, :]), ref)


def test_pack_codes_low_bits_first_and_round_trip():
    assert qm.pack_codes(np.array([1, 2], np.uint8), 4).tolist() == [0x21]
    assert qm.pack_codes(np.array([15, 0, 7], np.uint8), 4).tolist() == [0x0F, 0x07]  # odd length padded
    assert qm.pack_codes(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b11]
    rng = np.random.default_rng(0)
    for bits in (2, 4):
        codes = rng.integers(0, 2**bits, (5, 33)).astype(np.uint8)
        np.testing.assert_array_equal(qm.unpack_codes(qm.pack_codes(codes, bits), bits, 33), codes)


def test_activation_ranges_by_method():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(100_000), [40.0, -35.0]]).astype(np.float32)  # two outliers
    lo, hi = qm.activation_range(x, "minmax", 0, 255)
    assert (lo, hi) == (-35.0, 40.0)
    lo_p, hi_p = qm.activation_range(x, "percentile", 0, 255, percentile=99.9)
    assert -4.5 < lo_p < -3 and 3 < hi_p < 4.5
    lo_m, hi_m = qm.activation_range(x, "mse", 0, 255)
    assert hi_m < 40.0 and lo_m > -35.0  # the outliers are clipped
    for lo_x, hi_x in (qm.activation_range(x, "entropy", 0, 255),):
        assert -35.0 <= lo_x < 0 < hi_x <= 40.0
    assert qm.clipped_fraction(x, lo_p, hi_p) == pytest.approx(0.001, abs=2e-4)


def test_smooth_factors_keep_the_product_and_flatten_outlier_channels():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    x[:, 3] *= 50.0  # one outlier channel
    w = rng.standard_normal((8, 4)).astype(np.float32)
    s = qm.smooth_factors(np.abs(x).max(axis=0), np.abs(w).max(axis=1), 0.5)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)
    ratio_before = np.abs(x).max(axis=0).max() / np.abs(x).max(axis=0).min()
    xs = x / s
    assert np.abs(xs).max(axis=0).max() / np.abs(xs).max(axis=0).min() < ratio_before / 4
    np.testing.assert_allclose(qm.smooth_factors(np.ones(3), np.array([1.0, 2.0, 4.0]), 0.0), [1.0, 0.5, 0.25], rtol=1e-6)


def _full_grid_scales(w: np.ndarray, qmax: int, grid: int = 20) -> np.ndarray:
    """The reference search: every clip ratio of the grid evaluated exactly, per column."""
    absmax = np.abs(w).max(axis=0)
    best, best_err = None, np.full(w.shape[1], np.inf)
    for ratio in np.linspace(1.0, 0.5, grid):
        scale = qm.symmetric_scale(absmax * ratio, qmax)
        err = ((qm.fake_quant(w, scale, 0, -qmax, qmax) - w) ** 2).sum(axis=0, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, scale, scale if best is None else best)
    return best


@pytest.mark.parametrize("dist", ["t3", "laplace", "normal"])
@pytest.mark.parametrize("qmax", [127, 63])
def test_fast_mse_weight_clip_matches_the_full_grid_search(dist, qmax):
    # Large enough (1024 values per channel, 256k values) for the modelled ranking plus exact check.
    rng = np.random.default_rng(11)
    draw = {"t3": lambda s: rng.standard_t(3, size=s), "laplace": lambda s: rng.laplace(size=s), "normal": lambda s: rng.standard_normal(s)}[dist]
    w = draw((1024, 256)).astype(np.float32)
    assert w.size > qm._EXACT_SEARCH_TENSOR and w.shape[0] >= qm._EXACT_SEARCH_VALUES  # the fast path runs

    def errors(scale):
        return ((qm.fake_quant(w, scale, 0, -qmax, qmax) - w) ** 2).sum(axis=0, dtype=np.float64)

    fast = qm.weight_scales(w, 1, qmax, "mse")
    e_fast, e_grid = errors(fast), errors(_full_grid_scales(w, qmax))
    e_absmax = errors(qm.weight_scales(w, 1, qmax, "none"))
    assert np.all(e_fast <= e_absmax)  # never worse than no clipping, channel by channel
    assert e_fast.sum() <= e_grid.sum() * (1 + 1e-3)  # the full search's error, within rounding noise
    assert np.mean(e_fast <= e_grid * (1 + 1e-2)) >= 0.99
    # the same search along other axes and per tensor (channel axis first, in the middle, none)
    w3 = draw((64, 32, 64)).astype(np.float32)
    for axis in (0, 1, None):
        scale = qm.weight_scales(w3, axis, qmax, "mse")
        assert scale.shape == ((w3.shape[axis],) if axis is not None else (1,))
        moved = (w3.reshape(1, -1) if axis is None else np.moveaxis(w3, axis, 0).reshape(w3.shape[axis], -1)).T
        ref = _full_grid_scales(moved, qmax)
        sq = lambda s: ((qm.fake_quant(moved, s, 0, -qmax, qmax) - moved) ** 2).sum(dtype=np.float64)  # noqa: E731
        assert sq(scale) <= sq(ref) * (1 + 1e-3)


def test_quantize_weight_blocks_give_the_codes_of_quantize():
    rng = np.random.default_rng(12)
    for shape, axis in (((700, 600), 1), ((600, 700), 0), ((8, 700, 90), 1), ((300, 900), None), ((16, 3, 3, 3), 0)):
        w = (rng.standard_t(3, size=shape)).astype(np.float32)
        q, scale = qm.quantize_weight(w, axis, 127, "mse")
        expected = qm.quantize(w, qm.per_axis_shape(scale, w.ndim, axis), 0, -127, 127).astype(np.int8)
        assert q.dtype == np.int8
        np.testing.assert_array_equal(q, expected)


def test_relative_output_error_weighs_the_error_by_the_input_second_moment():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4))
    w_new = w + 0.1 * rng.standard_normal((6, 4))
    # identity second moment: the plain Frobenius relative error
    assert qm.relative_output_error(w, w_new, np.eye(6)) == pytest.approx(np.linalg.norm(w_new - w) / np.linalg.norm(w))
    # inputs that never use row 0: an error there costs nothing
    s = np.diag([0.0, 1, 1, 1, 1, 1])
    only_row0 = w.copy()
    only_row0[0] += 5.0
    assert qm.relative_output_error(w, only_row0, s) == 0.0
    assert qm.relative_output_error(np.zeros((6, 4)), w, np.eye(6)) == 0.0  # no output energy: defined as 0
    # a separate error moment (the covariance after a bias correction) weighs only the numerator
    mean = np.array([2.0, 0, 0, 0, 0, 0])
    cov = np.eye(6)  # inputs with covariance I and mean (2, 0, ...): second moment I + mean mean^T
    with_mean = cov + np.outer(mean, mean)
    shifted = w.copy()
    shifted[0] += 1.0  # an error on the row the mean drives
    assert qm.relative_output_error(w, shifted, with_mean, cov) < qm.relative_output_error(w, shifted, with_mean)
    assert qm.relative_output_error(w, shifted, with_mean, cov) == pytest.approx(
        np.sqrt(np.sum((shifted - w) ** 2) / np.sum(w * (with_mean @ w)))
    )


def test_split_rows_hot_rows_4_bit_cold_rows_2_bit_and_exact_bytes():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((50, 48)).astype(np.float32)
    hot = qm.used_rows([np.array([[3, 7, 7, -1]]), np.array([60, 9])], 50)  # -1 is row 49; 60 is out of range
    assert hot.tolist() == [3, 7, 9, 49]
    a = qm.quantize_split_rows(w, hot, 16, 32)
    table = qm.dequantize_split_rows(a, 16, 32)
    hc, hs, hz = qm.quantize_rows_blockwise(w[hot], 16, 4)
    np.testing.assert_array_equal(table[hot], qm.dequantize_rows_blockwise(hc, hs, hz, 16))
    cold = np.setdiff1d(np.arange(50), hot)
    assert a["remap"][hot].tolist() == [0, 1, 2, 3] and sorted(a["remap"][cold].tolist()) == list(range(4, 50))
    err = lambda rows: np.linalg.norm(table[rows] - w[rows]) / np.linalg.norm(w[rows])  # noqa: E731
    assert err(hot) < 0.15 < err(cold) < 0.45
    packed = sum(x.nbytes for x in (
        qm.pack_codes(a["hot_codes"], 4), a["hot_scales"], qm.pack_codes(a["hot_zero_points"], 4),
        qm.pack_codes(a["cold_codes"], 2), a["cold_scales"], qm.pack_codes(a["cold_zero_points"], 2), a["remap"],
    ))
    assert qm.split_rows_bytes(50, 48, 4, 16, 32) == packed


# -- int4: the full signed grid, Hessian-weighted clip search, act order with static groups, scale refit -------------
def _correlated_layer(k=96, n=40, rows=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k))) * np.exp(rng.standard_normal(k))
    return x, rng.standard_t(5, (k, n)) * 0.02


def test_signed_scale_puts_the_largest_magnitude_value_on_the_lowest_level():
    block = np.array([[0.5, -0.9, 0.0], [-0.2, 0.3, 0.0], [0.1, 0.9, 0.0]])  # column 1: a tie -> the low end
    scale, zp = qm.block_params(block, 0, 15, True, clip="none", signed=True)
    assert zp.tolist() == [8, 8, 8]
    assert scale[0] == pytest.approx(-0.5 / 8) and scale[1] == pytest.approx(0.9 / 8) and scale[2] > 0
    codes = qm.quantize(block, scale, zp, 0, 15)
    assert codes[0, 0] == 0 and codes[0, 1] == 0  # the largest value sits on -8, exactly
    assert qm.dequantize(codes, scale, zp)[0, 0] == pytest.approx(0.5)
    # 16 levels instead of 15: a finer step, so a smaller round-to-nearest error on typical blocks
    w = np.random.default_rng(0).standard_normal((32, 2000))
    narrow = qm.fake_quant(w, *qm.block_params(w, 0, 15, True, clip="none"), 0, 15)
    full = qm.fake_quant(w, *qm.block_params(w, 0, 15, True, clip="none", signed=True), 0, 15)
    assert np.square(full - w).sum() < 0.9 * np.square(narrow - w).sum()


def test_weighted_clip_search_equals_the_exhaustive_weighted_search():
    rng = np.random.default_rng(3)
    block = rng.standard_t(3, (32, 50))
    weights = rng.uniform(0.0, 5.0, 32)
    scale, zp = qm.block_params(block, 0, 15, True, clip="mse", signed=True, row_weights=weights)
    best = np.full(50, np.inf)
    for r in np.linspace(1.0, 0.6, 24):  # the same grid, each candidate's weighted error by fake_quant
        s = qm.signed_scale(block.min(axis=0) * r, block.max(axis=0) * r, 8)
        err = (weights[:, None] * np.square(qm.fake_quant(block, s, 8, 0, 15) - block)).sum(axis=0)
        best = np.minimum(best, err)
    chosen = (weights[:, None] * np.square(qm.fake_quant(block, scale, zp, 0, 15) - block)).sum(axis=0)
    np.testing.assert_allclose(chosen, best, rtol=1e-5)


def _naive_gptq(w, h, order, scales, zps, group, damp=0.01):
    """GPTQ as the paper writes it: the full inverse Hessian, updated by one Gaussian elimination step per row."""
    w = np.array(w, np.float64)[order]
    h = np.array(h, np.float64)[np.ix_(order, order)]
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    codes = np.zeros(w.shape, np.int64)
    for i, row in enumerate(order):
        g = row // group
        q = qm.quantize(w[i], scales[g], zps[g], 0, 15)
        codes[row] = q
        err = (w[i] - (q - zps[g]) * scales[g].astype(np.float64)) / hinv[i, i]
        w[i + 1 :] -= np.outer(hinv[i + 1 :, i], err)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def test_gptq_in_act_order_with_static_groups_equals_the_textbook_algorithm():
    x, w = _correlated_layer()
    h = x.T @ x
    factor = qm.hessian_factor(h, act_order=True)
    assert np.all(np.diff(np.diag(h)[factor.order]) <= 0)  # descending Hessian diagonal
    scales, zps = qm.block_params(w[:32], 0, 15, True, "none", signed=True)
    fixed = (np.stack([qm.block_params(w[b : b + 32], 0, 15, True, "none", signed=True)[0] for b in range(0, 96, 32)]), np.full((3, 40), 8))
    codes, out_scales, _ = qm.gptq(w, (factor.inverse, factor.dead), 32, fixed, 0, 15, order=factor.order)
    np.testing.assert_array_equal(out_scales, fixed[0])  # static: the scales given
    reference = _naive_gptq(w, h, factor.order, fixed[0], fixed[1], 32)
    assert np.mean(codes == reference) > 0.995  # the same rounding (a few ties may break differently)
    # the raw Hessian and the factor give the same codes; a row order without fixed scales is refused
    np.testing.assert_array_equal(qm.gptq(w, h, 32, fixed, 0, 15, order=factor.order)[0], codes)
    with pytest.raises(ValueError, match="static"):
        qm.gptq(w, h, 32, lambda rows: (scales, zps), 0, 15, order=factor.order)


def test_refit_block_scales_is_the_least_squares_solution_per_column():
    x, w = _correlated_layer(k=64, n=12)
    h = x.T @ x
    codes, scales, zps = qm.quantize_blockwise(w, 16, 4, True, hessian=qm.gptq_inverse(h), signed=True)
    codes[:16, 0] = 8  # column 0, block 0: every code at the zero point -> its scale is kept
    refit = qm.refit_block_scales(w, codes, zps, scales, h, 16)
    assert refit[0, 0] == scales[0, 0]
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(64)
    root = np.linalg.cholesky(damped).T  # (w - Q s)^T H (w - Q s) = ||root (w - Q s)||^2
    for col in range(1, 12):
        q = np.zeros((64, 4))
        for b in range(4):
            q[b * 16 : (b + 1) * 16, b] = codes[b * 16 : (b + 1) * 16, col].astype(np.float64) - 8
        expected = np.linalg.lstsq(root @ q, root @ w[:, col], rcond=None)[0]
        np.testing.assert_allclose(refit[:, col], expected, rtol=1e-4)

    def output_error(s):
        return np.linalg.norm(x @ (qm.dequantize_blockwise(codes, s, zps, 16) - w))

    assert output_error(refit) < output_error(scales)


def test_hessian_aware_int4_lowers_the_output_error_of_symmetric_blocks():
    x, w = _correlated_layer(k=128, n=64, rows=1000)
    h = x.T @ x

    def error(**kw):
        codes, scales, zps = qm.quantize_blockwise(w, 32, 4, True, **kw)
        return np.linalg.norm(x @ (qm.dequantize_blockwise(codes, scales, zps, 32) - w)) / np.linalg.norm(x @ w)

    narrow = error(hessian=qm.gptq_inverse(h))
    full = error(hessian=qm.gptq_inverse(h), signed=True)
    refit = error(hessian=qm.hessian_factor(h), signed=True, refit=True)
    act_order = error(hessian=qm.hessian_factor(h, act_order=True), signed=True, refit=True)
    assert full < narrow and refit < full and act_order < refit
    # a raw Hessian with act_order/refit builds the same factor itself
    assert error(hessian=h, signed=True, act_order=True, refit=True) == pytest.approx(act_order, rel=1e-9)
