"""Old-opset models through the passes: the pipeline's ``upgrade-opset`` step (onnx.version_converter, checked in
onnxruntime) and ``Pass.required_opset``. A user's opset-11 Paddle model failed in ``qdq(mode=static)`` with
onnxscript's "Target opset version 13 is not supported. Supported range: 18 to 25"."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper as oh
from onnx import numpy_helper as nh

import onnxpress
from onnxpress import opset
from onnxpress.cli import run as cli_run
from onnxpress.errors import PassFailedError
from onnxpress.pipeline import Pipeline

LOSSLESS = "strip-metadata,simplify,fold,cse,dedup,prune-unused"


def conv_matmul(version: int, *, ml: bool = False, ms: bool = False, upsample: bool = False) -> onnx.ModelProto:
    """A small CNN + MatMul head written in the op forms of ``version``: Clip bounds as attributes below 11,
    Squeeze axes as an attribute below 13, Upsample (removed in 10) when asked; optionally an ai.onnx.ml
    Scaler at the input and a com.microsoft FusedMatMul at the end (both must pass through conversions)."""
    rng = np.random.default_rng(version)
    inits = [
        nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
        nh.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "B"),
        nh.from_array((rng.standard_normal((8 * 4 * 4, 16)) * 0.1).astype(np.float32), "M"),
        nh.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "MB"),
        nh.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = []
    x = "x"
    if ml:
        nodes.append(oh.make_node("Scaler", ["x"], ["xs"], domain="ai.onnx.ml", offset=[0.5], scale=[2.0]))
        x = "xs"
    nodes.append(oh.make_node("Conv", [x, "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    if version < 11:
        nodes.append(oh.make_node("Clip", ["c"], ["r"], min=0.0, max=6.0))
    else:
        inits += [nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
        nodes.append(oh.make_node("Clip", ["c", "lo", "hi"], ["r"]))
    nodes.append(oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
    if upsample:
        inits.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(oh.make_node("Upsample", ["p", "scales"], ["u"], mode="nearest"))
        nodes.append(oh.make_node("MaxPool", ["u"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]))
        last = "p2"
    else:
        last = "p"
    nodes.append(oh.make_node("Reshape", [last, "shape"], ["f"]))
    nodes.append(oh.make_node("MatMul", ["f", "M"], ["m"]))
    nodes.append(oh.make_node("Add", ["m", "MB"], ["a"]))
    nodes.append(oh.make_node("Unsqueeze", ["a"], ["a3"], axes=[1]) if version < 13 else oh.make_node("Unsqueeze", ["a", "ax"], ["a3"]))
    if version >= 13:
        inits.append(nh.from_array(np.array([1], np.int64), "ax"))
    if ms:
        inits.append(nh.from_array((rng.standard_normal((16, 4)) * 0.1).astype(np.float32), "E"))
        nodes.append(oh.make_node("FusedMatMul", ["a3", "E"], ["y"], domain="com.microsoft", alpha=1.0))
        out_shape = [1, 1, 4]
    else:
        nodes.append(oh.make_node("Relu", ["a3"], ["y"]))
        out_shape = [1, 1, 16]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", 1, [1, 3, 8, 8])], [oh.make_tensor_value_info("y", 1, out_shape)], inits)
    imports = [oh.make_opsetid("", version)]
    if ml:
        imports.append(oh.make_opsetid("ai.onnx.ml", 1))
    if ms:
        imports.append(oh.make_opsetid("com.microsoft", 1))
    model = oh.make_model(graph, opset_imports=imports, ir_version=4 if version < 11 else 6)
    onnx.checker.check_model(model)
    return model


def image_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(n)]


def test_onnxscript_converter_refuses_old_opsets():
    """Why the pipeline uses onnx.version_converter: onnxscript's starts at 18 (the user's error)."""
    from onnxscript import version_converter

    model = ir.from_proto(conv_matmul(11))
    with pytest.raises(ValueError, match="Supported range: 18"):
        version_converter.convert_version(model, 13)


def test_opset11_static_qdq_upgrades_and_validates(tmp_path):
    calib = image_feeds(8)
    path = tmp_path / "m11.onnx"
    onnx.save(conv_matmul(11), path)
    model, report = onnxpress.optimize(path, "qdq(mode=static)", calibration=calib[:6], inputs=calib[7])
    assert [s.text for s in report.passes] == ["upgrade-opset(opset=13)", "qdq(mode=static)"]
    row = report.passes[0].details[0]
    assert (row["from_opset"], row["to_opset"]) == (11, 13)
    assert row["check"] == "checked on a calibration batch" and row["max_abs"] <= 1e-5
    assert report.passes[0].modified and report.pipeline == "qdq(mode=static)"
    assert model.opset_imports[""] == 13
    assert report.validation.passed and report.validation.min_cosine > 0.995
    assert sum(1 for n in model.graph if n.op_type == "QuantizeLinear") >= 2


def test_cli_static_qdq_on_opset11(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(conv_matmul(11), src)
    calib = np.concatenate([f["x"] for f in image_feeds(6)])[:, None]
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "inputs.npz", x=image_feeds(1, seed=9)[0]["x"])
    code = cli_run(["optimize", str(src), "-o", str(out), "-p", "qdq(mode=static)", "--calibration", str(tmp_path / "calib.npz"),
                    "--inputs", str(tmp_path / "inputs.npz")])
    assert code == 0
    assert onnx.load(out).opset_import[0].version == 13


@pytest.mark.parametrize("version", [7, 9, 13, 17])
@pytest.mark.parametrize("pipeline", [LOSSLESS, "qdq(mode=static)", "qdq(mode=weight)", "qdq(mode=int4,block_size=16)",
                                      "qdq(mode=int4,int4_format=qdq,block_size=16)", "prune(sparsity=0.3)", "factorize(ratio=0.75)"])
def test_every_pass_on_old_opsets(version, pipeline):
    calib = image_feeds(8, seed=version)
    model, report = onnxpress.optimize(conv_matmul(version), pipeline, calibration=calib[:6], inputs=calib[7])
    need = Pipeline.parse(pipeline).passes[-1].required_opset()
    upgraded = [s for s in report.passes if s.name == "upgrade-opset"]
    if need is not None and version < need:
        assert len(upgraded) == 1 and upgraded[0].details[0]["to_opset"] == need
        assert upgraded[0].details[0]["max_abs"] <= 1e-5
        assert model.opset_imports[""] == need
    else:
        assert not upgraded
        assert model.opset_imports[""] == version
    assert report.validation.passed, report.validation.outputs
    floor = 1.0 - 1e-6 if report.validation.tolerance.min_cosine is None else 0.99
    assert report.validation.min_cosine >= floor


def test_upsample_becomes_resize_and_is_counted():
    """Opset 9 -> 13 replaces Upsample (removed in 10) by Resize; the row counts it and the check passes."""
    calib = image_feeds(4)
    model, report = onnxpress.optimize(conv_matmul(9, upsample=True), "qdq(mode=weight)", calibration=calib, inputs=calib[0])
    row = report.passes[0].details[0]
    assert row["removed"].get("Upsample") == 1 and row["added"].get("Resize") == 1
    assert row["rewritten"].get("Clip") == 1 and row["rewritten"].get("Unsqueeze") == 1  # attributes became inputs
    assert "opset 9 -> 13" in row["summary"]
    assert not any(n.op_type == "Upsample" for n in model.graph)
    assert report.validation.passed


def test_other_domains_pass_through():
    """ai.onnx.ml and com.microsoft nodes and imports are kept as they are."""
    calib = image_feeds(6)
    model, report = onnxpress.optimize(conv_matmul(9, ml=True, ms=True), "qdq(mode=static)", calibration=calib[:5], inputs=calib[5])
    assert model.opset_imports == {"": 13, "ai.onnx.ml": 1, "com.microsoft": 1}
    ops = {(n.domain, n.op_type) for n in model.graph}
    assert ("ai.onnx.ml", "Scaler") in ops and ("com.microsoft", "FusedMatMul") in ops
    assert report.validation.passed and report.validation.min_cosine > 0.99


def test_user_written_upgrade_counts_and_round_trips():
    text = "upgrade-opset(opset=17),qdq(mode=weight)"
    assert str(Pipeline.parse(text)) == text
    calib = image_feeds(2)
    model, report = onnxpress.optimize(conv_matmul(11), text, inputs=calib[0])
    assert [s.text for s in report.passes] == ["upgrade-opset(opset=17)", "qdq(mode=weight)"]
    assert model.opset_imports[""] == 17 and report.validation.passed


def test_upgrade_is_a_no_op_at_or_above_target():
    model, report = onnxpress.optimize(conv_matmul(17), "upgrade-opset(opset=13)", inputs=image_feeds(1)[0])
    assert not report.passes[0].modified and report.passes[0].details == [{"layer": "(model)", "skipped": "already at opset 17"}]
    assert model.opset_imports[""] == 17


def test_lossy_conversion_fails_naming_the_op(monkeypatch):
    """A converter result that computes something else is refused in one line that names what it rewrote."""
    real = onnx.version_converter.convert_version

    def broken(proto, target):
        out = real(proto, target)
        for node in out.graph.node:
            if node.op_type == "Clip":  # the converter's Clip-11 form, with its upper bound lowered to 0.5
                out.graph.initializer.append(nh.from_array(np.array(0.5, np.float32), "broken_max"))
                node.input[2] = "broken_max"
        return out

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    with pytest.raises(PassFailedError) as info:
        onnxpress.optimize(conv_matmul(9), "qdq(mode=weight)", inputs=image_feeds(1)[0])
    message = str(info.value)
    assert "\n" not in message
    assert "upgrade-opset(opset=13)" in message and "not lossless" in message and "Clip" in message


def test_bad_target_is_a_usage_error():
    from onnxpress.errors import UsageError

    with pytest.raises(UsageError, match="opset must be between 7"):
        Pipeline.parse(f"upgrade-opset(opset={opset.newest_opset() + 1})")
