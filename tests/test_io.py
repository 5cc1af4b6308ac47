import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import mlp_model
from onnx import helper, numpy_helper

import onnxpress
from onnxpress.errors import ModelLoadError, UsageError


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _external_model(folder, location="weights.bin", offset=0, length=None, write=True):
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    tensor = numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length if length is not None else w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if write:
        (folder / "weights.bin").write_bytes(w.tobytes())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_load_save_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    onnxpress.save(mlp_model(), path)
    model = onnxpress.load(path)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    assert not list(tmp_path.glob(".*tmp"))


def test_external_data_is_lazy_and_round_trips(tmp_path):
    path = _external_model(tmp_path)
    model = onnxpress.load(path)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)  # not read at load time
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    onnxpress.save(model, out, external_data=True, size_threshold_bytes=0)
    assert (out.parent / "copy.onnx.data").exists()
    again = onnxpress.load(out)
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(), np.arange(16, dtype=np.float32).reshape(4, 4))


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "absolute"),
        ("../outside.bin", "escapes"),
        ("missing.bin", "missing"),
    ],
)
def test_unsafe_external_locations_are_refused(tmp_path, location, message):
    (tmp_path / "outside.bin").write_bytes(b"x" * 64)
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder, location=location)
    before = _sha(path)
    with pytest.raises(ModelLoadError, match=message):
        onnxpress.load(path)
    assert _sha(path) == before


def test_symlink_escaping_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"x" * 64)
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder, location="link.bin")
    os.symlink(tmp_path / "secret.bin", folder / "link.bin")
    with pytest.raises(ModelLoadError, match="escapes"):
        onnxpress.load(path)


def test_external_length_past_end_is_refused(tmp_path):
    path = _external_model(tmp_path, offset=32, length=64)
    with pytest.raises(ModelLoadError, match="past the end"):
        onnxpress.load(path)


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01garbage\xff" * 10, "not a valid ONNX"), (b"PK\x03\x04" + b"0" * 40, "not a valid ONNX")])
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        onnxpress.load(path)
    assert "\n" not in str(info.value)


def test_truncated_model(tmp_path):
    good = tmp_path / "good.onnx"
    onnxpress.save(mlp_model(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        onnxpress.load(bad)


def test_missing_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        onnxpress.load(tmp_path / "nope.onnx")


def test_sparse_initializers_are_densified_on_load(tmp_path):
    dense = np.zeros((4, 4), dtype=np.float32)
    dense[0, 1], dense[2, 3], dense[3, 0] = 1.5, -2.0, 3.0
    flat = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[flat], "w"), numpy_helper.from_array(flat.astype(np.int64), "w_idx"), [4, 4]
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        sparse_initializer=[sparse],
    )
    path = tmp_path / "sparse.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    model = onnxpress.load(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), dense)
    report = onnxpress.validate(str(path), model)
    assert report.passed


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def boom(*args, **kwargs):
        with open(args[1], "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OSError):
        onnxpress.save(mlp_model(), out)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_output_atomically(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    onnxpress.save(mlp_model(), out)
    assert onnxpress.load(out).graph is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_release_external_tensors_unmaps_and_maps_again(tmp_path):
    from onnxpress.io import release_external_tensors

    model = onnxpress.load(_external_model(tmp_path))
    tensor = model.graph.initializers["w"].const_value
    assert release_external_tensors(model) == 0  # nothing read yet
    first = tensor.numpy().copy()
    assert tensor.raw is not None
    assert release_external_tensors(model) == 1 and tensor.raw is None
    np.testing.assert_array_equal(tensor.numpy(), first)  # read again on demand
    held = tensor.numpy()  # an array over the map keeps it open, without error
    assert release_external_tensors(model) == 0
    np.testing.assert_array_equal(held, first)


def test_model_bytes_of_large_in_memory_tensors_is_the_serialized_size(tmp_path):
    """model_bytes measures big in-memory initializers through stand-ins (no whole-model serialization); the
    result must still be the exact serialized size, for in-memory, external and mixed models."""
    from onnxpress.api import model_bytes

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    arrays = [rng.standard_normal((512, 1024)).astype(np.float32), rng.integers(-127, 128, (1024, 2048)).astype(np.int8), np.ones(3, np.float32)]
    inits = [ir.Value(name=f"w{i}", const_value=ir.tensor(a, name=f"w{i}")) for i, a in enumerate(arrays)]
    nodes = [ir.node("Identity", [v], name=f"id{i}") for i, v in enumerate(inits)]
    model = ir.Model(ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="g"), ir_version=10)
    assert model_bytes(model) == len(ir.to_proto(model).SerializeToString())
    assert all(not isinstance(v.const_value, ir.ExternalTensor) for v in inits)  # the stand-ins are gone again
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data")
    loaded = onnxpress.load(path)

    def serialized(m):
        proto = ir.to_proto(m)
        return proto.ByteSize() + sum(int({e.key: e.value for e in t.external_data}["length"]) for t in proto.graph.initializer if t.external_data)

    assert model_bytes(loaded) == serialized(loaded) >= os.path.getsize(tmp_path / "m.onnx.data")
    loaded.graph.initializers["w1"].const_value = ir.tensor(np.ones((4096, 300), np.int8), name="w1")  # mixed
    assert model_bytes(loaded) == serialized(loaded)


def test_tensor_with_raw_and_typed_data_is_refused():
    from onnxpress.io import check_tensors

    w = onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    w.float_data.extend([1.0, 2.0, 3.0, 4.0])
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[w])
    with pytest.raises(ModelLoadError, match="both raw data and typed data"):
        check_tensors(onnx.helper.make_model(graph))
