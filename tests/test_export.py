"""PyTorch export: dynamo first, TorchScript fallback, one-paragraph errors with a hint, dynamic axes by name."""

import importlib
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.cli import run  # noqa: E402
from onnxpress.errors import OnnxpressError, UsageError  # noqa: E402
from onnxpress.export import ExportFallbackWarning, compare_with_module, describe_failure, export  # noqa: E402
from onnxpress.validate import Tolerance  # noqa: E402

# the module, even if onnxpress re-exports the function under the same name
export_mod = importlib.import_module("onnxpress.export")


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, mask):
        return self.drop(self.proj(x)) * mask.unsqueeze(-1)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


def _inputs(batch=2, seq=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, seq, 8, generator=g), torch.ones(batch, seq)


@pytest.fixture(scope="module")
def masked_export():
    module = Masked().train()
    model = export(module, _inputs(), output_names=["y"], dynamic_axes_by_name={"x": ["batch", "seq"], "mask": {0: "batch", 1: "seq"}})
    return module, model


def test_dynamo_export_names_dims_and_matches_torch(masked_export):
    module, model = masked_export
    assert isinstance(model, ir.Model)
    assert [v.name for v in model.graph.inputs] == ["x", "mask"]  # forward's parameter names
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "seq", "8"]
    assert [str(d) for d in model.graph.inputs[1].shape] == ["batch", "seq"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.opset_imports[""] == 18
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    # other batch and sequence sizes than the example; dropout is off (eval mode) in the export
    report = compare_with_module(module, model, _inputs(5, 7), Tolerance(atol=1e-5, rtol=1e-5))
    assert report.passed, report.outputs
    assert report.outputs[0].shape == (5, 7, 4)
    assert report.outputs[0].max_abs < 1e-5


def test_export_restores_training_mode_and_owns_weights(masked_export):
    module, model = masked_export
    assert module.training  # restored after export
    weights = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    with torch.no_grad():
        module.proj.weight.add_(1.0)
    try:
        after = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        assert all(np.array_equal(weights[k], after[k]) for k in weights)
    finally:
        with torch.no_grad():
            module.proj.weight.sub_(1.0)


def test_export_goes_straight_into_a_pipeline(masked_export):
    _, model = masked_export
    out, report = onnxpress.optimize(model, "simplify,fold,dedup", inputs={"x": np.ones((2, 3, 8), np.float32), "mask": np.ones((2, 3), np.float32)})
    assert report.passed
    assert report.validation.outputs[0].max_abs <= 1e-5


def test_fallback_to_torchscript_warns_and_works(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(export_mod, "_export_dynamo", broken)
    module = Masked()
    with pytest.warns(ExportFallbackWarning, match="simulated dynamo failure.*TorchScript"):
        model = export(module, _inputs(), dynamic_axes_by_name={"x": ["batch", "seq"], "mask": ["batch", "seq"]})
    assert [d for d in model.graph.inputs[0].shape][:2] == [ir.SymbolicDim("batch"), ir.SymbolicDim("seq")]
    assert compare_with_module(module, model, _inputs(3, 5)).passed


def test_no_fallback_raises_with_the_dynamo_reason(monkeypatch):
    monkeypatch.setattr(export_mod, "_export_dynamo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(OnnxpressError, match="dynamo exporter .*boom.*fallback disabled"):
        export(Masked(), _inputs(), fallback=False)


def test_data_dependent_control_flow_fails_with_hint_and_no_silent_trace():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportFallbackWarning)
        with pytest.raises(OnnxpressError) as info:
            export(DataDependent(), torch.randn(3, 3))
    text = str(info.value)
    assert "\n" not in text
    assert "dynamo exporter" in text and "TorchScript exporter also failed" in text
    assert "data-dependent control flow" in text
    assert "test_export.py:" in text  # where: the line of the branch
    assert "torch.where" in text


def test_unsupported_operator_names_the_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportFallbackWarning)
        with pytest.raises(OnnxpressError) as info:
            export(Unsupported(), torch.randn(3, 3))
    text = str(info.value)
    assert "Hint: operator aten.linalg_eig" in text
    assert "aten::linalg_eigvals" in text  # the TorchScript exporter's reason


def test_describe_failure_parses_exporter_messages():
    exc = RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 18 is not supported")
    d = describe_failure(exc)
    assert d["op"] == "aten::foo" and d["kind"] == "unsupported operator"
    assert describe_failure(ValueError(""))["summary"] == "ValueError"


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="unknown input 'nope'"):
        export(Masked(), _inputs(), dynamic_axes_by_name={"nope": [0]})
    with pytest.raises(UsageError, match="axis 3 is out of range"):
        export(Masked(), _inputs(), dynamic_axes_by_name={"mask": {3: "b"}})
    with pytest.raises(UsageError, match="torch.nn.Module"):
        export(lambda x: x, _inputs())
    with pytest.raises(UsageError, match="3 input name"):
        export(Masked(), _inputs(), input_names=["a"] * 3)


FACTORY = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, features):
        return torch.relu(self.lin(features))

def make():
    return Net(), (torch.randn(4, 6),), {"output_names": ["out"], "dynamic_axes_by_name": {"features": ["batch"]}}

def broken():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real
    return Bad(), (torch.randn(3, 3),)
'''


def test_cli_export_module_with_pipeline(tmp_path, capsys):
    (tmp_path / "factory.py").write_text(FACTORY)
    out = tmp_path / "net.onnx"
    assert run(["export", "--module", f"{tmp_path / 'factory.py'}:make", "-o", str(out), "--pipeline", "simplify,fold"]) == 0
    text = capsys.readouterr().out
    assert "vs the PyTorch module" in text and "Passes" in text and "written" in text
    model = onnxpress.load(out)
    assert [v.name for v in model.graph.inputs] == ["features"]
    assert str(model.graph.inputs[0].shape[0]) == "batch"
    assert model.metadata_props["onnxpress.pipeline"] == "simplify,fold"


def test_cli_export_failure_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "factory.py").write_text(FACTORY)
    out = tmp_path / "bad.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = run(["export", "--module", f"{tmp_path / 'factory.py'}:broken", "-o", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxpress: error: cannot export Bad to ONNX") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["factory.py"]  # no partial file


def test_cli_export_usage_errors(tmp_path, capsys):
    assert run(["export", "-o", str(tmp_path / "x.onnx")]) == 2
    assert run(["export", "resnet", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "unknown builtin model 'resnet'" in capsys.readouterr().err
    assert run(["export", "--module", "no_such_module_xyz:make", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err
