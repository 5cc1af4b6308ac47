import numpy as np
import onnx_ir as ir
import pytest
from graphs import mlp_model, text_model

import onnxpress
from onnxpress.data import MAX_GENERATED_ELEMENTS, generate_inputs
from onnxpress.rundata import load_calibration
from onnxpress.errors import UsageError, ValidationError
from onnxpress.runtime import resolve_providers
from onnxpress.validate import Tolerance, compare_arrays


def test_compare_arrays_polygraphy_semantics():
    b = np.array([1.0, 100.0], dtype=np.float32)
    a = b + np.array([0.002, 0.05], dtype=np.float32)
    tol = Tolerance(atol=1e-3, rtol=1e-3)
    comp = compare_arrays("y", a, b, tol)
    # element 0: 0.002 > 1e-3 + 1e-3*1 = 0.002 (equal, within float32 rounding) ; element 1: 0.05 <= 0.001 + 0.1
    assert comp.max_abs == pytest.approx(0.05, rel=1e-4)
    assert comp.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-5)
    assert not compare_arrays("y", b + 0.01, b, tol).within_tolerance
    assert compare_arrays("y", b + 0.01, b, Tolerance(atol=0.02, rtol=0)).within_tolerance


def test_compare_nans_and_ints():
    nan = np.array([np.nan, 1.0])
    assert compare_arrays("y", nan.copy(), nan, Tolerance()).within_tolerance
    assert not compare_arrays("y", np.array([0.0, 1.0]), nan, Tolerance()).within_tolerance
    assert not compare_arrays("y", np.array([1, 2]), np.array([1, 3]), Tolerance(atol=10)).within_tolerance
    assert not compare_arrays("y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance()).within_tolerance


def test_cosine_mode():
    b = np.linspace(-1, 1, 100)
    a = b + 0.01 * np.sin(np.arange(100))
    assert compare_arrays("y", a, b, Tolerance(min_cosine=0.999)).within_tolerance
    assert not compare_arrays("y", -a, b, Tolerance(min_cosine=0.5)).within_tolerance


def test_validate_detects_a_changed_model():
    ref = mlp_model(seed=0)
    other = mlp_model(seed=1)
    report = onnxpress.validate(ref, other)
    assert not report.passed
    assert onnxpress.validate(ref, mlp_model(seed=0)).passed


def test_generated_inputs_respect_embedding_range_and_masks():
    table = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    model = ir.from_onnx_text(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (int64[batch,seq] input_ids, int64[batch,seq] attention_mask) => (float[batch,seq,3] y)
        <float[7,3] table = {{{", ".join(map(str, table.ravel()))}}}>
        {{
            e = Gather(input_ids, table)
            m = Cast<to=1>(attention_mask)
            m2 = Unsqueeze(m, axes)
            y = Mul(e, m2)
        }}
        """.replace("Gather(input_ids, table)", "Gather(table, input_ids)").replace("Unsqueeze(m, axes)", "Unsqueeze(m, ax)").replace("{\n            e", "{\n            ax = Constant<value_ints=[-1]>()\n            e")
    )
    feeds = generate_inputs(model, dims={"batch": 3, "seq": 5})
    assert feeds["input_ids"].shape == (3, 5)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 7
    assert np.all(feeds["attention_mask"] == 1)
    assert onnxpress.validate(model, model, dims={"batch": 3, "seq": 5}).passed


def test_huge_claimed_shapes_are_capped():
    model = text_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1099511627776, 4] x) => (float[1099511627776, 4] y) { y = Relu(x) }
        """
    )
    with pytest.raises(ValidationError, match=f"cap {MAX_GENERATED_ELEMENTS}"):
        generate_inputs(model)


def test_cuda_missing_is_clear():
    with pytest.raises(ValidationError, match="onnxruntime-gpu"):
        resolve_providers("cuda", available=["CPUExecutionProvider"])
    assert resolve_providers("cuda", available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(ValidationError, match="unknown provider"):
        resolve_providers("tpu")


def test_user_inputs_npz_and_pb_folder(tmp_path):
    from onnx import numpy_helper

    model = mlp_model()
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    report = onnxpress.validate(model, model, inputs=tmp_path / "in.npz")
    assert report.inputs == {"x": [5, 8]}
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    assert onnxpress.validate(model, model, inputs=folder).inputs == {"x": [5, 8]}
    np.savez(tmp_path / "bad.npz", z=x)
    with pytest.raises(UsageError, match="missing x; unknown z"):
        onnxpress.validate(model, model, inputs=tmp_path / "bad.npz")


def test_calibration_batches(tmp_path):
    model = mlp_model()
    x = np.random.default_rng(3).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    batches = load_calibration(tmp_path / "cal.npz", model, batch_size=8)
    assert [b["x"].shape for b in batches] == [(8, 8), (8, 8), (4, 8)]
    np.savez(tmp_path / "cal3.npz", x=x.reshape(20, 1, 8))
    assert len(load_calibration(tmp_path / "cal3.npz", model)) == 20
    np.savez(tmp_path / "wrong.npz", x=x.astype(np.int64))
    with pytest.raises(UsageError, match="dtype"):
        load_calibration(tmp_path / "wrong.npz", model)


def test_low_memory_validation_offloads_a_large_candidate(monkeypatch):
    """Above the size limits the candidate's weights move to a temporary file (same values, lazy tensors)
    and both sessions run in ORT's low-memory mode; the verdict is the same."""
    import gc
    import importlib
    import os

    from onnxpress import runtime

    validate_mod = importlib.import_module("onnxpress.validate")

    reference = mlp_model(k=64, h=128, n=8)
    candidate = ir.from_proto(ir.to_proto(reference))
    before = {name: v.const_value.numpy().copy() for name, v in candidate.graph.initializers.items()}
    plain = validate_mod.validate(reference, candidate, dims={"N": 3})
    monkeypatch.setattr(validate_mod, "LOW_MEMORY_BYTES", 0)
    monkeypatch.setattr(validate_mod, "OFFLOAD_BYTES", 0)
    low = validate_mod.validate(reference, candidate, dims={"N": 3})
    assert plain.passed and low.passed and low.outputs[0].max_abs == plain.outputs[0].max_abs == 0.0
    tensors = {name: v.const_value for name, v in candidate.graph.initializers.items()}
    external = [name for name, t in tensors.items() if isinstance(t, ir.ExternalTensor)]
    assert set(external) == {"w1", "w2"}  # the 1 KB threshold keeps the small biases inline
    for name, array in before.items():
        np.testing.assert_array_equal(tensors[name].numpy(), array)
    folder = str(tensors["w1"].base_dir)
    assert os.path.isdir(folder)
    for t in tensors.values():
        if isinstance(t, ir.ExternalTensor):
            t.release()
    del candidate, tensors, t
    gc.collect()
    assert not os.path.exists(folder)  # the temporary folder goes with the model
    # low-memory sessions give the same numbers as the default ones
    so = runtime.session_options(low_memory=True)
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
