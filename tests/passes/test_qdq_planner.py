"""The qdq planner against the real pass: applicable layers and options, exact stored bytes, reconstructions
equal to what the rewritten model computes, passes that select exactly the named layers, bad option text."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import copy_model, init, text_model

from onnxpress import runtime
from onnxpress.pass_infra import PassContext
from onnxpress.passes import planning
from onnxpress.passes.calib_stats import collect_input_stats
from onnxpress.passes.qdq import Qdq, QdqPlanner

K, VOCAB = 256, 256
OPTIONS = ("int8", "int4/32", "int4/128", "int4/256", "int4/512", "split/32/128", "split/64/128")
# split tables also write four int64 index constants (hot count, last hot position, zero, last axis)
SPLIT_INDEX_CONSTANTS = 4 * 8


def _model() -> ir.Model:
    """MatMuls ``fc`` and ``fc1`` (a name inside another; fc1 has a bias Add), Gemm transB=1 ``gemm``, embedding
    ``embed`` (even rows) and ``odd`` (9 columns), Conv ``conv`` and an unnamed MatMul, each reading a graph input."""
    rng = np.random.default_rng(0)
    model = text_model(
        f"""<ir_version: 10, opset_import: ["" : 17]>
        g (float[N,{K}] x, int64[B,S] ids, float[1,4,8,8] img) => (float[N,48] y_fc, float[N,40] y_fc1, float[N,32] y_gemm,
            float[B,S,64] y_embed, float[B,S,9] y_odd, float[1,8,6,6] y_conv, float[N,24] y_unnamed)
        <{init("w_fc", rng.standard_normal((K, 48)))}, {init("w_fc1", rng.standard_normal((K, 40)))}, {init("b_fc1", rng.standard_normal(40))},
         {init("w_gemm", rng.standard_normal((32, K)))}, {init("table", rng.standard_normal((VOCAB, 64)))},
         {init("odd_table", rng.standard_normal((VOCAB, 9)))}, {init("w_conv", rng.standard_normal((8, 4, 3, 3)))},
         {init("w_unnamed", rng.standard_normal((K, 24)))}>
        {{
            y_fc = MatMul(x, w_fc)
            a_fc1 = MatMul(x, w_fc1)
            y_fc1 = Add(a_fc1, b_fc1)
            y_gemm = Gemm<transB=1>(x, w_gemm)
            y_embed = Gather<axis=0>(table, ids)
            y_odd = Gather<axis=0>(odd_table, ids)
            y_conv = Conv(img, w_conv)
            y_unnamed = MatMul(x, w_unnamed)
        }}"""
    )
    for node, name in zip(model.graph, ["fc", "fc1", "fc1_bias", "gemm", "embed", "odd", "conv", ""]):
        node.name = name
    return model


def _feeds(batches: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((16, K)).astype(np.float32), "ids": rng.integers(0, 100, (2, 8)).astype(np.int64),
         "img": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
        for _ in range(batches)
    ]


@pytest.fixture(scope="module")
def setup():
    model, feeds = _model(), _feeds()
    planner = QdqPlanner()
    return model, feeds, planner, planner.applicable(model, OPTIONS, feeds)


def _rewrite(model: ir.Model, planner: QdqPlanner, option: str, names, calibration=None) -> tuple[ir.Model, Qdq]:
    (p,) = planner.passes(model, option, names)
    work = copy_model(model)
    p.context = PassContext(calibration=calibration)
    p(work)
    return work, p


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def _views(applicable: planning.Applicable) -> dict[str, planning.LayerView]:
    return {v.name: v for v in applicable.layers.values()}


# -- what applies where ------------------------------------------------------------------------------------
def test_applicable_layers_options_and_reasons(setup):
    model, _, planner, found = setup
    assert isinstance(planner, planning.StoragePlanner) and planner.technique == "quant" and not planner.structural
    views = _views(found)
    assert set(views) == {"fc", "fc1", "gemm", "embed", "odd", "conv"}
    options = {v.name: found.options[i] for i, v in found.layers.items()}
    # K = 256: blocks of 256 still save bytes; 512 exceeds MatMulNBits' kernels
    assert options["fc"] == options["fc1"] == options["gemm"] == ["int8", "int4/32", "int4/128", "int4/256"]
    # rows of 64: one block of 128 saves scales over blocks of 32, larger blocks store the same; the table's
    # calibrated rows (ids < 100) make both splits smaller than any plain option
    assert options["embed"] == ["int8", "int4/32", "int4/128", "split/32/128", "split/64/128"]
    assert options["odd"] == ["int8"] and options["conv"] == ["int8"]
    assert views["embed"].hot is not None and views["embed"].hot.size <= 100 and views["odd"].hot is None
    assert (views["fc"].x, views["fc"].has_bias, views["fc1"].has_bias, views["gemm"].trans_b) == ("x", False, True, True)
    assert views["gemm"].matrix.shape == (K, 32)
    index = {n.name: i for i, n in enumerate(model.graph)}
    assert found.skipped[index["conv"]].startswith("int4: int4 covers MatMul and Gemm only")
    assert found.skipped[index["odd"]] == "int4: int4 embeddings need an even row length"
    assert "unnamed" in found.skipped[index[""]] and [r["layer"] for r in found.skipped_rows] == ["y_unnamed"]
    # without calibration data there are no hot rows, so no split options
    plain = planner.applicable(model, OPTIONS)
    assert all(not o.startswith("split") for opts in plain.options.values() for o in opts)
    # int8 alone: no int4 reasons
    assert not any(r.startswith("int4") for r in planner.applicable(model, ["int8"]).skipped.values())


# -- exact stored bytes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, option",
    [("fc", "int8"), ("fc", "int4/32"), ("fc", "int4/128"), ("gemm", "int8"), ("gemm", "int4/32"), ("gemm", "int4/128"),
     ("embed", "int8"), ("embed", "int4/32"), ("embed", "int4/128"), ("odd", "int8"), ("conv", "int8"),
     ("embed", "split/32/128"), ("embed", "split/64/128")],
)
def test_stored_bytes_are_the_bytes_the_pass_writes(setup, name, option):
    model, feeds, planner, found = setup
    layer = _views(found)[name]
    out, p = _rewrite(model, planner, option, [name], feeds if option.startswith("split") else None)
    assert planner.rewritten(p) == {name}
    predicted = planner.stored_bytes(layer, option)
    written = _initializer_bytes(out) - _initializer_bytes(model) + layer.fp32_bytes
    assert written == predicted + (SPLIT_INDEX_CONSTANTS if option.startswith("split") else 0)


@pytest.mark.parametrize("option", ["int8", "int4/32", "int4/128"])
def test_stored_bytes_of_every_layer_of_the_digits_cnn(option):
    """A trained torch export (Conv, Gemm transB=1 with bias): one pass over every layer taking ``option`` writes
    the sum of the predicted bytes."""
    digits = pytest.importorskip("onnxpress.models.digits")
    model = ir.load(digits.build("cnn"))
    planner = QdqPlanner()
    found = planner.applicable(model, [option])
    chosen = [v for i, v in found.layers.items() if option in found.options[i]]
    assert {v.op for v in chosen} == ({"Conv", "Gemm"} if option == "int8" else {"Gemm"})
    out, p = _rewrite(model, planner, option, [v.name for v in chosen])
    assert planner.rewritten(p) == {v.name for v in chosen}
    written = _initializer_bytes(out) - _initializer_bytes(model) + sum(v.fp32_bytes for v in chosen)
    assert written == sum(planner.stored_bytes(v, option) for v in chosen)


def test_matrix_bytes_is_the_matmul_layout(setup):
    _, _, planner, found = setup
    fc, gemm = _views(found)["fc"], _views(found)["gemm"]
    for option in ("int8", "int4/32", "int4/256"):
        assert planner.matrix_bytes(fc.matrix.shape, option) == planner.stored_bytes(fc, option)
        assert planner.matrix_bytes(gemm.matrix.shape, option) == planner.stored_bytes(gemm, option)
    assert planner.matrix_bytes((100, 10), "int4/32") == 10 * 4 * 16 + 10 * 4 * 4 + 10 * 2  # 4 padded blocks, packed zps


# -- reconstructions -----------------------------------------------------------------------------------------
def _computed_weight(out: ir.Model, name: str) -> np.ndarray:
    """The weight the rewritten model computes with, in the node's layout, from onnxruntime: an identity input
    gives a MatMul's [K, N] (a Gemm transB=1's transpose), all row ids give a table. (MatMulNBits' int8 compute
    quantizes each identity row exactly, so this holds at accuracy_level 4 too.)"""
    session = runtime.make_session(out, optimization="disable")
    feeds = {"x": np.eye(K, dtype=np.float32), "ids": np.arange(VOCAB, dtype=np.int64)[None, :], "img": np.zeros((1, 4, 8, 8), np.float32)}
    y = runtime.run(session, feeds, [f"y_{name}"])[f"y_{name}"]
    if name == "fc1":
        y = y - out.graph.initializers["b_fc1"].const_value.numpy()
    return y.T if name == "gemm" else (y[0] if name in ("embed", "odd") else y)


def _conv_weight(out: ir.Model) -> np.ndarray:
    (dq,) = [n for n in out.graph if n.op_type == "DequantizeLinear"]
    q, scale, zp = (v.const_value.numpy() for v in dq.inputs)
    return (q.astype(np.float64) - zp.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "name, option",
    [("fc", "int8"), ("fc", "int4/32"), ("fc", "int4/128"), ("fc1", "int4/32"), ("gemm", "int8"), ("gemm", "int4/32"),
     ("embed", "int8"), ("embed", "int4/32"), ("embed", "split/32/128"), ("odd", "int8"), ("conv", "int8")],
)
def test_reconstruction_is_what_the_rewritten_model_computes(setup, name, option):
    """Uncalibrated: the pass's MSE clip search (split tables need calibration data only for their hot rows)."""
    model, feeds, planner, found = setup
    layer = _views(found)[name]
    w, delta = planner.reconstruct(layer, option, None)
    assert delta is None and w.shape == layer.shape and w.dtype == np.float32
    out, _ = _rewrite(model, planner, option, [name], feeds if option.startswith("split") else None)
    computed = _conv_weight(out) if name == "conv" else _computed_weight(out, name)
    np.testing.assert_allclose(computed, w, rtol=1e-5, atol=1e-5 * np.abs(layer.w).max())
    assert not np.allclose(w, layer.w, atol=1e-4)  # it is quantized


@pytest.mark.parametrize("option", ["int8", "int4/32", "int4/128"])
def test_calibrated_reconstruction_is_gptq_as_the_pass_computes_it(setup, option):
    """With the input's statistics the reconstruction rounds by GPTQ like the pass with calibration data (the pass
    sums X^T X, in float32 for int4, where the planner takes the float64 mean: GPTQ is invariant to the scale,
    and here no code rounds the other way)."""
    model, feeds, planner, found = setup
    layer = _views(found)["fc"]
    stats = collect_input_stats(model, feeds, [layer.x])[layer.x]
    w, _ = planner.reconstruct(layer, option, stats)
    assert np.array_equal(w, planner.reconstruct_matrix(layer.matrix, option, stats.second_moment).astype(np.float32))
    out, _ = _rewrite(model, planner, option, ["fc"], feeds)
    np.testing.assert_allclose(_computed_weight(out, "fc"), w, rtol=1e-5, atol=1e-5 * np.abs(layer.w).max())
    # GPTQ is not the plain rounding: the calibration changed the result
    plain, _ = planner.reconstruct(layer, option, None)
    assert not np.allclose(plain, w)


# -- selecting layers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, names",
    [("int8", ["fc"]), ("int8", ["fc1"]), ("int8", ["fc", "gemm", "conv"]), ("int8", ["fc", "fc1", "gemm", "embed", "odd", "conv"]),
     ("int4/32", ["fc"]), ("int4/32", ["fc1", "embed"]), ("int4/128", ["gemm"]), ("split/32/128", ["embed"])],
)
def test_passes_select_exactly_the_named_layers(setup, option, names):
    model, feeds, planner, _ = setup
    out, p = _rewrite(model, planner, option, names, feeds)
    assert planner.rewritten(p) == set(names)
    text = str(p)
    assert text.startswith("qdq(") and ("include=" in text or "exclude=" in text)
    # the pass text alone re-creates the selection (what the pipeline text of a budget result relies on)
    from onnxpress.pipeline import Pipeline

    (again,) = Pipeline.parse(text)
    again.context = PassContext(calibration=feeds)
    again(copy_model(model))
    assert planner.rewritten(again) == set(names)


def test_passes_refuse_a_layer_the_option_does_not_take(setup):
    model, _, planner, _ = setup
    with pytest.raises(ValueError, match="conv"):
        planner.passes(model, "int4/32", ["conv"])
    with pytest.raises(ValueError, match="nope"):
        planner.passes(model, "int8", ["nope"])


@pytest.mark.parametrize("text", ["int4/48", "int4/8", "int4", "int3", "int8/32", "split/32", "split/32/100", "split/8/128", "", "fp32"])
def test_bad_option_text_raises_value_error(setup, text):
    model, _, planner, found = setup
    layer = _views(found)["fc"]
    for call in (
        lambda: planner.applicable(model, ["int8", text]),
        lambda: planner.stored_bytes(layer, text),
        lambda: planner.reconstruct(layer, text, None),
        lambda: planner.passes(model, text, ["fc"]),
        lambda: planner.matrix_bytes((8, 8), text),
    ):
        with pytest.raises(ValueError, match="unknown qdq option"):
            call()


def test_options_a_layer_cannot_take_raise_value_error(setup):
    _, _, planner, found = setup
    views = _views(found)
    with pytest.raises(ValueError, match="split"):
        planner.stored_bytes(views["fc"], "split/32/128")
    with pytest.raises(ValueError, match="Conv"):
        planner.reconstruct(views["conv"], "int4/32", None)
    with pytest.raises(ValueError, match="then="):
        planner.stored_bytes(views["fc"], "int8", then=(planner, "int8"))


def test_the_pass_names_its_planner():
    assert Qdq.planner is QdqPlanner


def test_weight_bytes_formulas():
    from onnxpress.passes.qdq.planner import QuantOption, weight_bytes

    def nbytes(kind, shape, text):
        return weight_bytes(kind, shape, QuantOption.parse(text))

    assert nbytes("matmul", (256, 64), "int8") == 256 * 64 + 5 * 64
    # int4 blocks of 32 along K=100 -> 4 blocks (padded), 16 bytes of codes each, float scale, packed zps
    assert nbytes("matmul", (100, 10), "int4/32") == 10 * 4 * 16 + 10 * 4 * 4 + 10 * 2
    assert nbytes("gemm_t", (10, 100), "int4/32") == nbytes("matmul", (100, 10), "int4/32")
    assert nbytes("gather", (1000, 64), "int8") == 1000 * 64 + 4 * 1000
    assert nbytes("gather", (1000, 64), "int4/32") == 1000 * 32 + 1000 * 2 * 4 + 1000 * 1
    assert nbytes("conv", (8, 4, 3, 3), "int8") == 288 + 5 * 8


def test_selection_uses_the_shorter_of_include_and_exclude():
    from onnxpress.passes.qdq.planner import selection

    targets = [("a1", "MatMul"), ("a2", "MatMul"), ("a3", "MatMul"), ("g", "Gather")]
    assert selection(["a1"], ["a2", "a3", "g"], targets) == {"include": ("a1",)}
    assert selection(["a1", "a2", "a3"], ["g"], targets) == {"exclude": ("Gather",)}  # op types stand for all their nodes
    assert selection(["a1", "a2", "g"], ["a3"], targets) == {"exclude": ("a3",)}


def test_larger_int4_blocks_are_options_only_where_they_store_fewer_bytes():
    from onnxpress.passes.qdq.planner import QuantOption, useful_options

    quants = [QuantOption.parse(q) for q in ("int8", "int4/32", "int4/128", "int4/256", "int4/512")]

    def useful(op, shape):
        return [str(q) for q in useful_options(planning.LayerView(0, "n", op, "w", np.zeros(shape, np.float32)), quants)]

    # K = 384: blocks of 256 pad to 512 rows (more bytes than blocks of 128); 512 exceeds MatMulNBits' kernels
    assert useful("MatMul", (384, 384)) == ["int8", "int4/32", "int4/128"]
    assert useful("MatMul", (1536, 384)) == ["int8", "int4/32", "int4/128", "int4/256"]
    # embedding rows of 384: one block per row still saves scales (GatherBlockQuantized takes any block)
    assert useful("Gather", (1000, 384)) == ["int8", "int4/32", "int4/128", "int4/256", "int4/512"]
