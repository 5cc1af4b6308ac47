"""What keeps a large budget search (a decoder's 150 layers, ~15 s per configuration check) inside its time and
memory: the back-off target aimed from the builds' fit/held-out gaps, the path search's stopping rules, the one
measured quantization per layer, and reconstructions kept as codes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxpress import budget as bg


# -- where the search aims after a build missed the budget ---------------------------------------------------
def test_aimed_scales_the_budget_by_the_gap_of_one_build():
    budget = bg.Budget.parse("ppl_increase_rel<=3%")
    # the search expected 2.9% on the fit data, the held-out build measured 5.8%: twice as far from ideal
    target = budget.aimed([(0.029, 0.058)])
    assert target.value == pytest.approx(0.03 / 1.2 / 2.0)
    # a second miss is aimed from the budget through both builds (a line with an offset), not from the last target
    second = budget.aimed([(0.029, 0.058), (0.0125, 0.0345)])
    slope = (0.058 - 0.0345) / (0.029 - 0.0125)
    offset = 0.058 - slope * 0.029
    assert second.value == pytest.approx((0.03 / 1.2 - offset) / slope)
    assert 0 < second.value < target.value


def test_aimed_falls_back_to_the_largest_ratio_and_to_gaps():
    budget = bg.Budget.parse("ppl_increase_rel<=3%")
    # a line that does not rise (noise) falls back to the largest held-out/fit ratio seen
    flat = budget.aimed([(0.02, 0.04), (0.01, 0.05)])
    assert flat.value == pytest.approx(0.03 / 1.2 / 5.0)
    cos = bg.Budget.parse("cos>=0.99")
    assert cos.aimed([(0.995, 0.98)]).value == pytest.approx(1 - 0.01 / 1.2 / 4.0)
    # a metric without an ideal value moves by 1.5x the largest gap
    acc = bg.Budget.parse("accuracy>=0.9")
    assert acc.aimed([(0.92, 0.88), (0.95, 0.89)]).value == pytest.approx(0.9 + 1.5 * 0.06)
    assert math.isfinite(budget.aimed([]).value)


# -- the search on the path -------------------------------------------------------------------------------
def _moves(n: int, saved: float = 10.0) -> list[bg.Move]:
    return [bg.Move(i, 0, 1, saved, 1.0) for i in range(n)]


def test_the_unchanged_models_margin_saves_the_first_bisection():
    moves, limit = _moves(200), 61.5
    plain, informed = [], []
    k1 = bg.longest_passing_prefix(moves, lambda k: plain.append(k) or limit - k)
    k2 = bg.longest_passing_prefix(moves, lambda k: informed.append(k) or limit - k, margin0=limit)
    assert k1 == k2 == 61
    assert informed[:2] == [200, 61] and len(informed) < len(plain)


def test_another_round_only_for_a_pinned_failing_move_above_the_tolerance():
    # one big move (layer 3: 300 bytes) breaks the budget; the small ones after it still fit
    moves = [bg.Move(i, 0, 1, 300.0 if i == 3 else 10.0, 8.0 if i == 3 else 1.0) for i in range(20)]

    def probe_of(calls):
        def probe(config):
            calls.append(dict(config))
            return 10.0 - sum(moves[li].cost for li in config)

        return probe

    calls: list = []
    config, accepted = bg.search_path(moves, probe_of(calls), rounds=3, size_tol=5.0)
    assert 3 not in config and len(config) == 10  # skipped the big move, took 7 small ones after it
    # with a tolerance larger than the big move, the first round is the last
    calls_tol: list = []
    config_tol, _ = bg.search_path(moves, probe_of(calls_tol), rounds=3, size_tol=400.0)
    assert len(calls_tol) < len(calls) and set(config_tol) <= set(range(3))


# -- reconstructions as codes ------------------------------------------------------------------------------
def test_compact_reconstruction_is_the_reconstruction_in_a_quarter_of_the_bytes():
    from onnxpress.passes.calib_stats import InputStats
    from onnxpress.passes.planning import LayerView
    from onnxpress.passes.qdq import QdqPlanner

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    x = rng.standard_normal((256, 96))
    stats = InputStats(x.T @ x / 256, x.mean(0), 256)
    planner = QdqPlanner()
    for op, trans_b in (("MatMul", False), ("Gemm", True)):
        layer = LayerView(0, "fc", op, "w", w.T.copy() if trans_b else w, trans_b=trans_b)
        layer.x = "x"
        for option in ("int8", "int4/32", "int4/64"):
            compact = planner.reconstruct_compact(layer, option, stats)
            dense, _ = planner.reconstruct(layer, option, stats)
            np.testing.assert_array_equal(compact.dense(), dense)
            assert compact.dense().shape == layer.w.shape and compact.nbytes < 0.3 * dense.nbytes
    # int8 and int4/32 share the factor of K = 96; int4/64 pads K to 128 (its own factor); release forgets both
    assert planner.held_factors == [("x", 96), ("x", 128)]
    planner.release("x")
    assert planner.held_factors == []


def test_a_warm_sensitivity_cache_gives_the_cold_run_s_decisions(tmp_path):
    """A cached ``d`` skips the layer's reconstruction in the sensitivity stage; the search makes it later from the
    input statistics, which must still be there (they were released, and the warm run simulated its configurations
    with calibration-free reconstructions: another first build, a negative back-off target, an unchanged model)."""
    import onnxpress
    from graphs import mlp_model

    model = mlp_model(k=16, h=32, n=8)
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"
    src = tmp_path / "in.onnx"
    onnxpress.save(model, src)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    ev = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    labels = {row.tobytes(): int(p) for rows in (x, ev) for row, p in zip(rows, session.run(None, {"x": rows})[0].argmax(-1))}

    def accuracy(session_factory, data):
        s = session_factory()
        hits = [int(p) == labels[row.tobytes()] for feed in data for p, row in zip(s.run(None, feed)[0].argmax(-1), feed["x"])]
        return {"accuracy": float(np.mean(hits))}

    runs = []
    for _ in range(2):
        _, report = onnxpress.optimize(str(src), budget="accuracy_drop<=2%", task=accuracy, calibration={"x": x}, evaluation={"x": ev},
                                       budget_options={"cache": str(tmp_path / "cache")})
        runs.append((report.budget.pipeline, [(a["fit_value"], a["value"], a.get("simulated")) for a in report.budget.attempts], report.bytes_after))
    assert list((tmp_path / "cache").rglob("*.json")), "the first run wrote its sensitivity cache"
    assert runs[0] == runs[1]
    assert runs[0][2] < src.stat().st_size
