"""Calibration-based passes on a model with external data, run from a working directory that is not the
model's folder: every onnxruntime session the tool builds must find the data beside the model."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
from graphs import mlp_model

from onnxpress import Tolerance, optimize, runtime, validate
from onnxpress.io import has_external_data, load


@pytest.fixture
def external_model(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    path = a / "model.onnx"
    ir.save(mlp_model(k=64, h=64, n=16, seed=3), path, external_data="model.onnx.data", size_threshold_bytes=0)
    assert (a / "model.onnx.data").exists()
    monkeypatch.chdir(b)  # the data is NOT reachable relative to the working directory
    assert not os.path.exists("model.onnx.data")
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]
    return path, calibration


PIPELINES = [
    "qdq(mode=static)",
    "qdq(mode=int4,block_size=32)",
    "qdq(mode=int4,block_size=32,report_errors=true)",
    "factorize(calibrated=true,ratio=0.5)",
    "prune(calibrated=true,min_size=1024)",
]
LOOSE = Tolerance(min_cosine=0.5)  # this checks that the data is found, not accuracy


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_calibrated_pass_from_another_cwd(external_model, pipeline):
    path, calibration = external_model
    model, report = optimize(str(path), pipeline, calibration=calibration, tolerance=LOOSE)
    assert report.validation is not None and report.validation.passed, report.validation
    _check_rewritten(model, report, pipeline)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_loaded_model_from_another_cwd(external_model, pipeline):
    """An ir.Model loaded from another folder (its external tensors know that folder) goes through the
    same calibration sessions."""
    path, calibration = external_model
    loaded = load(path)
    assert has_external_data(loaded)
    model, report = optimize(loaded, pipeline, calibration=calibration, validate_result=False)
    _check_rewritten(model, report, pipeline)
    assert validate(str(path), model, tolerance=LOOSE).passed


def test_session_and_capture_from_another_cwd(external_model):
    path, calibration = external_model
    model = load(path)
    expected = runtime.run(runtime.make_session(str(path)), calibration[0])["y"]
    for source in (model, runtime.copy_model(model)):
        got = runtime.run(runtime.make_session(source), calibration[0])["y"]
        np.testing.assert_array_equal(got, expected)
    (captured,) = runtime.capture(model, calibration[:1], ["y"])
    np.testing.assert_array_equal(captured["y"], expected)


def _check_rewritten(model, report, pipeline):
    # the pass really rewrote the model: a lossy pass that changed nothing would prove nothing
    assert report.passes[-1].modified
    if pipeline.startswith("prune"):
        w1 = model.graph.initializers["w1"].const_value.numpy()
        assert (w1 == 0).mean() >= 0.5
    else:
        assert report.bytes_after < report.bytes_before


def test_in_memory_model_with_external_data_validates_from_another_folder(tmp_path, monkeypatch):
    """api.optimize on a loaded ir.Model (external weights) from another working directory: the reference
    the validation runs is the caller's model, which still knows where its weights live."""
    import onnxpress
    from graphs import mlp_model

    folder = tmp_path / "a"
    folder.mkdir()
    onnxpress.save(mlp_model(k=64, h=128, n=16), folder / "m.onnx", external_data=True)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = onnxpress.load(folder / "m.onnx")
    _, report = onnxpress.optimize(model, "qdq(mode=weight)")
    assert report.validation.passed and report.bytes_after < report.bytes_before
