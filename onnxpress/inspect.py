"""``onnxpress inspect``: what a model holds, read without loading external tensor data."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxpress.io import load


def _shape(value: ir.Value) -> list[Any] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def summarize(path: str | os.PathLike, top: int = 10) -> dict[str, Any]:
    model = load(path)
    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain + '::' if node.domain else ''}{node.op_type}"] += 1
    by_dtype: dict[str, dict[str, int]] = {}
    sizes = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        key = str(tensor.dtype).replace("DataType.", "")
        row = by_dtype.setdefault(key, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += tensor.size
        row["bytes"] += tensor.nbytes
        sizes.append({"name": value.name, "dtype": key, "shape": list(tensor.shape.dims), "bytes": tensor.nbytes})
    sizes.sort(key=lambda r: -r["bytes"])
    file_bytes = Path(path).stat().st_size
    data_files = {t.const_value.location for t in model.graph.initializers.values() if isinstance(t.const_value, ir.ExternalTensor)}
    for location in data_files:
        file_bytes += (Path(path).parent / location).stat().st_size
    return {
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "graph": model.graph.name or "",
        "doc_string": model.doc_string or "",
        "nodes": sum(ops.values()),
        "parameters": sum(r["parameters"] for r in by_dtype.values()),
        "initializer_bytes": sum(r["bytes"] for r in by_dtype.values()),
        "file_bytes": file_bytes,
        "metadata": dict(model.metadata_props),
        "inputs": [{"name": v.name, "dtype": str(v.dtype).replace("DataType.", "") if v.dtype else "?", "shape": _shape(v)} for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [{"name": v.name, "dtype": str(v.dtype).replace("DataType.", "") if v.dtype else "?", "shape": _shape(v)} for v in model.graph.outputs],
        "ops": dict(ops.most_common()),
        "by_dtype": by_dtype,
        "largest": sizes[:top],
    }
