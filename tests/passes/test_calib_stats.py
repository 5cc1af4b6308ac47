"""Calibration input statistics shared by factorize, prune and the budget search."""

import numpy as np
import pytest
from graphs import init, text_model

from onnxpress.errors import UsageError
from onnxpress.passes import calib_stats as cs

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def test_input_stats_match_numpy_for_plain_and_transposed_rows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3)).astype(np.float32)
    model = text_model(f"{HEADER} g (float[N,3] x) => (float[N,3] y) <{init('w', w)}> {{ h = Relu(x) y = MatMul(h, w) }}")
    feeds = [{"x": rng.standard_normal((4, 3)).astype(np.float32) + 0.5} for _ in range(3)]
    stats = cs.input_stats(model, feeds, [("h", False), ("h", True)])
    rows = np.concatenate([np.maximum(f["x"], 0) for f in feeds])
    plain = stats[("h", False)]
    assert plain.rows == 12
    np.testing.assert_allclose(plain.second_moment, rows.T @ rows / 12, rtol=1e-6)
    np.testing.assert_allclose(plain.mean, rows.mean(0), rtol=1e-6)
    cols = np.concatenate([np.maximum(f["x"], 0).T for f in feeds])  # a transA=1 input: its columns are the rows
    assert stats[("h", True)].rows == 9
    np.testing.assert_allclose(stats[("h", True)].second_moment, cols.T @ cols / 9, rtol=1e-6)
    by_name = cs.collect_input_stats(model, feeds, ["h"])
    np.testing.assert_allclose(by_name["h"].second_moment, plain.second_moment)


def test_check_calibration_names_the_pass():
    model = text_model(f"{HEADER} g (float[N,3] x) => (float[N,3] y) {{ y = Relu(x) }}")
    with pytest.raises(UsageError, match=r"^prune\(calibrated=true\) needs calibration data"):
        cs.check_calibration(model, [], "prune(calibrated=true)")
    feeds = [{"x": np.ones((2, 3), np.float32)}]
    assert cs.check_calibration(model, feeds, "x") is feeds


def test_damped_uses_the_live_mean_and_fills_dead_inputs_only_when_asked():
    s = np.diag([2.0, 4.0, 0.0])
    s[0, 1] = s[1, 0] = 1.0
    ridge = cs.damped(s, 0.5)
    np.testing.assert_array_equal(np.diag(ridge), [3.5, 5.5, 1.5])  # 0.5 * mean(2, 4) on every input
    assert ridge[0, 1] == 1.0
    filled = cs.damped(s, 0.0, fill_dead=True)
    np.testing.assert_array_equal(np.diag(filled), [2.0, 4.0, 3.0])  # invertible at damping 0
    assert np.linalg.matrix_rank(filled) == 3 and np.linalg.matrix_rank(cs.damped(s, 0.0)) == 2
    np.testing.assert_array_equal(np.diag(cs.damped(np.zeros((2, 2)), 1.0, fill_dead=True)), [1.0, 1.0])
