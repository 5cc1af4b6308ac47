"""The CLI's contract: one-line errors, exit codes 2 (usage) / 1 (failure), no partial output, input untouched."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from graphs import mlp_model, redundant_model

import onnxpress
from onnxpress.cli import run


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnxpress.save(redundant_model(), path)
    return path


def test_optimize_writes_output_report_and_metadata(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    before = _sha(model_path)
    assert run(["optimize", str(model_path), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert _sha(model_path) == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["passed"] is True
    assert [p["name"] for p in report["passes"]] == onnxpress.api.default_pipeline().split(",")
    model = onnxpress.load(out)
    assert model.metadata_props["onnxpress.pipeline"] == report["pipeline"]
    text = capsys.readouterr().out
    assert "Passes" in text and "Validation" in text and "passed" in text


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["optimize", "{in}", "-o", "{out}", "-p", "nosuch"], 2, "unknown pass 'nosuch'"),
        (["optimize", "{in}", "-o", "{in}"], 2, "output is the input file"),
        (["optimize", "{in}", "-o", "/nonexistent-dir/x.onnx"], 2, "output folder does not exist"),
        (["optimize", "{missing}", "-o", "{out}"], 2, "no such file"),
        (["optimize", "{in}", "-o", "{out}", "--dim", "batch"], 2, "--dim expects NAME=VALUE"),
        (["optimize", "{junk}", "-o", "{out}"], 1, "not a valid ONNX model"),
        (["optimize", "{in}"], 2, "Missing option '-o'"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_errors_are_one_line_without_output(tmp_path, model_path, capsys, args, code, message):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 50)
    fmt = {"in": str(model_path), "out": str(tmp_path / "out.onnx"), "missing": str(tmp_path / "missing.onnx"), "junk": str(junk)}
    before = _sha(model_path)
    assert run([a.format(**fmt) for a in args]) == code
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    assert _sha(model_path) == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_failed_validation_writes_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(), path)
    out = tmp_path / "out.onnx"
    # a pipeline that changes the numbers: inject a broken pass
    import onnx_ir as ir

    from onnxpress.pass_infra import Pass
    from onnxpress.registry import registry

    class Breaker(Pass):
        """Test only: scales the first weight, so validation must fail and nothing may be written."""

        name = "breaker"

        def call(self, model):
            w = next(iter(model.graph.initializers.values()))
            w.const_value = ir.tensor(w.const_value.numpy() * 2, name=w.name)
            return ir.passes.PassResult(model, True)

    monkeypatch.setitem(registry(), "breaker", Breaker)
    assert run(["optimize", str(path), "-o", str(out), "-p", "breaker"]) == 1
    err = capsys.readouterr().err
    assert "validation failed" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert run(["optimize", str(path), "-o", str(out), "-p", "breaker", "--keep-failed"]) == 1
    assert out.exists()


def test_validate_and_inspect_and_passes(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    assert run(["optimize", str(model_path), "-o", str(out)]) == 0
    capsys.readouterr()
    assert run(["validate", str(model_path), str(out)]) == 0
    assert "passed" in capsys.readouterr().out
    assert run(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["MatMul"] == 1 and info["metadata"]["onnxpress.pipeline"]
    assert run(["passes"]) == 0
    listing = capsys.readouterr().out
    for name in ("simplify", "fold", "dedup", "cse", "prune-unused", "max_input"):
        assert name in listing


def test_console_script_entry_point(tmp_path, model_path):
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "-p", "fold(max_input=1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("onnxpress: error: pipeline text")
    assert "Traceback" not in proc.stderr


def test_target_mobile_writes_ort_config_and_report(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(), src)
    out = tmp_path / "out.onnx"
    assert run(["optimize", str(src), "-o", str(out), "--target", "mobile", "--dim", "N=1", "--report", str(tmp_path / "r.json")]) == 0
    for suffix in (".onnx", ".ort", ".required_operators.config", ".mobile.json"):
        assert (tmp_path / f"out{suffix}").exists(), suffix
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mobile"]["passed"] is True
    nnapi = next(c for c in report["mobile"]["ep_coverage"] if c["ep"] == "NNAPI")
    assert nnapi["supported"] == nnapi["nodes"] == 3
    assert "MatMul" in (tmp_path / "out.required_operators.config").read_text()


def test_target_cuda_without_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(), src)
    assert run(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--target", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxpress: error:") and "CUDA" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_budget_cli_meets_budget_and_writes_pipeline(tmp_path, capsys):
    from onnxpress.validate import Tolerance

    src = tmp_path / "in.onnx"
    model = mlp_model(k=32, h=64, n=16)
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"  # the budget search names layers in its pipeline text by node name
    onnxpress.save(model, src)
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "--budget", "cos>=0.99", "--plot", str(tmp_path / "p.png"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    model = onnxpress.load(out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert model.metadata_props["onnxpress.pipeline"] == report["pipeline"]
    assert report["bytes_after"] < report["bytes_before"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    check = onnxpress.validate(str(src), str(out), dims={"N": 16}, tolerance=Tolerance(min_cosine=0.98))
    assert check.passed


def test_optimize_writes_sparsified_model(tmp_path):
    import numpy as np

    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(k=32, h=64, n=16), src)
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "-p", "prune(sparsity=0.8,min_size=16),sparsify(min_size=16)", "--min-cosine", "0.3"])
    assert code == 0
    proto = __import__("onnx").load(str(out))
    assert len(proto.graph.sparse_initializer) >= 1
    dense = onnxpress.load(out).graph.initializers["w1"].const_value.numpy()
    assert np.mean(dense == 0) >= 0.8


def test_budget_on_torchscript_names_prints_its_pipeline_literally(tmp_path, capsys, monkeypatch):
    """Issue 16: a chosen pipeline holding include=[/m/...] ended every --budget run in a MarkupError."""
    monkeypatch.setenv("COLUMNS", "4000")  # wide enough that no table cell wraps: the texts are compared whole
    src = tmp_path / "in.onnx"
    model = mlp_model(k=32, h=64, n=16)
    for i, node in enumerate(model.graph):
        node.name = f"/m/encoder/layer.{i}/[bold]MatMul"
    onnxpress.save(model, src)
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "--budget", "cos>=0.99", "--report", str(tmp_path / "r.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    pipeline = json.loads((tmp_path / "r.json").read_text())["pipeline"]
    assert "/m/encoder/layer." in pipeline and pipeline in printed.out
    assert "[bold]MatMul" in printed.out
