import numpy as np
import onnx
import pytest
from graphs import init, text_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxpress
from onnxpress import runtime
from onnxpress.errors import UsageError
from onnxpress.passes import sparse as sp
from onnxpress.passes.sparse import Sparsify
from onnxpress.pipeline import Pipeline

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


def sparsify(model, **options) -> tuple[onnx.ModelProto, Sparsify]:
    p = Sparsify(**options)
    result = Pipeline([p]).run(model)
    return result.model, p


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


# -- the pass ------------------------------------------------------------------------------------------
def test_sparsify_matmul_exact_in_ort_and_bytes_near_floor():
    w = sparse_weight((256, 256), 0.8)
    bias = np.linspace(-1, 1, 256).astype(np.float32)
    model = matmul_model(w, bias)
    proto, p = sparsify(model)
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["w"]
    assert [t.name for t in proto.graph.initializer] == ["b"]  # dense: no zeros
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(proto, x), ort_out(model, x))  # same dense weight in ORT: bit-identical
    (row,) = [d for d in p.details if "skipped" not in d]
    assert row["layout"] == "linear" and row["index_type"] == "int32"  # 65536 positions
    assert row["bytes_after"] <= 1.10 * row["floor_bytes"]
    assert row["bytes_before"] / row["bytes_after"] > 2.0  # 80% zeros, fp32 values + int32 indices: 2.5x
    assert p.stats is not None and p.stats.modified
    assert p.stats.after.initializer_bytes < 0.45 * p.stats.before.initializer_bytes


def test_round_trip_through_file_and_onnxpress_load(tmp_path):
    w = sparse_weight((100, 100, 5), 0.9, seed=3)  # coordinates layout with int8 indices
    model = text_model(
        f"{HEADER} g (float[N,100,100,5] x) => (float[N,100,100,5] y) <{init('w', w)}> {{ y = Mul(x, w) }}"
    )
    proto, p = sparsify(model)
    assert p.details[0]["layout"] == "coordinates"
    path = tmp_path / "sparse.onnx"
    path.write_bytes(proto.SerializeToString())
    loaded = onnxpress.load(path)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), w)
    x = np.random.default_rng(0).standard_normal((2, 100, 100, 5)).astype(np.float32)
    np.testing.assert_array_equal(ort_out(str(path), x), x * w)


def test_idempotent_and_threshold():
    w = sparse_weight((64, 64), 0.8)
    half = sparse_weight((64, 64), 0.6, seed=2)  # 60% zeros
    model = text_model(
        f"""{HEADER} g (float[N,64] x) => (float[N,64] y) <{init('w', w)}, {init('v', half)}>
        {{ a = MatMul(x, w)
           y = MatMul(a, v) }}"""
    )
    proto, p = sparsify(model, threshold=0.7)
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["w"]
    again = Sparsify(threshold=0.7)
    assert again.run_proto(proto) is False
    assert again.stats is not None and not again.stats.modified
    proto2, _ = sparsify(model, threshold=0.5)
    assert sorted(s.values.name for s in proto2.graph.sparse_initializer) == ["v", "w"]
    dense = sparse_weight((64, 64), 0.3, seed=4)  # 30% zeros: 0.7 x (4 + 2) bytes > 4 bytes per element
    _, p = sparsify(matmul_model(dense), threshold=0.2)
    assert p.details[0]["skipped"] == "the sparse form is not smaller"


def test_int64_indices_pass_the_onnx_checker_narrow_ones_do_not():
    model = matmul_model(sparse_weight((64, 64), 0.8))
    wide, _ = sparsify(model, indices="int64")
    assert wide.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT64
    onnx.checker.check_model(wide)  # full_check=True fails: onnx shape inference does not read sparse initializers
    narrow, _ = sparsify(model)
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


def test_skips_graph_inputs_small_and_all_zero_tensors():
    w = sparse_weight((64, 64), 0.9)
    model = matmul_model(w)
    proto = onnx.load_from_string(onnx.shape_inference.infer_shapes(__import__("onnx_ir").to_proto(model)).SerializeToString())
    proto.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [64, 64]))  # overridable
    p = Sparsify()
    assert p.run_proto(proto) is False
    assert p.details[0]["skipped"].startswith("also a graph input")
    small = matmul_model(sparse_weight((4, 4), 0.9))
    out, p = sparsify(small)
    assert len(out.graph.sparse_initializer) == 0  # 16 < min_size
    zero = np.zeros((64, 64), np.float32)
    out, p = sparsify(matmul_model(zero))
    assert len(out.graph.sparse_initializer) == 1 and out.graph.sparse_initializer[0].values.dims == [0]
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(ort_out(out, x), np.zeros((2, 64), np.float32))


def test_pipeline_text_and_last_position():
    p = Pipeline.parse("sparsify(threshold=0.7,indices=int64)")
    assert str(p) == "sparsify(threshold=0.7,indices=int64)"
    assert Pipeline.parse(str(p)) == p
    with pytest.raises(UsageError, match="must come last"):
        Pipeline.parse("sparsify,dedup")
    with pytest.raises(UsageError, match="threshold"):
        Pipeline.parse("sparsify(threshold=1.0)")
    with pytest.raises(UsageError, match="serialized model"):
        Sparsify()(matmul_model(sparse_weight((64, 64), 0.8)))


def test_optimize_prune_then_sparsify_validates_in_ort():
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    model = matmul_model(w)
    out, report = onnxpress.optimize(model, "prune(sparsity=0.8,min_size=0),sparsify", validate_result=True)
    assert isinstance(out, onnx.ModelProto)
    assert len(out.graph.sparse_initializer) == 1
    dense_bytes = 128 * 128 * 4
    assert report.bytes_before > dense_bytes and report.bytes_after < 0.5 * report.bytes_before
    assert [s.name for s in report.passes] == ["prune", "sparsify"]
    assert report.validation is not None and report.validation.outputs[0].cosine > 0.5
