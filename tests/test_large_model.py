"""Models over 2 GB: external data in, lossless pipeline, external data out, validated in onnxruntime."""

import os

import numpy as np
import onnx_ir as ir
import pytest

from onnxpress.cli import run


def transformer_shaped(n: int, layers: int) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", n]))
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], x
    for i in range(layers):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor(rng.standard_normal((n, n), dtype=np.float32) * np.float32(n**-0.5), name=f"w{i}"))
        inits.append(w)
        mm = ir.node("MatMul", [cur, w], name=f"mm{i}")
        act = ir.node("Relu", [mm.outputs[0]], name=f"relu{i}")
        nodes += [mm, act]
        cur = act.outputs[0]
    cur.name = "y"
    graph = ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    return ir.Model(graph, ir_version=10)


@pytest.mark.slow
def test_model_over_2gb_round_trips_through_optimize(tmp_path):
    src = tmp_path / "big.onnx"
    ir.save(transformer_shaped(8192, 9), src, external_data="big.onnx.data")  # 2.4 GB of weights
    assert os.path.getsize(tmp_path / "big.onnx.data") > 2**31
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    assert run(["optimize", str(src), "-o", str(out), "--dim", "batch=2"]) == 0
    assert os.path.getsize(out.parent / "big.onnx.data") == os.path.getsize(tmp_path / "big.onnx.data")
    assert os.path.getsize(out) < 10_000
    assert run(["validate", str(src), str(out), "--dim", "batch=2", "--atol", "0", "--rtol", "0"]) == 0


def test_external_data_output_for_small_model(tmp_path):
    src = tmp_path / "m.onnx"
    ir.save(transformer_shaped(64, 2), src, external_data="m.onnx.data", size_threshold_bytes=0)
    out = tmp_path / "o.onnx"
    assert run(["optimize", str(src), "-o", str(out)]) == 0
    assert (tmp_path / "o.onnx.data").exists()  # came with external data -> keeps it
    out2 = tmp_path / "o2.onnx"
    assert run(["optimize", str(src), "-o", str(out2), "--no-external-data"]) == 0
    assert not (tmp_path / "o2.onnx.data").exists()
