"""The model the atomic-write tests save: a MatMul chain whose weight i holds only ``seed * 1000 + i``,
so any mix of two saves (old data file with a new model file, half-written tensors) is visible."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def seeded_chain(seed: float, n: int = 32, layers: int = 2) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, n]))
    nodes, inits, cur = [], [], x
    for i in range(layers):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor(np.full((n, n), seed * 1000 + i, dtype=np.float32), name=f"w{i}"))
        inits.append(w)
        node = ir.node("MatMul", [cur, w], name=f"mm{i}")
        nodes.append(node)
        cur = node.outputs[0]
    cur.name = "y"
    cur.type, cur.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, n])
    return ir.Model(ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="g"), ir_version=10)
