"""Digits MLP / CNN: trained on sklearn's digits, exported, fp32 accuracy >= 95% on the held-out split."""

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import onnxpress  # noqa: E402
from onnxpress.cli import run  # noqa: E402
from onnxpress.export import compare_with_module  # noqa: E402
from onnxpress.models import common, digits  # noqa: E402


def test_split_is_disjoint_and_calibration_comes_from_training():
    x_train, y_train, x_test, y_test = digits._split()
    assert (len(x_train), len(x_test)) == (1347, 450)
    assert set(np.unique(y_test)) == set(range(10))
    train_rows = {r.tobytes() for r in x_train}
    cal = np.concatenate([f["input"] for f in digits.calibration_feeds("mlp", n=64)])
    assert cal.shape == (64, 64) and all(r.tobytes() in train_rows for r in cal)
    ev = np.concatenate([f["input"] for f in digits.evaluation_feeds("cnn")])
    assert ev.shape == (450, 1, 8, 8) and ev.dtype == np.float32 and 0.0 <= ev.min() and ev.max() <= 1.0


def test_mlp_fp32_accuracy_and_self_evaluation(digits_mlp_path):
    model = onnxpress.load(digits_mlp_path)
    onnx.checker.check_model(onnxpress.io.load_proto(digits_mlp_path), full_check=True)
    assert str(model.graph.inputs[0].shape[0]) == "batch"
    scores = digits.evaluate(digits_mlp_path)
    assert scores["accuracy"] >= digits.FP32_MIN_ACCURACY
    assert scores["accuracy_drop"] == 0.0 and scores["agreement"] == 1.0 and scores["samples"] == 450
    info = common.build_info(digits_mlp_path)
    assert info["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert info["accuracy"] == pytest.approx(scores["accuracy"])


def test_mlp_onnx_matches_torch_module(digits_mlp_path):
    net = digits.module("mlp")
    x = torch.from_numpy(digits.evaluation_feeds("mlp")[0]["input"])
    report = compare_with_module(net, digits_mlp_path, (x,))
    assert report.passed and report.outputs[0].max_abs < 1e-4 and report.outputs[0].shape == (150, 10)


def test_evaluate_sees_a_damaged_model(digits_mlp_path, tmp_path):
    model = onnxpress.load(digits_mlp_path)
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        w = value.const_value.numpy()
        if w.ndim == 2:
            value.const_value = onnxpress.io.ir.Tensor((w + rng.normal(0, 3 * w.std(), w.shape)).astype(np.float32), name=value.name)
    scores = digits.evaluate(model, kind="mlp")
    assert scores["accuracy_drop"] > 0.05 and scores["agreement"] < 0.95


@pytest.mark.slow  # trains the MLP again
def test_training_is_seeded(digits_mlp_path):
    cached = digits.module("mlp").state_dict()
    fresh, _ = digits._train("mlp")
    for key, value in fresh.state_dict().items():
        np.testing.assert_allclose(value.numpy(), cached[key].numpy(), atol=1e-5)


@pytest.mark.slow
def test_cnn_fp32_accuracy_and_torch_match(digits_cnn_path):
    scores = digits.evaluate(digits_cnn_path)  # kind inferred from the rank-4 input
    assert scores["accuracy"] >= digits.FP32_MIN_ACCURACY and scores["agreement"] == 1.0
    assert digits.infer_kind(digits_cnn_path) == "cnn"
    x = torch.from_numpy(digits.evaluation_feeds("cnn")[0]["input"])
    assert compare_with_module(digits.module("cnn"), digits_cnn_path, (x,)).outputs[0].max_abs < 1e-4
    ops = {n.op_type for n in onnxpress.load(digits_cnn_path).graph}
    assert "Conv" in ops


def test_cli_eval_digits(digits_mlp_path, capsys):
    assert run(["eval", str(digits_mlp_path), "--task", "digits", "--json"]) == 0
    import json

    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] >= 0.95 and scores["agreement"] == 1.0
    assert run(["eval", str(digits_mlp_path), "--task", "lm"]) == 2
    assert "does not fit task 'lm'" in capsys.readouterr().err


def test_cli_export_builtin_with_eval(tmp_path, digits_mlp_path, capsys):
    out = tmp_path / "d.onnx"
    assert run(["export", "digits-mlp", "-o", str(out), "--pipeline", "simplify,fold", "--eval"]) == 0
    text = capsys.readouterr().out
    assert "vs the PyTorch module" in text and "accuracy_drop" in text
    assert digits.evaluate(out)["agreement"] == 1.0


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown digits model kind"):
        digits.build("rnn")


def test_static_int8_with_only_calibration_passes_on_held_out_real_digits(digits_mlp_path, tmp_path, capsys):
    """Issue 15: with only --calibration, the verdict is computed on held-out real samples (not generated inputs)."""
    import json

    rows = np.concatenate([f["input"] for f in digits.calibration_feeds("mlp", n=128)])
    np.savez(tmp_path / "calib.npz", input=rows)
    out = tmp_path / "q.onnx"
    code = run(["optimize", str(digits_mlp_path), "-o", str(out), "-p", "qdq(mode=static)", "--calibration", str(tmp_path / "calib.npz"),
                "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["samples"] == 32 and not report["validation"]["generated"]
    assert report["validation"]["metrics"]["cos"] >= 0.99
    held = set(report["data"]["split"]["evaluation_indices"])
    assert len(held) == 32 and not held & set(report["data"]["split"]["calibration_indices"])
    assert digits.evaluate(str(out))["accuracy_drop"] <= 0.01
