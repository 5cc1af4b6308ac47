"""FactorizePlanner: what the budget search may ask about ``lowrank/R``, checked against the real pass.

Every number the planner gives is compared with what ``factorize(ratio=R, calibrated=true)`` writes and
computes: stored bytes against the initializer bytes of the rewritten model, reconstructions against the
rewritten model in onnxruntime, the predicted error against the error measured on the calibration rows.
"""

import numpy as np
import onnx_ir as ir
import pytest
from graphs import copy_model, init, text_model

from onnxpress import runtime
from onnxpress.pass_infra import PassContext
from onnxpress.passes import planning
from onnxpress.passes.calib_stats import InputStats, collect_input_stats, damped
from onnxpress.passes.factorize import Factorize, FactorizePlanner, centered, factors, rank_for_ratio, spectrum
from onnxpress.passes.factorize.planner import FACTORIZE_DAMPING, parse_option, substring_selectors
from onnxpress.passes.graph_utils import new_initializer

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'
OPTIONS = ("lowrank/0.5", "lowrank/0.3")
ALPHA = 0.5  # fc2's Gemm alpha: the bias correction of its output is scaled by it


def _decaying(k: int, n: int, seed: int) -> np.ndarray:
    """A weight with a decaying spectrum (what makes factorization worth planning)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 1.0 / (1.0 + np.arange(min(k, n))) ** 0.7
    return (u[:, : len(s)] * s @ v[:, : len(s)].T).astype(np.float32)


def _named(model: ir.Model, names: list[str | None]) -> ir.Model:
    for node, name in zip(model.graph, names):
        if name is not None:
            node.name = name
    return model


@pytest.fixture(scope="module")
def mlp():
    """fc1 MatMul + bias Add, fc2 Gemm transB=1 alpha beta with C, fc3 Gemm without C, fc4 MatMul (graph output).

    Calibration inputs have a non-zero mean and a decaying spectrum, so the bias correction is not zero and
    the truncation errors are well above float rounding."""
    rng = np.random.default_rng(0)
    w1, w2t, w3, w4 = _decaying(64, 96, 1), _decaying(80, 96, 2), _decaying(80, 72, 3), _decaying(72, 64, 4)
    b1, c2 = rng.standard_normal(96).astype(np.float32), 0.1 * rng.standard_normal(80).astype(np.float32)
    model = text_model(
        f"""{HEADER} g (float[M,64] x) => (float[M,64] y)
        <{init('w1', w1)}, {init('b1', b1)}, {init('w2t', w2t)}, {init('c2', c2)}, {init('w3', w3)}, {init('w4', w4)}>
        {{ a = MatMul(x, w1)  ab = Add(a, b1)  r1 = Relu(ab)
           h2 = Gemm<transB=1, alpha={ALPHA}, beta=2.0>(r1, w2t, c2)  r2 = Relu(h2)
           h3 = Gemm(r2, w3)  r3 = Relu(h3)
           y = MatMul(r3, w4) }}"""
    )
    _named(model, ["fc1", "add1", "relu1", "fc2", "relu2", "fc3", "relu3", "fc4"])
    mix = rng.standard_normal((48, 64)) * 0.9 ** np.arange(48)[:, None]

    def feeds(batches: int, seed: int) -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(seed)
        return [{"x": (r.standard_normal((32, 48)) @ mix + 0.1 * r.standard_normal((32, 64)) + 0.5).astype(np.float32)} for _ in range(batches)]

    return model, feeds(4, 1), feeds(2, 2)


def _applicable(model: ir.Model, options=OPTIONS) -> tuple[FactorizePlanner, dict[str, planning.LayerView]]:
    planner = Factorize.planner()
    found = planner.applicable(model, list(options))
    return planner, {layer.name: layer for layer in found.layers.values()}


def _run(planner: FactorizePlanner, model: ir.Model, option: str, names: list[str], calibration) -> ir.Model:
    """The planner's passes, run in order on a copy; each rewrites exactly the layers it includes."""
    work = copy_model(model)
    done: set[str] = set()
    for p in planner.passes(work, option, names):
        p.context = PassContext(calibration=calibration)
        p(work)
        assert planner.rewritten(p) == set(p.options.include)
        done |= planner.rewritten(p)
    assert done == set(names)
    return work


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def _with_reconstruction(model: ir.Model, layer: planning.LayerView, w: np.ndarray, delta: np.ndarray | None) -> ir.Model:
    """The original graph with ``layer``'s weight replaced and its output shifted by ``delta``."""
    work = copy_model(model)
    graph = work.graph
    graph.initializers[layer.weight].const_value = ir.tensor(w, name=layer.weight)
    if delta is None:
        return work
    node = list(graph)[layer.index]
    out = node.outputs[0]
    shifted = ir.Value(name=f"{out.name}/shifted", type=out.type, shape=out.shape)
    add = ir.node("Add", [out, new_initializer(graph, f"{layer.name}/delta", delta)], outputs=[shifted])
    graph.insert_after(node, add)
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, shifted)
    if out.is_graph_output():
        graph.outputs[list(graph.outputs).index(out)] = shifted
        name = out.name
        out.name, shifted.name = f"{name}/raw", name
    return work


def _outputs(model: ir.Model, feeds) -> np.ndarray:
    session = runtime.make_session(model, optimization="disable")  # the graph's arithmetic, no kernel fusions
    return np.concatenate([runtime.run(session, f)["y"] for f in feeds]).astype(np.float64)


# -- what the planner offers ----------------------------------------------------------------------------
def test_the_pass_names_its_planner():
    assert Factorize.planner is FactorizePlanner
    planner = Factorize.planner()
    assert isinstance(planner, planning.StructuralPlanner) and not isinstance(planner, planning.StoragePlanner)
    assert planner.technique == "lowrank" and planner.structural is True
    assert planner.products("enc/fc1") == ["enc/fc1/factorize_U", "enc/fc1/factorize_V"]


def test_applicable_layers_options_and_refusals(mlp):
    model, _, _ = mlp
    planner = Factorize.planner()
    found = planner.applicable(model, ["lowrank/0.5", "lowrank/0.1", "lowrank/0.3"])
    assert {layer.name: layer.index for layer in found.layers.values()} == {"fc1": 0, "fc2": 3, "fc3": 5, "fc4": 7}
    assert all(opts == ["lowrank/0.1", "lowrank/0.3", "lowrank/0.5"] for opts in found.options.values())  # cheapest first
    fc1, fc2, fc3, fc4 = (found.layers[i] for i in (0, 3, 5, 7))
    assert (fc1.op, fc1.weight, fc1.x, fc1.has_bias, fc1.trans_b) == ("MatMul", "w1", "x", True, False)
    assert (fc2.op, fc2.shape, fc2.matrix.shape, fc2.has_bias, fc2.trans_b) == ("Gemm", (80, 96), (96, 80), True, True)
    assert (fc3.has_bias, fc4.has_bias) == (False, False)  # Gemm without C, MatMul whose output is the graph's
    assert found.skipped == {}

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    refused = text_model(
        f"""{HEADER} g (float[M,64] x, float[64,M] xt, float[M,8] s) => (float[M,96] a, float[M,96] b, float[M,96] c,
            float[M,96] d, float[M,8] e, float[M,96] f)
        <{init('shared', big)}, {init('wt', big)}, {init('t', big.T)}, {init('small', small)}, {init('free', big)}>
        {{ a = MatMul(x, shared)  b = MatMul(x, shared)  c = Gemm<transA=1>(xt, wt)
           tt = Transpose<perm=[1,0]>(t)  d = MatMul(x, tt)  e = MatMul(s, small)  f = MatMul(x, free) }}"""
    )
    _named(refused, ["a", "b", "c", "tr", "d", "e", None])
    found = Factorize.planner().applicable(refused, ["lowrank/0.3"])
    assert found.layers == {} and found.options == {}
    assert "shared with other nodes" in found.skipped[0] and "shared with other nodes" in found.skipped[1]
    assert found.skipped[2] == "Gemm with transA=1"
    assert "behind a Transpose" in found.skipped[4]
    assert found.skipped[5] == "no constant float weight of at least 4096 parameters"
    assert found.skipped[6].startswith("unnamed node")
    assert 3 not in found.skipped  # not a MatMul/Gemm


@pytest.mark.parametrize("bad", ["int8", "lowrank", "lowrank/", "lowrank/0", "lowrank/1", "lowrank/1.5", "lowrank/-0.2", "lowrank/nan", "lowrank/0.3/2", "lowrank/x", "Lowrank/0.3"])
def test_bad_option_text_raises(mlp, bad):
    model, calib, _ = mlp
    planner, layers = _applicable(model)
    stats = collect_input_stats(model, calib, ["x"])["x"]
    with pytest.raises(ValueError, match="lowrank/R"):
        planner.applicable(model, ["lowrank/0.3", bad])
    for ask in (lambda: planner.stored_bytes(layers["fc1"], bad), lambda: planner.reconstruct(layers["fc1"], bad, stats),
                lambda: planner.predicted_error(layers["fc1"], bad, stats), lambda: planner.passes(model, bad, ["fc1"])):
        with pytest.raises(ValueError, match="lowrank/R"):
            ask()
    assert parse_option("lowrank/0.25") == 0.25


# -- bytes and reconstructions against the real pass ------------------------------------------------------
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", ["fc1", "fc2", "fc3", "fc4"])
def test_bytes_and_reconstruction_are_those_of_the_real_pass(mlp, name, option):
    model, calib, evals = mlp
    planner, layers = _applicable(model)
    layer = layers[name]
    built = _run(planner, model, option, [name], calib)
    # stored bytes: exactly the initializer bytes the pass adds (fp32 factors, the new bias where none folds)
    assert _initializer_bytes(built) - _initializer_bytes(model) == planner.stored_bytes(layer, option) - layer.fp32_bytes
    k, n = layer.matrix.shape
    r = rank_for_ratio(k, n, parse_option(option))
    assert planner.stored_bytes(layer, option) == 4 * (k * r + r * n) + (0 if layer.has_bias else 4 * n)
    # reconstruction fed to the original graph computes what the rewritten model computes
    stats = collect_input_stats(model, calib, [layer.x])[layer.x]
    w, delta = planner.reconstruct(layer, option, stats)
    assert w.shape == layer.shape and w.dtype == np.float32 and delta is not None and np.any(delta)
    simulated, real, original = (_outputs(m, evals) for m in (_with_reconstruction(model, layer, w, delta), built, model))
    assert np.linalg.norm(simulated - real) <= 1e-6 * np.linalg.norm(real)  # float32 rounding: ~2e-7 measured
    assert np.linalg.norm(real - original) > 1e-4 * np.linalg.norm(original)  # a real change, reproduced


@pytest.mark.parametrize("name", ["fc1", "fc2", "fc3", "fc4"])
def test_predicted_error_is_the_measured_local_error(mlp, name):
    """The squared relative output error of the float factors plus their bias correction, on the calibration
    rows themselves: predicted from the discarded directions, measured by multiplying.

    The statistics are taken here in float64 (``collect_input_stats`` accumulates X^T X in float32, whose
    rounding is ~1e-7 of the whole output energy: as large as the smallest errors measured here)."""
    model, calib, _ = mlp
    planner, layers = _applicable(model)
    layer = layers[name]
    x = np.concatenate([c[layer.x] for c in runtime.capture(model, calib, [layer.x])]).astype(np.float64)
    stats = InputStats(x.T @ x / len(x), x.mean(axis=0), len(x))
    scale = ALPHA if name == "fc2" else 1.0
    reference = scale * (x @ layer.matrix.astype(np.float64))
    errors = []
    for option in ("lowrank/0.5", "lowrank/0.3", "lowrank/0.1"):
        w, delta = planner.reconstruct(layer, option, stats)
        out = scale * (x @ (w.T if layer.trans_b else w).astype(np.float64)) + delta
        measured = float(np.sum((out - reference) ** 2) / np.sum(reference**2))
        assert planner.predicted_error(layer, option, stats) == pytest.approx(measured, rel=1e-6)
        errors.append(measured)
    assert 1e-5 < errors[0] < errors[1] < errors[2]  # float64 rounding is ~1e-13 of the output energy


class StubStorage:
    """A storage planner that stores a matrix in ``K*N + 100`` bytes and rounds it to quarters."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def matrix_bytes(self, shape: tuple[int, int], option: str) -> int:
        self.calls.append(("bytes", tuple(shape), option))
        return shape[0] * shape[1] + 100

    def reconstruct_matrix(self, w: np.ndarray, option: str, hessian: np.ndarray | None) -> np.ndarray:
        self.calls.append(("matrix", w.shape, option, hessian))
        return np.round(np.asarray(w) * 4) / 4


def test_products_are_stored_by_the_storage_planner(mlp):
    model, calib, _ = mlp
    planner, layers = _applicable(model)
    layer = layers["fc4"]  # no bias: the correction adds one
    k, n = layer.matrix.shape
    r = rank_for_ratio(k, n, 0.3)
    stub = StubStorage()
    assert planner.stored_bytes(layer, "lowrank/0.3", then=(stub, "int8")) == (k * r + 100) + (r * n + 100) + 4 * n
    assert stub.calls == [("bytes", (k, r), "int8"), ("bytes", (r, n), "int8")]

    stats = collect_input_stats(model, calib, [layer.x])[layer.x]
    stub.calls.clear()
    w, delta = planner.reconstruct(layer, "lowrank/0.3", stats, then=(stub, "int4/32"))
    # the factors the pass writes, computed here from the pass's maths, then stored by the stub
    s = damped(centered(stats.second_moment, stats.mean), FACTORIZE_DAMPING)
    u, v = factors(layer.matrix, spectrum(layer.matrix, s), r)
    u32, v32 = u.astype(np.float32).astype(np.float64), v.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(w, (np.round(u32 * 4) / 4) @ (np.round(v32 * 4) / 4), rtol=1e-6, atol=1e-6)
    (_, u_shape, u_option, u_hessian), (_, v_shape, v_option, v_hessian) = stub.calls
    assert (u_shape, v_shape, u_option, v_option) == ((k, r), (r, n), "int4/32", "int4/32")
    np.testing.assert_allclose(u_hessian, stats.second_moment)  # U sees x
    np.testing.assert_allclose(v_hessian, u32.T @ stats.second_moment @ u32, rtol=1e-10)  # V sees x U
    _, float_delta = planner.reconstruct(layer, "lowrank/0.3", stats)
    np.testing.assert_array_equal(delta, float_delta)  # the bias correction is computed before storage
    with pytest.raises(ValueError, match="statistics"):
        planner.reconstruct(layer, "lowrank/0.3", None)
    # a Gemm's output shift needs its alpha, which the planner learns in applicable()
    with pytest.raises(ValueError, match="alpha"):
        Factorize.planner().reconstruct(layers["fc2"], "lowrank/0.3", collect_input_stats(model, calib, ["r1"])["r1"])


# -- passes that realise decisions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain():
    """Four 64x64 MatMuls whose names are substrings of each other: fc, fc1, fc12, fc2."""
    names = ["fc", "fc1", "fc12", "fc2"]
    ws = [_decaying(64, 64, 10 + i) for i in range(4)]
    inits = ", ".join(init(f"w{i}", w) for i, w in enumerate(ws))
    model = text_model(f"{HEADER} g (float[M,64] x) => (float[M,64] y) <{inits}> {{ a = MatMul(x, w0) b = MatMul(a, w1) c = MatMul(b, w2) y = MatMul(c, w3) }}")
    _named(model, names)
    rng = np.random.default_rng(3)
    return model, [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("names", [["fc1"], ["fc"], ["fc", "fc12"], ["fc1", "fc2"], ["fc", "fc1", "fc12", "fc2"]])
def test_passes_rewrite_exactly_the_named_layers(chain, names):
    model, calib = chain
    planner = Factorize.planner()
    built = _run(planner, model, "lowrank/0.5", names, calib)
    node_names = {n.name for n in built.graph}
    for name in ("fc", "fc1", "fc12", "fc2"):
        assert ({f"{name}/factorize_U", f"{name}/factorize_V"} <= node_names) == (name in names)
        assert (name in node_names) == (name not in names)
    # a later decision on the working model leaves the products of the earlier one alone
    rest = [n for n in ("fc", "fc1", "fc12", "fc2") if n not in names]
    if rest:
        again = _run(planner, built, "lowrank/0.3", rest, calib)
        assert {f"{n}/factorize_V" for n in ("fc", "fc1", "fc12", "fc2")} <= {n.name for n in again.graph}
    assert planner.passes(model, "lowrank/0.5", []) == []


def test_one_pass_per_selector_pair_and_its_text_parses_back(chain):
    from onnxpress.pipeline import Pipeline

    model, _ = chain
    planner = Factorize.planner()
    passes = planner.passes(model, "lowrank/0.3", ["fc", "fc12"])
    assert [(p.options.include, p.options.exclude) for p in passes] == [(("fc",), ("fc1", "fc12", "fc2")), (("fc12",), ())]
    assert all(p.options.ratio == 0.3 and p.options.calibrated for p in passes)
    text = str(Pipeline(passes))
    assert str(Pipeline.parse(text)) == text
    assert substring_selectors(["fc", "fc12"], ["fc", "fc1", "fc12", "fc2"]) == [(["fc"], ["fc1", "fc12", "fc2"]), (["fc12"], [])]


def test_substring_selectors_select_exactly_the_intended_names():
    universe = ["node_linear", "node_linear_1", "node_linear_12", "node_linear_2", "other"]

    def selected(include, exclude, done):
        return {u for u in universe if u not in done and any(i in u for i in include) and not any(e in u for e in exclude)}

    for intended in (["node_linear"], ["node_linear_1"], ["node_linear", "node_linear_12"], ["node_linear_1", "node_linear_2"], universe):
        pairs = substring_selectors(intended, universe)
        done: set[str] = set()
        got: set[str] = set()
        for include, exclude in pairs:
            sel = selected(include, exclude, done)
            assert sel == set(include)
            got |= sel
            done |= sel
        assert got == set(intended)
