import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, text_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxpress
from onnxpress import runtime, sparse_storage
from onnxpress.api import model_bytes
from onnxpress.errors import OnnxpressError, UsageError
from onnxpress.passes import sparse as sp
from onnxpress.passes.sparse import Sparsify
from onnxpress.pipeline import Pipeline
from onnxpress.validate import Tolerance

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def sparse_weight(shape, zeros: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < zeros] = 0.0
    return w


def matmul_model(w: np.ndarray, bias: np.ndarray | None = None):
    k, n = w.shape
    inits = [init("w", w)] + ([init("b", bias)] if bias is not None else [])
    body = "a = MatMul(x, w)\n y = Add(a, b)" if bias is not None else "y = MatMul(x, w)"
    return text_model(f"{HEADER} g (float[N,{k}] x) => (float[N,{n}] y) <{', '.join(inits)}> {{ {body} }}")


def sparsify(model, **options) -> tuple[ir.Model, Sparsify]:
    p = Sparsify(**options)
    result = Pipeline([p]).run(model)
    assert result.model is model  # an in-place IR pass: the pipeline returns the ir.Model
    return result.model, p


def saved(model: ir.Model, path, **kwargs) -> onnx.ModelProto:
    """Save with onnxpress.save (where sparse storage is applied) and read the file back as a proto."""
    onnxpress.save(model, path, **kwargs)
    return onnx.load(str(path), load_external_data=False)


def ort_out(model, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.make_session(model), {"x": x})["y"]


# -- pure encoding -------------------------------------------------------------------------------------
def test_narrowest_index_type():
    assert sp.narrowest_index_type(0) == np.int8
    assert sp.narrowest_index_type(127) == np.int8
    assert sp.narrowest_index_type(128) == np.int16
    assert sp.narrowest_index_type(32767) == np.int16
    assert sp.narrowest_index_type(32768) == np.int32
    assert sp.narrowest_index_type(2**31) == np.int64
    assert sp.narrowest_index_type(5, (np.dtype(np.int64),)) == np.int64


def test_layout_choice():
    # [64, 64]: linear int16 (2 bytes) vs coordinates 2 x int8: equal, so linear
    coo = sp.coo_encode(sparse_weight((64, 64), 0.8))
    assert coo.layout == "linear" and coo.indices.dtype == np.int16
    # [100, 100, 5]: linear needs int32 (50000 > 32767), coordinates 3 x int8 = 3 bytes: coordinates
    coo = sp.coo_encode(sparse_weight((100, 100, 5), 0.8))
    assert coo.layout == "coordinates" and coo.indices.dtype == np.int8 and coo.indices.shape[1] == 3
    # int64 only: linear always (8 bytes vs rank x 8)
    coo = sp.coo_encode(sparse_weight((100, 100, 5), 0.8), (np.dtype(np.int64),))
    assert coo.layout == "linear" and coo.indices.dtype == np.int64
    # [384, 1536] (MiniLM FFN): 589824 positions -> int32 linear; coordinates 2 x int16: same, so linear
    assert sp.coo_encode(np.eye(384, 1536, dtype=np.float32)).indices.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    zeros=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    narrow=st.booleans(),
)
def test_encode_decode_round_trip(shape, zeros, seed, narrow):
    w = sparse_weight(tuple(shape), zeros, seed)
    allowed = sp.INDEX_TYPES if narrow else (np.dtype(np.int64),)
    coo = sp.coo_encode(w, allowed)
    np.testing.assert_array_equal(sp.coo_decode(coo.values, coo.indices, coo.shape), w)
    assert coo.values.size == np.count_nonzero(w)
    linear = coo.indices if coo.layout == "linear" else np.ravel_multi_index(tuple(coo.indices.T.astype(np.int64)), w.shape)
    assert np.all(np.diff(np.asarray(linear, np.int64)) > 0)  # ascending, no duplicates (ONNX requires it)
    assert coo.indices.dtype in allowed
    assert coo.nbytes >= sp.floor_bytes(w, allowed) if coo.layout == "linear" else True


def test_floor_bytes():
    w = np.zeros((256, 256), np.float32)
    w[0, :10] = 1.0
    assert sp.floor_bytes(w) == 10 * (4 + 4)  # 65536 positions need int32
    assert sp.floor_bytes(w, (np.dtype(np.int64),)) == 10 * (4 + 8)


# -- the pass: plans on the ir.Model, applied by onnxpress.save -------------------------------------------
def test_sparsify_plans_in_memory_and_save_writes_sparse_exact_in_ort(tmp_path):
    w = sparse_weight((256, 256), 0.8)
    bias = np.linspace(-1, 1, 256).astype(np.float32)
    model = matmul_model(w, bias)
    model, p = sparsify(model)
    # in memory: dense, same values; the decision is the plan in the model's metadata
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)
    assert sparse_storage.read_plan(model) == sparse_storage.StoragePlan(("w",), 0.5, "narrow", 64)
    path = tmp_path / "sparse.onnx"
    proto = saved(model, path)
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["w"]
    assert [t.name for t in proto.graph.initializer] == ["b"]  # dense: no zeros
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), ort_out(model, x))  # same dense weight in ORT: bit-identical
    (row,) = [d for d in p.details if "skipped" not in d]
    assert row["initializer"] == "w" and row["nnz"] == np.count_nonzero(w)
    assert row["layout"] == "linear" and row["index_type"] == "int32"  # 65536 positions
    assert row["bytes_after"] == proto.graph.sparse_initializer[0].ByteSize()
    assert row["bytes_after"] <= 1.10 * row["floor_bytes"]
    assert row["bytes_before"] / row["bytes_after"] > 2.0  # 80% zeros, fp32 values + int32 indices: 2.5x
    assert p.stats is not None and p.stats.modified
    assert p.stats.after.initializer_bytes < 0.45 * p.stats.before.initializer_bytes
    assert p.stats.after.parameters == np.count_nonzero(w) + bias.size
    # model_bytes is the size of what save writes, to the byte
    assert path.stat().st_size == model_bytes(model)
    assert model_bytes(model) < 0.45 * (w.nbytes + bias.nbytes)


def test_optimize_returns_ir_model_and_the_saved_file_matches_it(tmp_path):
    """The whole API: validation compares the dense in-memory model; the saved file (sparse) computes exactly
    the same in onnxruntime, holds the sparse initializers and has the size the report gives."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((128, 256)).astype(np.float32)
    w2 = rng.standard_normal((256, 64)).astype(np.float32)
    model = text_model(
        f"""{HEADER} g (float[N,128] x) => (float[N,64] y) <{init('w1', w1)}, {init('w2', w2)}>
        {{ h = MatMul(x, w1)
           r = Relu(h)
           y = MatMul(r, w2) }}"""
    )
    path = tmp_path / "out.onnx"
    out, report = onnxpress.optimize(model, "prune(sparsity=0.8,min_size=0),sparsify", output=path, tolerance=Tolerance(min_cosine=0.3))
    assert isinstance(out, ir.Model)
    assert report.passed and report.written == [str(path)]
    proto = onnx.load(str(path))
    assert sorted(s.values.name for s in proto.graph.sparse_initializer) == ["w1", "w2"]
    assert len(proto.graph.initializer) == 0
    assert path.stat().st_size == report.bytes_after == model_bytes(out)
    assert report.bytes_after < 0.45 * (w1.nbytes + w2.nbytes)  # 80% zeros: 0.2 x (4 + 2 or 4) bytes per weight
    x = rng.standard_normal((16, 128)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), ort_out(out, x))
    loaded = onnxpress.load(path)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(loaded.graph.initializers[name].const_value.numpy(), out.graph.initializers[name].const_value.numpy())
    assert [s.name for s in report.passes] == ["prune", "sparsify"]
    assert out.metadata_props["onnxpress.pipeline"] == "prune(sparsity=0.8,min_size=0),sparsify"


def test_lossless_sparsify_validates_exactly():
    w = sparse_weight((128, 128), 0.9, seed=5)
    out, report = onnxpress.optimize(matmul_model(w), "sparsify")
    assert report.validation is not None and report.validation.passed
    assert report.validation.outputs[0].max_abs == 0.0  # the in-memory model keeps its values
    assert report.bytes_after < 0.25 * report.bytes_before
    assert report.passes[0].details[0]["initializer"] == "w"


def test_round_trip_through_file_and_onnxpress_load(tmp_path):
    w = sparse_weight((100, 100, 5), 0.9, seed=3)  # coordinates layout with int8 indices
    model = text_model(
        f"{HEADER} g (float[N,100,100,5] x) => (float[N,100,100,5] y) <{init('w', w)}> {{ y = Mul(x, w) }}"
    )
    model, p = sparsify(model)
    assert p.details[0]["layout"] == "coordinates"
    path = tmp_path / "sparse.onnx"
    proto = saved(model, path)
    assert proto.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT8
    loaded = onnxpress.load(path)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), w)
    x = np.random.default_rng(0).standard_normal((2, 100, 100, 5)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), x * w)
    # the file keeps the plan: loading densifies, saving again stores the same sparse tensor
    again = tmp_path / "again.onnx"
    assert saved(loaded, again).graph.sparse_initializer[0] == proto.graph.sparse_initializer[0]
    assert again.stat().st_size == path.stat().st_size


def test_the_plan_survives_copies_and_strip_metadata(tmp_path):
    model = matmul_model(sparse_weight((64, 64), 0.8))
    out = Pipeline.parse("sparsify,strip-metadata").run(model).model
    copy = ir.from_proto(ir.to_proto(out))
    assert len(saved(copy, tmp_path / "copy.onnx").graph.sparse_initializer) == 1


def test_idempotent_and_threshold(tmp_path):
    w = sparse_weight((64, 64), 0.8)
    half = sparse_weight((64, 64), 0.6, seed=2)  # 60% zeros
    text = f"""{HEADER} g (float[N,64] x) => (float[N,64] y) <{init('w', w)}, {init('v', half)}>
        {{ a = MatMul(x, w)
           y = MatMul(a, v) }}"""
    model, p = sparsify(text_model(text), threshold=0.7)
    assert sparse_storage.read_plan(model).initializers == ("w",)
    again = Sparsify(threshold=0.7)
    assert again(model).modified is False
    assert again.stats is not None and not again.stats.modified
    assert again.stats.before == again.stats.after  # both count the stored (sparse) bytes
    assert [s.values.name for s in saved(model, tmp_path / "a.onnx").graph.sparse_initializer] == ["w"]
    # the last sparsify decides
    model2, _ = sparsify(model, threshold=0.5)
    assert sorted(s.values.name for s in saved(model2, tmp_path / "b.onnx").graph.sparse_initializer) == ["v", "w"]
    dense = sparse_weight((64, 64), 0.3, seed=4)  # 30% zeros: 0.7 x (4 + 2) bytes > 4 bytes per element
    model3, p = sparsify(matmul_model(dense), threshold=0.2)
    assert p.details[0]["skipped"] == "the sparse form is not smaller"
    assert sparse_storage.PLAN_KEY not in model3.metadata_props and p.stats is not None and not p.stats.modified


def test_a_pass_after_sparsify_is_rechecked_at_save(tmp_path):
    """Passes may follow sparsify: save re-checks the plan on the tensors as they are then."""
    w = sparse_weight((64, 64), 0.8, seed=1)
    model = text_model(
        f"""{HEADER} g (float[N,64] x) => (float[N,64] y) <{init('w', w)}, {init('w_copy', w)}>
        {{ a = MatMul(x, w)
           y = MatMul(a, w_copy) }}"""
    )
    out, report = onnxpress.optimize(model, "sparsify,dedup")
    assert sparse_storage.read_plan(out).initializers == ("w", "w_copy")
    assert len(out.graph.initializers) == 1  # dedup merged them: the plan names one that is gone
    proto = saved(out, tmp_path / "dedup.onnx")
    assert [s.values.name for s in proto.graph.sparse_initializer] == list(out.graph.initializers)
    assert (tmp_path / "dedup.onnx").stat().st_size == report.bytes_after == model_bytes(out)
    # a later change that makes a planned tensor dense: stored dense, and model_bytes follows
    (name,) = out.graph.initializers
    out.graph.initializers[name].const_value = ir.tensor(np.ones((64, 64), np.float32), name=name)
    proto = saved(out, tmp_path / "dense.onnx")
    assert len(proto.graph.sparse_initializer) == 0 and [t.name for t in proto.graph.initializer] == [name]
    assert (tmp_path / "dense.onnx").stat().st_size == model_bytes(out)


def test_save_with_external_data_keeps_sparse_tensors_inline(tmp_path):
    w = sparse_weight((256, 256), 0.9, seed=7)
    bias = np.linspace(-1, 1, 256).astype(np.float32)
    model, _ = sparsify(matmul_model(w, bias))
    path = tmp_path / "ext.onnx"
    proto = saved(model, path, external_data=True, size_threshold_bytes=16)
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["w"]
    (b,) = proto.graph.initializer
    assert b.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "ext.onnx.data").stat().st_size == bias.nbytes  # only the dense tensor went out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), ort_out(model, x))


def test_failed_sparse_save_leaves_nothing_and_the_model_unchanged(tmp_path, monkeypatch):
    w = sparse_weight((64, 64), 0.8)
    model, _ = sparsify(matmul_model(w, np.ones(64, np.float32)))
    order = list(model.graph.initializers)

    def boom(*args, **kwargs):
        with open(args[1], "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        onnxpress.save(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
    assert list(model.graph.initializers) == order == ["w", "b"]
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)


def test_a_plan_onnxpress_did_not_write_is_one_line_error(tmp_path):
    model = matmul_model(sparse_weight((64, 64), 0.8))
    model.metadata_props[sparse_storage.PLAN_KEY] = "[not a plan"
    with pytest.raises(OnnxpressError, match="not a sparse storage plan") as info:
        onnxpress.save(model, tmp_path / "out.onnx")
    assert "\n" not in str(info.value) and not isinstance(info.value, UsageError)
    assert list(tmp_path.iterdir()) == []
    for text in ('{"format":1,"threshold":2,"indices":"narrow","min_size":1,"initializers":[]}',
                 '{"format":1,"threshold":0.5,"indices":"uint8","min_size":1,"initializers":[]}',
                 '{"format":1,"threshold":0.5,"indices":"narrow","min_size":1,"initializers":[3]}'):
        with pytest.raises(OnnxpressError, match="not a sparse storage plan"):
            sparse_storage.StoragePlan.from_text(text)


def test_int64_indices_pass_the_onnx_checker_narrow_ones_do_not(tmp_path):
    model = matmul_model(sparse_weight((64, 64), 0.8))
    wide = saved(sparsify(model, indices="int64")[0], tmp_path / "wide.onnx")
    assert wide.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT64
    onnx.checker.check_model(wide)  # full_check=True fails: onnx shape inference does not read sparse initializers
    narrow = saved(sparsify(model)[0], tmp_path / "narrow.onnx")
    assert narrow.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT16
    with pytest.raises(onnx.checker.ValidationError, match="INT64"):
        onnx.checker.check_model(narrow)


@pytest.mark.parametrize("dtype,loads", [(np.int8, True), (np.int16, True), (np.int32, True), (np.int64, True), (np.uint8, False), (np.uint16, False)])
def test_onnxruntime_index_types(dtype, loads):
    """The facts INDEX_TYPES rests on: onnxruntime 1.32 reads signed int8..int64 sparse indices, not unsigned."""
    w = sparse_weight((6, 5), 0.7)
    flat = np.flatnonzero(w)
    tensor = helper.make_sparse_tensor(numpy_helper.from_array(w.ravel()[flat], "w"), numpy_helper.from_array(flat.astype(dtype), ""), [6, 5])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        sparse_initializer=[tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    if loads:
        np.testing.assert_allclose(ort_out(proto, x), x @ w, rtol=1e-6, atol=1e-6)
    else:
        with pytest.raises(Exception):
            ort_out(proto, x)


def test_skips_graph_inputs_small_and_all_zero_tensors(tmp_path):
    model = matmul_model(sparse_weight((64, 64), 0.9))
    model.graph.inputs.append(model.graph.initializers["w"])  # overridable at run time
    model, p = sparsify(model)
    assert p.details[0]["skipped"].startswith("also a graph input")
    assert p.stats is not None and not p.stats.modified
    assert len(saved(model, tmp_path / "input.onnx").graph.sparse_initializer) == 0
    small, _ = sparsify(matmul_model(sparse_weight((4, 4), 0.9)))
    assert len(saved(small, tmp_path / "small.onnx").graph.sparse_initializer) == 0  # 16 < min_size
    zero, _ = sparsify(matmul_model(np.zeros((64, 64), np.float32)))
    path = tmp_path / "zero.onnx"
    out = saved(zero, path)
    assert len(out.graph.sparse_initializer) == 1 and out.graph.sparse_initializer[0].values.dims == [0]
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), np.zeros((2, 64), np.float32))


def test_pipeline_text_and_any_position():
    p = Pipeline.parse("sparsify(threshold=0.7,indices=int64)")
    assert str(p) == "sparsify(threshold=0.7,indices=int64)"
    assert Pipeline.parse(str(p)) == p
    assert str(Pipeline.parse("sparsify,dedup")) == "sparsify,dedup"
    with pytest.raises(UsageError, match="threshold"):
        Pipeline.parse("sparsify(threshold=1.0)")
