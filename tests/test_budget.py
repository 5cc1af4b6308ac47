"""The accuracy-budget search: budget text, the greedy maths on toy tables, exact reconstructions, and the
search on a small MLP whose verified result must meet the budget and beat the trivially safe choice."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, text_model

from onnxpress import budget as bg
from onnxpress import runtime
from onnxpress.api import model_bytes, optimize
from onnxpress.budget.simulate import Simulator, compare
from onnxpress.budget.layers import Choice, Grid, Planners, choice_bytes, find_layers, local_error, reconstruct
from onnxpress.passes.calib_stats import collect_input_stats
from onnxpress.errors import UsageError
from onnxpress.pipeline import Pipeline
from onnxpress.validate import Tolerance, validate

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


# -- budget text -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, metric, op, value",
    [
        ("cos>=0.99", "cos", ">=", 0.99),
        (" rel_l2 <= 0.05 ", "rel_l2", "<=", 0.05),
        ("max_abs<=1e-1", "max_abs", "<=", 0.1),
        ("accuracy_drop<=1%", "accuracy_drop", "<=", 0.01),
        ("mean_cos>=98%", "mean_cos", ">=", 0.98),
        ("ppl_increase<=0.5", "ppl_increase", "<=", 0.5),
    ],
)
def test_budget_parse(text, metric, op, value):
    b = bg.Budget.parse(text)
    assert (b.metric, b.op) == (metric, op)
    assert b.value == pytest.approx(value)
    assert b.ok(value) and b.is_output_metric == (metric in bg.OUTPUT_METRICS)
    assert not b.ok(value - 0.001) if op == ">=" else not b.ok(value + 0.001)
    assert not b.ok(float("nan"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("cos", "expected METRIC>=VALUE"),
        ("cos>0.9", "expected METRIC>=VALUE"),
        ("cos>=abc", "expected METRIC>=VALUE"),
        ("cos<=0.9", "write cos>=VALUE"),
        ("rel_l2>=0.1", "write rel_l2<=VALUE"),
        ("cos>=1", "cos must be below 1"),
        ("max_abs<=0", "max_abs must be > 0"),
        ("", "expected METRIC>=VALUE"),
    ],
)
def test_budget_parse_errors_are_one_line_usage_errors(text, message):
    with pytest.raises(UsageError, match=message) as info:
        bg.Budget.parse(text)
    assert "\n" not in str(info.value)


def test_budget_tightened_moves_towards_the_safe_side():
    assert bg.Budget.parse("cos>=0.99").tightened(0.002).value == pytest.approx(0.992)
    assert bg.Budget.parse("rel_l2<=0.05").tightened(0.01).value == pytest.approx(0.04)


# -- greedy maths on toy tables ----------------------------------------------------------------------
def test_lower_hull_drops_dominated_and_non_convex_options():
    # (bytes, error); option 0 is the unchanged layer
    options = [(100.0, 0.0), (50.0, 1.0), (40.0, 5.0), (25.0, 3.0), (30.0, 4.0), (120.0, 0.0), (10.0, 20.0)]
    # saved/error: A(50,1) B(60,5) C(75,3) D(70,4) E(-20: saves nothing) F(90,20)
    # B and D lie above A->C; hull = 0 -> A -> C -> F
    assert bg.lower_hull(options) == [0, 1, 3, 6]


def test_lower_hull_keeps_an_exact_option_first():
    assert bg.lower_hull([(10.0, 0.0), (8.0, 0.0), (4.0, 1.0)]) == [0, 1, 2]


def test_greedy_path_orders_by_bytes_per_error_and_keeps_layer_order():
    tables = [
        [(100.0, 0.0), (50.0, 1.0), (20.0, 11.0)],  # moves: 50/1 = 50, then 30/10 = 3
        [(80.0, 0.0), (40.0, 2.0), (30.0, 2.5)],  # moves: 40/2 = 20, then 10/0.5 = 20
    ]
    path = bg.greedy_path(tables)
    assert [(m.layer, m.src, m.dst) for m in path] == [(0, 0, 1), (1, 0, 1), (1, 1, 2), (0, 1, 2)]
    assert [m.saved for m in path] == [50.0, 40.0, 10.0, 30.0]
    assert bg.apply_moves(path) == {0: 2, 1: 2}
    with pytest.raises(ValueError):
        bg.apply_moves([path[2]])  # starts from option 1, layer 1 is at 0


def test_search_path_finds_the_longest_prefix_then_skips_a_blocking_layer():
    tables = [
        [(100.0, 0.0), (50.0, 1.0)],
        [(100.0, 0.0), (10.0, 9.0)],  # cheap per byte but too costly for the budget
        [(100.0, 0.0), (80.0, 3.0)],
    ]
    path = bg.greedy_path(tables)  # efficiencies: 50, 10, 6.67
    assert [m.layer for m in path] == [0, 1, 2]
    calls = []

    def passes(config):
        calls.append(dict(config))
        return sum(tables[li][o][1] for li, o in config.items()) <= 5.0

    config, accepted = bg.search_path(path, passes, rounds=4)
    assert config == {0: 1, 2: 1}  # layer 1 frozen after its move broke the budget, layer 2 still taken
    assert [m.layer for m in accepted] == [0, 2]
    assert bg.longest_passing_prefix(path, lambda k: k <= 1) == 1
    assert bg.longest_passing_prefix(path, lambda k: True) == 3


def test_interpolating_search_on_margins_needs_fewer_probes_than_bisection():
    moves = [bg.Move(i, 0, 1, 10.0, 1.0 + (i % 3)) for i in range(200)]  # cumulative error ~ 2 per move
    cost = np.cumsum([m.cost for m in moves])
    limit = 151.5

    def total(k):
        return float(cost[k - 1]) if k else 0.0

    margins, bools = [], []
    k_margin = bg.longest_passing_prefix(moves, lambda k: margins.append(k) or (limit - total(k)))
    k_bool = bg.longest_passing_prefix(moves, lambda k: bools.append(k) or total(k) <= limit)
    expected = max(k for k in range(201) if total(k) <= limit)
    assert k_margin == k_bool == expected
    assert len(margins) < len(bools) <= 9
    # size_tol: stop once the bytes still in play are small; the answer passes and is within the tolerance
    k_tol = bg.longest_passing_prefix(moves, lambda k: limit - total(k), size_tol=50.0)
    assert total(k_tol) <= limit and (expected - k_tol) * 10.0 <= 50.0
    # relative tolerance: at most 2.5% of the passing configuration's bytes (2000 bytes before any move)
    k_rel = bg.longest_passing_prefix(moves, lambda k: limit - total(k), size_tol=0.025, size0=2000.0)
    assert total(k_rel) <= limit and (expected - k_rel) * 10.0 <= 0.025 * (2000.0 - 10.0 * k_rel)


# -- a small MLP with real-ish structure ---------------------------------------------------------------
def _mlp(seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """x[N,64] -> MatMul 64x256 (+bias) -> Relu -> MatMul 256x256 -> Relu -> MatMul 256x16.

    Weights have decaying spectra (a trained network's shape); inputs live near a 12-dim subspace.
    """
    rng = np.random.default_rng(seed)

    def decaying(k: int, n: int) -> np.ndarray:
        u, _ = np.linalg.qr(rng.standard_normal((k, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        r = min(k, n)
        s = 3.0 * np.exp(-np.arange(r) / (r / 6))
        return (u[:, :r] * s) @ v[:, :r].T / np.sqrt(r) + 0.002 * rng.standard_normal((k, n))

    mix = rng.standard_normal((12, 64))
    model = text_model(
        f"""{HEADER} g (float[N,64] x) => (float[N,16] y)
        <{init('w1', decaying(64, 256))}, {init('b1', 0.1 * rng.standard_normal(256))}, {init('w2', decaying(256, 256))},
         {init('w3', decaying(256, 16))}>
        {{
            a = MatMul(x, w1)
            b = Add(a, b1)
            r = Relu(b)
            c = MatMul(r, w2)
            s = Relu(c)
            y = MatMul(s, w3)
        }}"""
    )
    for i, node in enumerate(n for n in model.graph if n.op_type == "MatMul"):
        node.name = f"fc{i + 1}"
    return model, mix


def _feeds(mix: np.ndarray, batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((32, 12)) @ mix + 0.05 * rng.standard_normal((32, 64))).astype(np.float32)} for _ in range(batches)]


@pytest.fixture(scope="module")
def mlp():
    model, mix = _mlp()
    return model, _feeds(mix, 6, 1), _feeds(mix, 4, 2)


def test_find_layers_uses_the_passes_rules(mlp):
    model, _, _ = mlp
    layers, _ = find_layers(model, Grid(), Planners.registered())
    by = {layer.name: layer for layer in layers}
    assert set(by) == {"fc1", "fc2", "fc3"}
    assert Choice("lowrank/0.5", "int4/32") in by["fc2"].choices and Choice(None, "int8") in by["fc2"].choices
    # fc3 has 4096 parameters: factorize's default floor (4096) accepts it only if a rank saves at the ratio
    assert all(c.structure is None for c in by["fc3"].choices) == ("lowrank" in by["fc3"].skipped)


@pytest.mark.parametrize(
    "choice, exact",
    # int4: MatMulNBits computes with accuracy_level=4 (int8 activations, the default for decode speed), so the
    # built model agrees with the fp32 simulation in error size, not bit for bit
    [(Choice(None, "int8"), True), (Choice(None, "int4/32"), False), (Choice("lowrank/0.3", None), True), (Choice("lowrank/0.3", "int8"), False),
     (Choice("lowrank/0.2", "int4/128"), False)],
)
def test_reconstruction_reproduces_the_real_passes(mlp, choice, exact):
    """Feeding the reconstruction for one layer gives the output of the model built by the passes.

    Exact for one technique; for quantized factors GPTQ's rounding cascades from float-rounding-level
    differences of the factors (the pass computes them with other BLAS threading), so there the error
    against the original must agree in size, not bit for bit."""
    model, calib, evals = mlp
    planners = Planners.registered()
    layers, _ = find_layers(model, Grid(factorize_float=True), planners)
    layer = next(layer for layer in layers if layer.name == "fc2")
    stats = collect_input_stats(model, calib, [layer.x])
    w, delta = reconstruct(planners, layer, choice, stats[layer.x])
    sim = Simulator(model, layers, [layer])
    simulated = sim.run(evals, sim.override(layer, w, delta))
    original = sim.run(evals)
    built, passes = bg.build(model, {"fc2": choice}, calib, planners)
    # the graph computes the same function (ORT without its kernel fusions) ...
    exact_session = runtime.make_session(built, optimization="disable")
    real = [runtime.run(exact_session, f) for f in evals]
    if exact:
        err = compare(simulated, real)
        assert err.metrics()["max_rel_l2"] < 2e-5, err
    else:
        d_sim, d_real = compare(simulated, original).d, compare(real, original).d
        assert 0.7 < d_sim / d_real < 1.4, (d_sim, d_real)
    # ... and ORT's fused kernels stay close (DequantizeLinear(uint8)+MatMul becomes MatMulNBits(bits=8,
    # accuracy_level=4), which quantizes the activations too: the final verification measures that)
    fused = runtime.make_session(built)
    assert compare(simulated, [runtime.run(fused, f) for f in evals]).metrics()["max_rel_l2"] < 5e-2
    # and the stored bytes are the ones predicted
    growth = model_bytes(built) - model_bytes(model)
    predicted = choice_bytes(planners, layer, choice) - layer.fp32_bytes
    assert abs(growth - predicted) < 1000, (growth, predicted)  # graph nodes and names
    # the text of the passes is an ordinary pipeline that parses back to the same passes
    text = str(Pipeline(passes))
    assert str(Pipeline.parse(text)) == text


@pytest.mark.parametrize("budget_text", ["cos>=0.995", "rel_l2<=0.02"])
def test_search_meets_the_budget_in_the_verified_model(mlp, budget_text, tmp_path):
    model, calib, evals = mlp
    result = bg.search(model, budget_text, calibration=calib, evaluation=evals, base="", cache=tmp_path, baselines=True)
    assert result.passed
    b = bg.Budget.parse(budget_text)
    # independent check of the returned model against the original on the evaluation data
    report = validate(ir.to_proto(model), result.model, inputs=evals, tolerance=Tolerance(min_cosine=0.0))
    measured = report.metrics()[b.metric]  # per-sample statistics: mean cosine / mean relative L2 over samples
    assert b.ok(measured), (measured, result.pipeline)
    assert measured == pytest.approx(result.value, rel=1e-4, abs=1e-6)
    # smaller than the trivially safe choice (int8 weights everywhere)
    int8, _ = optimize(model, "qdq(mode=weight)", calibration=calib, validate_result=False)
    assert result.bytes_after < model_bytes(int8)
    assert result.bytes_after == model_bytes(result.model)
    assert abs(result.bytes_after - result.predicted_bytes) < 0.05 * result.bytes_after
    # the pipeline text re-runs without search to the same model
    assert dict(result.model.metadata_props)["onnxpress.pipeline"] == result.pipeline
    # the same data as the search: all of calib is fit data when evaluation data is given (no hold-out)
    again, _ = optimize(model, result.pipeline, calibration=calib, evaluation=evals, validate_result=False)
    assert model_bytes(again) == result.bytes_after
    same = validate(result.model, again, inputs=evals, tolerance=Tolerance(atol=1e-5, rtol=1e-4))
    assert same.passed
    # the second run of the same search comes from the sensitivity cache and decides the same
    cached = bg.search(model, budget_text, calibration=calib, evaluation=evals, base="", cache=tmp_path, baselines=False)
    assert cached.pipeline == result.pipeline
    assert len(list((tmp_path / "budget").glob("*.json"))) == 1


def test_task_metric_budget_with_an_evaluate_function(mlp, tmp_path):
    model, calib, evals = mlp
    ref_session = runtime.make_session(model)
    ref = np.concatenate([runtime.run(ref_session, f)["y"] for f in evals]).argmax(-1)
    seen = []

    def evaluate(candidate):
        s = runtime.make_session(candidate)
        pred = np.concatenate([runtime.run(s, f)["y"] for f in evals]).argmax(-1)
        seen.append(1)
        return {"agreement": float(np.mean(pred == ref))}

    result = bg.search(model, "agreement>=0.97", calibration=calib, evaluate=evaluate, base="", cache=False, baselines=False)
    assert result.passed and result.value >= 0.97
    assert evaluate(result.model)["agreement"] == result.value
    assert result.bytes_after < model_bytes(model) / 4  # well below fp32
    assert len(seen) >= 3  # the path was searched with the real metric
    png = result.plot(tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = result.to_dict()
    json.dumps(data)
    assert data["budget"]["metric"] == "agreement" and data["layers"] and data["candidates"]
    from rich.console import Console

    console = Console(record=True, width=200)
    for r in result.renderables():
        console.print(r)
    text = console.export_text()
    assert "fc2" in text and result.pipeline[:40] in text.replace("\n", "")


def test_task_metric_without_task_is_a_usage_error(mlp):
    model, calib, _ = mlp
    with pytest.raises(UsageError, match="task metric"):
        bg.search(model, "accuracy_drop<=1%", calibration=calib, base="", cache=False)


def test_unknown_metric_of_the_task_names_the_available_ones(mlp):
    model, calib, _ = mlp
    with pytest.raises(UsageError, match="reports: agreement"):
        bg.search(model, "accuracy<=1", calibration=calib, evaluate=lambda m: {"agreement": 1.0}, base="", cache=False)


def test_budget_the_original_misses_is_a_usage_error(mlp):
    model, calib, _ = mlp
    with pytest.raises(UsageError, match="original model does not meet the budget itself: agreement = 0.9"):
        bg.search(model, "agreement>=0.95", calibration=calib, evaluate=lambda m: {"agreement": 0.9}, base="", cache=False)


@pytest.mark.slow
def test_digits_cnn_accuracy_budget_holds_and_shrinks_8x():
    from onnxpress.models import digits

    path = digits.build("cnn")
    result = bg.search(str(path), "accuracy_drop<=1%", calibration=digits.calibration_feeds("cnn"), task="digits", cache=False)
    assert result.passed
    check = digits.evaluate(result.model, kind="cnn", reference=str(path))
    assert check["accuracy_drop"] <= 0.01 and check["accuracy_drop"] == pytest.approx(result.value)
    assert result.ratio >= 8.0, result.ratio  # int8 everywhere is 3.7x


def test_progress_callback_sees_every_stage(mlp):
    model, calib, evals = mlp
    stages: dict[str, tuple[int, int]] = {}
    bg.search(model, "cos>=0.99", calibration=calib, evaluation=evals, base="", cache=False, baselines=False,
              progress=lambda stage, done, total: stages.__setitem__(stage, (done, total)))
    assert {"input statistics", "sensitivity (layer x candidate)", "build and verify"} <= set(stages)
    done, total = stages["sensitivity (layer x candidate)"]
    assert done == total > 10


def test_protobuf_model_and_path_inputs_are_left_unchanged(mlp, tmp_path):
    model, calib, evals = mlp
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    before = path.read_bytes()
    result = bg.search(str(path), "cos>=0.999", calibration=calib, evaluation=evals, base="", cache=False, baselines=False)
    assert path.read_bytes() == before
    assert result.passed
    proto = onnx.load(str(path))
    copy = proto.SerializeToString()
    bg.search(proto, "cos>=0.999", calibration=calib, evaluation=evals, base="", cache=False, baselines=False)
    assert proto.SerializeToString() == copy


def test_relative_increase_metrics_and_grid_validation():
    from onnxpress.tasks import with_relative

    out = with_relative({"perplexity": 5.5, "reference_perplexity": 5.0, "ppl_increase": 0.5, "accuracy": 0.9})
    assert out["ppl_increase_rel"] == pytest.approx(0.1) and out["ppl_increase"] == 0.5
    assert "accuracy_increase_rel" not in out
    given = with_relative({"accuracy": 0.9}, {"accuracy": 0.95})
    assert given["accuracy_drop"] == pytest.approx(0.05) and given["reference_accuracy"] == 0.95
    with pytest.raises(ValueError, match="int4/B"):
        Grid(quants=("int3",))
    with pytest.raises(ValueError, match="ratio"):
        Grid(ratios=(1.5,))


# -- predicted candidates, session scoring, qdq selection -------------------------------------------------
def test_local_error_and_the_predicted_lowrank_error_are_relative_output_errors(mlp):
    model, calib, _ = mlp
    planners = Planners.registered()
    layers, _ = find_layers(model, Grid(), planners)
    layer = next(layer for layer in layers if layer.name == "fc2")
    st = collect_input_stats(model, calib, [layer.x])[layer.x]
    assert local_error(layer, layer.w, st) == 0.0
    assert local_error(layer, np.zeros_like(layer.w), st) == pytest.approx(1.0)
    assert local_error(layer, 2 * layer.w, st) == pytest.approx(1.0)
    tails = [planners.structural.predicted_error(layer, f"lowrank/{r}", st) for r in (0.5, 0.3, 0.1)]
    assert 0.0 <= tails[0] <= tails[1] <= tails[2] <= 1.0
    # the prediction is the local error of the float factorization (the bias correction removes the mean part,
    # which the uncentred local error still counts: at least the prediction)
    w, _ = reconstruct(planners, layer, Choice("lowrank/0.3", None), st)
    assert local_error(layer, w, st) >= tails[1] * 0.99


def test_predicted_search_measures_fewer_candidates_and_still_meets_the_budget(mlp):
    model, calib, evals = mlp
    full = bg.search(model, "cos>=0.995", calibration=calib, evaluation=evals, base="", cache=False, predict=False)
    fast = bg.search(model, "cos>=0.995", calibration=calib, evaluation=evals, base="", cache=False, predict=True)
    assert fast.passed and full.passed
    assert all(c["measured"] for c in full.candidates)
    measured = [c for c in fast.candidates if c["measured"]]
    assert len(measured) < len(full.candidates)
    # every choice the result uses was measured; predictions are in the same range as the measurements
    chosen = {(row.name, row.choice) for row in fast.layers if row.choice != "fp32"}
    assert chosen <= {(c["layer"], c["choice"]) for c in measured}
    truth = {(c["layer"], c["choice"]): c["d"] for c in full.candidates}
    for c in fast.candidates:
        if not c["measured"] and truth.get((c["layer"], c["choice"]), 0) > 1e-6:
            assert 0.1 < c["d"] / truth[(c["layer"], c["choice"])] < 10, c
    assert fast.bytes_after <= 1.05 * full.bytes_after


def test_one_measured_quantization_per_layer_predicts_the_others(mlp):
    """A grid without structural options measures each layer's least and most compressing quantization and
    interpolates the others (``measure_quants="auto"``): within 2x of their measurements, the same result size."""
    model, calib, evals = mlp
    grid = Grid(quants=("int8", "int4/32", "int4/128"), splits=(), ratios=())
    full = bg.search(model, "cos>=0.995", calibration=calib, evaluation=evals, grid=grid, cache=False, measure_quants="all")
    fast = bg.search(model, "cos>=0.995", calibration=calib, evaluation=evals, grid=grid, cache=False)
    assert fast.passed and full.passed
    measured = [c for c in fast.candidates if c["measured"]]
    smallest = {}
    for c in fast.candidates:
        smallest[c["layer"]] = min(smallest.get(c["layer"], c["bytes"]), c["bytes"])
    largest = {}
    for c in fast.candidates:
        largest[c["layer"]] = max(largest.get(c["layer"], c["bytes"]), c["bytes"])
    # fc2, fc3: int8 and int4/128 measured, int4/32 interpolated; fc1 (K = 64) has only int8 and int4/32: both measured
    assert len(measured) == 6 and all(c["bytes"] in (smallest[c["layer"]], largest[c["layer"]]) for c in measured)
    truth = {(c["layer"], c["choice"]): c["d"] for c in full.candidates}
    for c in fast.candidates:
        assert 0.5 < c["d"] / truth[(c["layer"], c["choice"])] < 2.0, c
    assert fast.bytes_after <= 1.05 * full.bytes_after


@pytest.mark.parametrize("option", ["int4/32", "int4/128"])
def test_simulation_quantizes_the_input_as_the_built_kernel_does(mlp, option):
    """MatMulNBits computes at accuracy_level 4 with its input quantized per row in blocks: the simulation's
    switched input quantization reproduces the built model as onnxruntime runs it, not just in error size."""
    model, calib, evals = mlp
    planners = Planners.registered()
    layers, _ = find_layers(model, Grid(ratios=()), planners)
    layer = next(layer for layer in layers if layer.name == "fc2")
    block = planners.storage.activation_block(layer, option)
    assert block == int(option.split("/")[1])
    w, delta = reconstruct(planners, layer, Choice(None, option), None)
    sim = Simulator(model, layers, [], act_blocks={"fc2": [32, 128]})
    original = sim.run(evals)
    assert compare(sim.run(evals, sim.override(layer, w, delta)), original).d > 0  # the switch is off by default
    simulated = sim.run(evals, sim.override(layer, w, delta, block))
    built, _ = bg.build(model, {"fc2": Choice(None, option)}, [], planners)  # no calibration: MSE rounding on both sides
    real = [runtime.run(runtime.make_session(built), f) for f in evals]
    assert compare(simulated, real).metrics()["max_rel_l2"] < 1e-5
    weight_only = compare(sim.run(evals, sim.override(layer, w, delta)), real).metrics()["max_rel_l2"]
    assert weight_only > 100 * compare(simulated, real).metrics()["max_rel_l2"]


def test_int8_input_quantization_is_checked_on_the_model(mlp):
    """Whether onnxruntime fuses int8 DequantizeLinear + MatMul into MatMulNBits (input quantized per block of 32)
    depends on the graph: the search checks it once on the model. On this MLP it does not fuse."""
    model, calib, evals = mlp
    grid = Grid(quants=("int8", "int4/32"), splits=(), ratios=())
    result = bg.search(model, "cos>=0.995", calibration=calib, evaluation=evals, grid=grid, cache=False)
    assert any(n.startswith("int8: onnxruntime does not quantize the layer input") for n in result.notes), result.notes
    assert result.passed


def test_an_evaluate_that_accepts_sessions_scores_the_simulation_session(mlp):
    model, calib, evals = mlp
    planners = Planners.registered()
    layers, _ = find_layers(model, Grid(), planners)
    layer = next(layer for layer in layers if layer.name == "fc2")
    sim = Simulator(model, layers, [])
    w, _ = reconstruct(planners, layer, Choice(None, "int4/32"), None)
    over = sim.override(layer, w, None)
    session = sim.session_with(over)
    assert [v.name for v in session.get_inputs()] == ["x"]
    materialized = runtime.make_session(sim.materialize(over))
    for f in evals:
        # the same function; ORT may fuse constant weights differently (float rounding)
        np.testing.assert_allclose(runtime.run(session, f)["y"], runtime.run(materialized, f)["y"], rtol=1e-4, atol=1e-6)
    kinds = []

    def evaluate(candidate):
        kinds.append(type(candidate).__name__)
        s = candidate if hasattr(candidate, "get_outputs") else runtime.make_session(candidate)
        return {"out_norm": float(sum(np.abs(runtime.run(s, f)["y"]).sum() for f in evals))}

    evaluate.accepts_session = True
    ref = evaluate(model)["out_norm"]
    result = bg.search(model, f"out_norm>={0.97 * ref}", calibration=calib, evaluate=evaluate, base="", cache=False)
    assert result.passed
    assert "OverrideSession" in kinds and kinds[-1] != "OverrideSession"  # the built model is verified as a model


@pytest.fixture(scope="module")
def embedding():
    """ids -> Gather(512 x 64 table) -> MatMul -> y; calibration and evaluation use rows 0..99 only."""
    rng = np.random.default_rng(4)
    model = text_model(
        f"""{HEADER} g (int64[B,S] ids) => (float[B,S,32] y)
        <{init("table", rng.standard_normal((512, 64)))}, {init("w", rng.standard_normal((64, 32)) * 0.1)}>
        {{ e = Gather<axis=0>(table, ids) y = MatMul(e, w) }}"""
    )
    for i, node in enumerate(model.graph):
        node.name = ["embed", "proj"][i]
    feeds = [{"ids": rng.integers(0, 100, (4, 16)).astype(np.int64)} for _ in range(6)]
    return model, feeds[:4], feeds[4:]


def test_embedding_split_candidates_bytes_and_reconstruction(embedding):
    """The split choice (used rows int4, the rest 2-bit) is offered only with calibration data, stores fewer bytes
    than any plain int4 table, and its reconstruction is what qdq(embedding_split=true) builds."""
    model, calib, evals = embedding
    planners = Planners.registered()
    without, _ = find_layers(model, Grid(), planners)
    assert not any(c.storage.startswith("split") for layer in without for c in layer.choices)
    layers, _ = find_layers(model, Grid(), planners, calib)
    table = next(layer for layer in layers if layer.name == "embed")
    assert table.hot.size <= 100
    splits = [c for c in table.choices if c.storage.startswith("split")]
    assert splits and max(choice_bytes(planners, table, c) for c in splits) < min(choice_bytes(planners, table, c) for c in table.choices if c.storage.startswith("int4"))
    choice = Choice(None, "split/32/128")
    w, _ = reconstruct(planners, table, choice, None)
    sim = Simulator(model, layers, [])
    simulated = sim.run(evals, sim.override(table, w, None))
    built, passes = bg.build(model, {"embed": choice}, calib, planners)
    assert "embedding_split=true" in str(Pipeline(passes)) and "embedding_block_size=32" in str(Pipeline(passes))
    real = [runtime.run(runtime.make_session(built), f) for f in evals]
    assert compare(simulated, real).metrics()["max_rel_l2"] < 2e-5
    growth = model_bytes(built) - model_bytes(model)
    assert abs(growth - (choice_bytes(planners, table, choice) - table.fp32_bytes)) < 1500  # graph nodes and names
    with pytest.raises(ValueError, match="split"):
        Grid(splits=("split/48/128",))
