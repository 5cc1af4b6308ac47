"""Targets: pass defaults per target, ONNX Runtime Mobile (.ort, ops config, EP coverage) and CUDA checks.

No test needs a GPU: CUDA is tested through provider lists, installed-package lists and a probe result
given to ``cuda_status``, and through ``benchmarks/gpu_check.sh`` failing on this machine.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import init, mlp_model, text_model

import onnxpress
from onnxpress import runtime, targets
from onnxpress.errors import OnnxpressError, UsageError, ValidationError
from onnxpress.pass_infra import Pass
from onnxpress.pipeline import Pipeline
from onnxpress.registry import registry
from onnxpress.targets import export as mobile_export
from onnxpress.validate import Tolerance

REPO = Path(__file__).resolve().parent.parent
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def conv_model() -> ir.Model:
    """x[1,3,8,8] -> Conv 3x3 (4 channels) -> Relu -> MaxPool 2x2 -> y[1,4,4,4]."""
    rng = np.random.default_rng(0)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,3,8,8] x) => (float[1,4,4,4] y)
        <{init("w", rng.standard_normal((4, 3, 3, 3)))}, {init("b", rng.standard_normal(4))}>
        {{
            c = Conv<pads=[1,1,1,1]>(x, w, b)
            r = Relu(c)
            y = MaxPool<kernel_shape=[2,2], strides=[2,2]>(r)
        }}
        """
    )


def cumsum_model() -> ir.Model:
    """MatMul -> CumSum -> MatMul with fixed shapes: no mobile EP implements CumSum."""
    rng = np.random.default_rng(1)
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,8] x) => (float[2,4] y)
        <{init("w1", rng.standard_normal((8, 8)))}, {init("w2", rng.standard_normal((8, 4)))}, int64 axis = {{1}}>
        {{
            a = MatMul(x, w1)
            c = CumSum(a, axis)
            y = MatMul(c, w2)
        }}
        """
    )


def custom_op_model() -> ir.Model:
    return text_model(
        """
        <ir_version: 10, opset_import: ["" : 17, "custom.ops" : 1]>
        g (float[N,4] x) => (float[N,4] y)
        { y = custom.ops.Frobnicate(x) }
        """
    )


def _coverage(report, ep):
    return next(c for c in report.ep_coverage if c.ep == ep)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- targets and pass defaults --------------------------------------------------------------------
def test_every_target_default_names_a_real_option():
    passes = registry()
    for target in targets.TARGETS.values():
        for pass_name, overrides in target.pass_defaults.items():
            fields = {f.name for f in dataclasses.fields(passes[pass_name].Options)}
            for key, value in overrides.items():
                assert key in fields, f"{target.name}: {pass_name} has no option {key}"
                passes[pass_name](**{key: value})  # the value is valid for the option
                assert f"{pass_name}.{key}" in target.reasons, f"{target.name}: no reason given for {pass_name}.{key}"


def test_targets_take_their_pass_defaults_from_the_passes():
    for cls in registry().values():
        for target, options in cls.target_defaults.items():
            assert target in targets.TARGETS, f"{cls.name}: unknown target {target}"
            assert dict(targets.TARGETS[target].pass_defaults[cls.name]) == dict(options)
            assert set(cls.target_reasons.get(target, {})) == set(options), f"{cls.name}: reasons for {target}"
    assert dict(targets.TARGETS["cuda"].pass_defaults) == {"qdq": {"weight_type": "int8"}}
    assert targets.TARGETS["cpu"].pass_defaults == {} and targets.TARGETS["cpu"].reasons == {}
    assert list(targets.TARGETS["mobile"].reasons) == ["qdq.activation_type", "qdq.weight_type", "qdq.reduce_range", "qdq.smooth"]
    assert targets.TARGETS["cuda"].reasons["qdq.weight_type"].startswith("symmetric int8 weights (zero point 0)")


def test_a_pass_declaring_defaults_for_an_unknown_target_is_refused():
    class Tuned(Pass):
        name = "tuned"
        target_defaults = {"moblie": {"ratio": 0.5}}

        def call(self, model):
            return ir.passes.PassResult(model, False)

    with pytest.raises(RuntimeError, match="pass 'tuned' declares options for unknown target.s. moblie"):
        targets.collect_pass_options([Tuned])
    Tuned.target_defaults = {"mobile": {"ratio": 0.5}}
    Tuned.target_reasons = {"mobile": {"ratio": "fewer weights"}}
    collected = targets.collect_pass_options([Tuned])
    assert dict(collected["mobile"].defaults) == {"tuned": {"ratio": 0.5}} and dict(collected["mobile"].reasons) == {"tuned.ratio": "fewer weights"}
    assert collected["cuda"].defaults == {}


def test_providers_of_targets():
    assert {name: t.provider for name, t in targets.TARGETS.items()} == {"cpu": "cpu", "cuda": "cuda", "mobile": "cpu"}
    with pytest.raises(UsageError, match="unknown target 'tpu'"):
        targets.get_target("tpu")


def test_mobile_defaults_fill_qdq_options_and_user_options_win():
    pipe = targets.apply_target("simplify,qdq(per_channel=false,mode=weight,smooth=fixed)", "mobile")
    assert str(pipe) == "simplify,qdq(per_channel=false,mode=weight,smooth=fixed,activation_type=uint8,weight_type=int8,reduce_range=false)"
    qdq = pipe.passes[1].options
    assert (qdq.per_channel, qdq.mode, qdq.weight_type, qdq.activation_type, qdq.smooth) == (False, "weight", "int8", "uint8", "fixed")
    assert str(targets.apply_target("qdq", "mobile")) == "qdq(activation_type=uint8,weight_type=int8,reduce_range=false,smooth=off)"
    assert Pipeline.parse(str(pipe)) == pipe  # the effective pipeline prints back as text
    assert targets.apply_target("simplify,qdq", "cpu") == Pipeline.parse("simplify,qdq")
    assert str(targets.apply_target("qdq", "cuda")) == "qdq(weight_type=int8)"
    assert str(targets.apply_target("simplify,fold", "mobile")) == "simplify,fold"


def test_mobile_qdq_follows_nnapi_conventions():
    """qdq under --target mobile: uint8 activations, symmetric int8 weights (per channel), no SmoothQuant."""
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    model, report = onnxpress.optimize(mlp_model(), targets.apply_target("qdq", "mobile"), calibration=calibration, inputs=calibration[0])
    # x86 without VNNI runs u8 x s8 in int16 and saturates (ARM does not): cosine 0.993 here, 0.9995 with uint8 weights.
    assert report.validation.passed and report.validation.mean_cosine > 0.99
    consts = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if n.inputs[0].name in consts]
    acts = [n for n in dq if n.inputs[0].name not in consts]
    assert len(weights) == 2 and len(acts) == 2
    for n, channels in zip(weights, (16, 4)):
        assert consts[n.inputs[0].name].dtype == np.int8
        assert consts[n.inputs[1].name].shape == (channels,)  # one scale per output channel
        zero = consts[n.inputs[2].name]
        assert zero.dtype == np.int8 and not zero.any()  # symmetric
    for n in acts:  # per-tensor uint8 activations
        assert consts[n.inputs[2].name].dtype == np.uint8 and consts[n.inputs[1].name].size == 1
    assert not any(n.op_type == "Mul" for n in model.graph)  # no SmoothQuant
    mobile = targets.check_mobile(model, dims={"N": 1}, style="basic")
    nnapi = _coverage(mobile, "NNAPI")  # by op type; NNAPI would still run the per-channel MatMuls on CPU
    assert (nnapi.supported, nnapi.nodes, nnapi.partitions, nnapi.fallback_ops) == (10, 10, 1, [])
    assert mobile.validation.passed


# -- mobile: conversion ---------------------------------------------------------------------------
def test_export_mobile_writes_ort_config_and_report(tmp_path):
    out = tmp_path / "out.onnx"
    report = targets.export_mobile(mlp_model(), out, dims={"N": 2})
    assert _listing(tmp_path) == ["out.mobile.json", "out.ort", "out.required_operators.config"]  # no temp folder left
    assert report.files == {"ort": str(tmp_path / "out.ort"), "config": str(tmp_path / "out.required_operators.config"),
                            "report": str(tmp_path / "out.mobile.json")}
    # The .ort loads in onnxruntime and computes what the original computes.
    session = ort.InferenceSession(str(tmp_path / "out.ort"), providers=[CPU])
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    expected = runtime.run(runtime.make_session(mlp_model()), {"x": x})["y"]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert report.validation.passed and report.validation.outputs[0].max_abs < 1e-5
    # Runtime style: basic optimizations (MatMul+Add -> Gemm) plus ops the replayed optimizations may need.
    assert report.style == "runtime"
    assert report.required_ops == ["ai.onnx;13;Gemm", "ai.onnx;13;MatMul", "ai.onnx;14;Relu"]
    config = (tmp_path / "out.required_operators.config").read_text()
    assert "out.ort" in config and str(tmp_path) not in config and "/tmp" not in config.split("\n", 2)[1]
    assert targets.required_ops(tmp_path / "out.required_operators.config") == report.required_ops
    saved = json.loads((tmp_path / "out.mobile.json").read_text())
    assert saved["passed"] is True and saved["required_ops"] == report.required_ops
    assert [c["ep"] for c in saved["ep_coverage"]] == ["NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork", "XNNPACK"]


def test_mlp_with_fixed_shapes_is_fully_supported_by_nnapi_and_coreml():
    report = targets.check_mobile(mlp_model(), dims={"N": 1})
    rows = {c.ep: (c.supported, c.nodes, c.partitions, c.fallback_ops, c.suitability) for c in report.ep_coverage}
    assert rows["NNAPI"] == (3, 3, 1, [], "YES")  # Gemm (MatMul+Add), Relu, MatMul
    assert rows["CoreML MLProgram"] == (3, 3, 1, [], "YES")
    # XNNPACK fuses Relu only into Conv/pooling: Gemm | Relu on CPU | MatMul.
    assert rows["XNNPACK"] == (2, 3, 2, ["ai.onnx:Relu"], "n/a")
    assert report.dynamic_inputs == []
    assert report.rows()[0] == ("NNAPI", "3/3", "100%", "1", "-", "-", "YES")


def test_dynamic_batch_is_reported_with_the_fixed_shape_figures():
    report = targets.check_mobile(mlp_model())
    assert report.dynamic_inputs == ["x"]
    nnapi = _coverage(report, "NNAPI")
    assert (nnapi.supported, nnapi.dynamic_shape_nodes, nnapi.suitability) == (0, 3, "NO")
    assert (nnapi.fixed_supported, nnapi.fixed_partitions, nnapi.fixed_suitability) == (3, 1, "YES")
    assert report.rows()[0] == ("NNAPI", "0/3", "0%", "0", "3 node(s) for dynamic shapes", "3/3 in 1 (YES)", "NO")


def test_conv_model_coverage_and_xnnpack_fusion(tmp_path):
    report = targets.export_mobile(conv_model(), tmp_path / "conv.onnx")
    assert report.validation.passed and report.validation.outputs[0].max_abs < 1e-4
    assert report.required_ops == ["ai.onnx;11;Conv", "ai.onnx;12;MaxPool", "ai.onnx;14;Relu", "com.microsoft;1;FusedConv"]
    for ep in ("NNAPI", "CoreML MLProgram", "XNNPACK"):  # XNNPACK: Relu fused into the Conv
        c = _coverage(report, ep)
        assert (c.supported, c.nodes, c.partitions, c.fallback_ops) == (3, 3, 1, []), ep
    ort.InferenceSession(str(tmp_path / "conv.ort"), providers=[CPU])


def test_op_without_mobile_kernel_is_reported_as_fallback():
    report = targets.check_mobile(cumsum_model())
    assert report.validation.passed
    for ep in ("NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork", "XNNPACK"):
        c = _coverage(report, ep)
        assert c.fallback_ops == ["ai.onnx:CumSum"], ep
        assert (c.supported, c.nodes, c.partitions) == (2, 3, 2), ep
    assert _coverage(report, "NNAPI").suitability == "NO"  # ORT: 2 partitions need > 75% of the nodes


def test_fixed_style_bakes_cpu_fusions_in(tmp_path):
    (tmp_path / "out").mkdir()
    onnxpress.save(mlp_model(), tmp_path / "m.onnx")
    ort_path, config = targets.convert_to_ort(tmp_path / "m.onnx", tmp_path / "out", style="fixed")
    assert (ort_path.name, config.name) == ("m.ort", "m.required_operators.config")
    assert targets.required_ops(config) == ["ai.onnx;13;MatMul", "com.microsoft;1;FusedGemm"]
    assert _listing(tmp_path / "out") == ["m.ort", "m.required_operators.config"]
    report = targets.check_mobile(mlp_model(), dims={"N": 1}, style="fixed")
    assert _coverage(report, "NNAPI").fallback_ops == ["com.microsoft:FusedGemm"]
    # An explicit .ort path names both files.
    ort_path, config = targets.convert_to_ort(tmp_path / "m.onnx", tmp_path / "named.ort", style="basic")
    assert (ort_path.name, config.name) == ("named.ort", "named.required_operators.config")
    assert targets.required_ops(config) == ["ai.onnx;13;Gemm", "ai.onnx;13;MatMul", "ai.onnx;14;Relu"]


def test_runtime_style_failure_falls_back_to_fixed_with_a_note(monkeypatch):
    real = mobile_export._convert

    def convert(src, work, style, *args):
        if style == "runtime":
            raise OnnxpressError("ONNX Runtime Mobile cannot convert the model to ORT format: simulated")
        return real(src, work, style, *args)

    monkeypatch.setattr(mobile_export, "_convert", convert)
    report = targets.check_mobile(mlp_model())
    assert report.style == "fixed" and report.validation.passed
    assert report.notes and report.notes[0].startswith("runtime style failed (cannot convert the model to ORT format: simulated)")


def test_unconvertible_model_is_one_line_error_and_nothing_written(tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(OnnxpressError, match=r"cannot convert the model to ORT format: .*custom\.ops:Frobnicate") as info:
        targets.export_mobile(custom_op_model(), out)
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)
    assert _listing(tmp_path) == []


def _failing_ort_loads(monkeypatch, replay_only: bool):
    real = ort.InferenceSession

    def session(path_or_bytes, sess_options=None, *args, **kwargs):
        try:
            replay = sess_options.get_session_config_entry("session.enable_saved_runtime_optimizations") == "1"
        except Exception:  # no such entry
            replay = False
        if isinstance(path_or_bytes, str) and path_or_bytes.endswith(".ort") and (replay or not replay_only):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : simulated kernel missing")
        return real(path_or_bytes, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)


def test_ort_that_does_not_load_is_one_line_error_and_nothing_written(tmp_path, monkeypatch):
    _failing_ort_loads(monkeypatch, replay_only=False)
    with pytest.raises(OnnxpressError, match="^the converted .ort model does not load in onnxruntime: simulated kernel missing$"):
        targets.export_mobile(mlp_model(), tmp_path / "out.onnx")
    assert _listing(tmp_path) == []


def test_runtime_style_that_does_not_replay_falls_back_to_fixed(tmp_path, monkeypatch):
    """onnxruntime 1.32 writes runtime-style files for QDQ MiniLM that fail to load with the saved runtime
    optimizations replayed ("Not enough produced nodes in the runtime optimization record")."""
    _failing_ort_loads(monkeypatch, replay_only=True)
    report = targets.export_mobile(mlp_model(), tmp_path / "out.onnx")
    assert report.style == "fixed" and report.passed and report.replay_validation is None
    assert "does not load in onnxruntime with its saved runtime optimizations replayed: simulated" in report.notes[0]
    assert targets.required_ops(tmp_path / "out.required_operators.config") == ["ai.onnx;13;MatMul", "com.microsoft;1;FusedGemm"]


def test_runtime_style_is_validated_with_replay_too():
    report = targets.check_mobile(mlp_model())
    assert report.style == "runtime" and report.replay_validation is not None
    assert report.replay_validation.passed and report.replay_validation.outputs[0].max_abs < 1e-5
    assert report.to_dict()["replay_validation"]["passed"] is True
    assert targets.check_mobile(mlp_model(), style="basic").replay_validation is None


def test_mismatch_writes_nothing_unless_keep_failed(tmp_path):
    other = mlp_model(seed=1)  # same signature, other weights: the .ort cannot match it
    report = targets.export_mobile(mlp_model(), tmp_path / "out.onnx", reference=other)
    assert not report.passed and report.files == {} and _listing(tmp_path) == []
    assert report.validation.outputs[0].cosine < 0.9
    report = targets.export_mobile(mlp_model(), tmp_path / "out.onnx", reference=other, keep_failed=True)
    assert not report.passed and _listing(tmp_path) == ["out.mobile.json", "out.ort", "out.required_operators.config"]
    assert json.loads((tmp_path / "out.mobile.json").read_text())["passed"] is False


def test_lossy_reference_uses_the_given_tolerance(tmp_path):
    noisy = mlp_model()
    for value in noisy.graph.initializers.values():
        arr = value.const_value.numpy()
        value.const_value = ir.tensor(arr * 1.01, name=value.name)
    report = targets.check_mobile(noisy, reference=mlp_model(), tolerance=Tolerance(min_cosine=0.999))
    assert report.passed and 0.999 < report.validation.min_cosine < 1.0
    assert not targets.check_mobile(noisy, reference=mlp_model()).passed  # lossless tolerance by default


def test_mobile_paths():
    p = targets.mobile_paths("dir/model.v2.onnx")
    assert (str(p.ort), str(p.config), str(p.report)) == ("dir/model.v2.ort", "dir/model.v2.required_operators.config", "dir/model.v2.mobile.json")
    assert targets.mobile_paths("m.onnx", type_reduction=True).config.name == "m.required_operators_and_types.config"


def test_type_reduction_config(tmp_path):
    report = targets.export_mobile(mlp_model(), tmp_path / "out.onnx", type_reduction=True)
    assert _listing(tmp_path) == ["out.mobile.json", "out.ort", "out.required_operators_and_types.config"]
    text = (tmp_path / "out.required_operators_and_types.config").read_text()
    assert "float" in text and report.required_ops and all("{" in line for line in report.required_ops)


def test_unknown_style():
    with pytest.raises(UsageError, match="unknown ORT conversion style 'fast'"):
        targets.check_mobile(mlp_model(), style="fast")


# -- CUDA -----------------------------------------------------------------------------------------
def test_cuda_missing_onnxruntime_gpu():
    with pytest.raises(ValidationError) as info:
        targets.check_cuda(available=[CPU], packages=["onnxruntime 1.32.0"])
    text = str(info.value)
    assert "needs onnxruntime-gpu, which is not installed" in text and "offers CPUExecutionProvider" in text
    assert "pip install onnxruntime-gpu" in text and "\n" not in text


def test_cuda_both_packages_installed():
    with pytest.raises(ValidationError, match="both onnxruntime and onnxruntime-gpu are installed and the CPU-only build was imported"):
        targets.check_cuda(available=[CPU], packages=["onnxruntime 1.32.0", "onnxruntime-gpu 1.32.0"])


@pytest.mark.parametrize(
    "detail, env, expected",
    [
        ("Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file: "
         "No such file or directory", None, "cannot load libcublasLt.so.12"),
        ("CUDA failure 100: no CUDA-capable device is detected ; GPU=0", None, "no GPU is visible (no CUDA device found by the driver)"),
        ("", "", "no GPU is visible: CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ],
)
def test_cuda_installed_but_not_usable(monkeypatch, detail, env, expected):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    status = targets.cuda_status(available=[CUDA, CPU], packages=["onnxruntime-gpu 1.32.0"], probe=lambda: (False, detail))
    assert not status.ok and status.problem.startswith("onnxruntime-gpu 1.32.0 is installed but")
    assert expected in status.problem
    with pytest.raises(ValidationError, match="onnxruntime-gpu 1.32.0 is installed but"):
        targets.check_cuda(available=[CUDA, CPU], packages=["onnxruntime-gpu 1.32.0"], probe=lambda: (False, detail))


def test_cuda_usable_gives_the_resolve_providers_list(monkeypatch):
    assert targets.check_cuda(available=[CUDA, CPU], packages=["onnxruntime-gpu 1.32.0"], probe=lambda: (True, "")) == [CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert runtime.resolve_providers("cuda") == targets.check_cuda(probe=False) == [CUDA, CPU]
    assert targets.cuda_status(probe=False).to_dict()["ok"] is True


def test_one_message_for_a_missing_cuda_provider(monkeypatch):
    """runtime.resolve_providers and cuda_status say the same thing when CUDA is not compiled in."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    for packages in (["onnxruntime 1.32.0"], ["onnxruntime 1.32.0", "onnxruntime-gpu 1.32.0"]):
        monkeypatch.setattr(runtime, "installed_ort_packages", lambda packages=packages: packages)
        with pytest.raises(ValidationError) as info:
            runtime.resolve_providers("cuda")
        assert str(info.value) == targets.cuda_status().problem == runtime.cuda_provider_missing([CPU], packages)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has onnxruntime-gpu")
def test_cuda_on_this_machine_names_the_missing_package():
    status = targets.cuda_status()
    assert not status.ok and "onnxruntime-gpu" in status.problem
    with pytest.raises(ValidationError, match="onnxruntime-gpu"):
        runtime.resolve_providers("cuda")
    with pytest.raises(ValidationError, match="onnxruntime-gpu"):
        targets.ep_assignment(mlp_model(), "cuda")


def test_probe_reports_no_cuda_session_here():
    if CUDA in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    ok, _ = targets.probe_cuda()  # CUDA not compiled in: onnxruntime drops the provider, the session is CPU
    assert ok is False


def test_ep_assignment_counts_nodes_per_provider():
    assignment = targets.ep_assignment(mlp_model())
    assert list(assignment) == [CPU]
    assert sum(assignment[CPU].values()) == 3  # MatMul+Add fused into Gemm, Relu, MatMul
    assert assignment[CPU]["MatMul"] == 1


# -- benchmarks/gpu_check.sh ----------------------------------------------------------------------
def _gpu_check(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has onnxruntime-gpu")
def test_gpu_check_fails_clearly_without_cuda():
    result = _gpu_check()
    assert result.returncode == 1
    assert result.stderr.strip().startswith("gpu_check: FAIL: CUDA validation needs onnxruntime-gpu")
    assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    path = tmp_path / "m.onnx"
    onnxpress.save(mlp_model(), path)
    result = _gpu_check(str(path), "--dim", "N=4", "--runs", "20", "--dry-run-on-cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "DRY RUN" in out and "nodes on CPUExecutionProvider: 3/3" in out and "median" in out
    assert "gpu_check: OK (CPU standing in for CUDA)" in out
    assert _gpu_check(str(path), "--runs", "5").returncode == 2


# -- real models ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind, nodes", [("mlp", 5), ("cnn", 11)])
def test_digits_models_to_ort(tmp_path, kind, nodes):
    digits = pytest.importorskip("onnxpress.models.digits")
    src = digits.build(kind)
    feeds = digits.evaluation_feeds(kind)
    report = targets.export_mobile(str(src), tmp_path / f"{kind}.onnx", inputs=feeds, dims={"batch": 1})
    assert report.passed and report.validation.feeds == len(feeds)
    assert report.validation.outputs[0].max_abs < 1e-4
    scores = digits.evaluate(str(tmp_path / f"{kind}.ort"), kind=kind)
    assert scores["agreement"] == 1.0 and scores["accuracy"] >= digits.FP32_MIN_ACCURACY
    nnapi = _coverage(report, "NNAPI")
    assert (nnapi.supported, nnapi.nodes, nnapi.partitions) == (nodes, nodes, 1)
