"""Sparse storage of initializers, applied when a model is written (``onnxpress.save``).

onnx-ir holds no ``graph.sparse_initializer`` (it drops them on a round trip), so a model in memory is always
dense. The ``sparsify`` pass therefore only *plans*: it records which initializers to store sparse, and with
which options, in the model's ``metadata_props`` under ``onnxpress.sparse_storage`` (JSON). Model-level
metadata survives ``ir.to_proto``/``from_proto``, copies and ``strip-metadata``; validation never reads it.
``onnxpress.save`` re-checks the plan on the tensors as they are then (a pass after ``sparsify`` may have
changed or removed one: a tensor that is gone, no longer mostly zero, or no longer smaller sparse is written
dense) and writes the rest as COO ``sparse_initializer`` entries; ``io.model_bytes`` counts the same.
The saved file keeps the entry, so loading it (which densifies) and saving it again stores it sparse again.

The encoding is pure numpy. An ONNX ``SparseTensorProto`` holds the non-zero ``values`` [NNZ] and their
``indices``: linearized positions [NNZ] or coordinates [NNZ, rank], ascending. For a 2-D weight the linear
form is the smaller one unless the coordinates fit a type of less than half the width (e.g. a [200, 200]
weight: linear indices need int32, coordinates int8 x 2). Index types, measured: onnxruntime 1.32 loads
int8, int16, int32 and int64 indices (and refuses unsigned ones); the onnx checker accepts only int64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxpress.errors import OnnxpressError

PLAN_KEY = "onnxpress.sparse_storage"

# Signed integer types, narrowest first. onnxruntime 1.32 reads all four as sparse indices; unsigned types
# are refused at load ("graph.cc ... sparse initializer" error); the onnx checker wants INT64 only.
INDEX_TYPES: tuple[np.dtype, ...] = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64))
INDEX_CHOICES = {"narrow": INDEX_TYPES, "int64": (np.dtype(np.int64),)}


# =====================================================================================================
# Pure encoding (numpy only)
# =====================================================================================================
def narrowest_index_type(max_index: int, allowed: tuple[np.dtype, ...] = INDEX_TYPES) -> np.dtype:
    """The narrowest of ``allowed`` (ordered narrow to wide) that holds 0..max_index."""
    for dtype in allowed:
        if max_index <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"index {max_index} does not fit any of {[d.name for d in allowed]}")


@dataclasses.dataclass(frozen=True)
class Coo:
    values: np.ndarray  # [NNZ], the tensor's dtype
    indices: np.ndarray  # [NNZ] linearized or [NNZ, rank] coordinates, ascending
    shape: tuple[int, ...]

    @property
    def layout(self) -> str:
        return "linear" if self.indices.ndim == 1 else "coordinates"

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes)


def coo_encode(array: np.ndarray, allowed: tuple[np.dtype, ...] = INDEX_TYPES) -> Coo:
    """COO form of ``array`` with the smaller of linear and coordinate indices (linear on ties)."""
    array = np.asarray(array)
    flat = array.reshape(-1)
    linear = np.flatnonzero(flat)
    values = flat[linear]
    shape = tuple(int(d) for d in array.shape)
    lin_type = narrowest_index_type(max(array.size - 1, 0), allowed)
    best = Coo(values, linear.astype(lin_type), shape)
    if array.ndim >= 2:
        coord_type = narrowest_index_type(max(max(shape) - 1, 0), allowed)
        if array.ndim * coord_type.itemsize < lin_type.itemsize:
            coords = np.stack(np.unravel_index(linear, shape), axis=1).astype(coord_type)
            best = Coo(values, coords, shape)
    return best


def coo_decode(values: np.ndarray, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense array of a COO tensor (either index layout)."""
    values = np.asarray(values)
    indices = np.asarray(indices).astype(np.int64)
    dense = np.zeros(shape, dtype=values.dtype)
    if indices.ndim == 2:
        dense[tuple(indices.T)] = values
    else:
        dense.reshape(-1)[indices] = values
    return dense


def floor_bytes(array: np.ndarray, allowed: tuple[np.dtype, ...] = INDEX_TYPES) -> int:
    """The COO floor: NNZ x (value bytes + bytes of the narrowest linear index)."""
    array = np.asarray(array)
    nnz = int(np.count_nonzero(array))
    return nnz * (array.dtype.itemsize + narrowest_index_type(max(array.size - 1, 0), allowed).itemsize)


def sparse_proto(name: str, coo: Coo) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(coo.values, name)
    indices = numpy_helper.from_array(coo.indices, "")
    return onnx.helper.make_sparse_tensor(values, indices, list(coo.shape))


# =====================================================================================================
# The plan (model metadata) and the decision for one tensor
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class StoragePlan:
    """Which main-graph initializers to store sparse, and the rule they are re-checked against at save."""

    initializers: tuple[str, ...]
    threshold: float = 0.5
    indices: str = "narrow"
    min_size: int = 64

    def to_text(self) -> str:
        return json.dumps({"format": 1, "threshold": self.threshold, "indices": self.indices, "min_size": self.min_size,
                           "initializers": list(self.initializers)}, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> StoragePlan:
        """The plan in ``text``; a value onnxpress did not write is a one-line error (not a silent dense save)."""
        try:
            raw = json.loads(text)
            plan = cls(tuple(raw["initializers"]), float(raw["threshold"]), raw["indices"], int(raw["min_size"]))
            ok = (raw.get("format") == 1 and all(isinstance(n, str) for n in plan.initializers)
                  and plan.indices in INDEX_CHOICES and 0.0 <= plan.threshold < 1.0 and plan.min_size >= 0)
        except (ValueError, TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise OnnxpressError(f"model metadata '{PLAN_KEY}' is not a sparse storage plan onnxpress wrote; remove it or run sparsify again")
        return plan

    @property
    def allowed(self) -> tuple[np.dtype, ...]:
        return INDEX_CHOICES[self.indices]


def read_plan(model: ir.Model) -> StoragePlan | None:
    text = model.metadata_props.get(PLAN_KEY)
    return None if text is None else StoragePlan.from_text(text)


def write_plan(model: ir.Model, plan: StoragePlan | None) -> bool:
    """Record ``plan`` (None or no initializers: remove it); returns whether the metadata changed."""
    old = model.metadata_props.get(PLAN_KEY)
    new = plan.to_text() if plan is not None and plan.initializers else None
    if new is None:
        model.metadata_props.pop(PLAN_KEY, None)
    else:
        model.metadata_props[PLAN_KEY] = new
    return old != new


@dataclasses.dataclass(frozen=True)
class Stored:
    """One initializer stored sparse: its COO form, the SparseTensorProto written, and the report row."""

    name: str
    coo: Coo
    proto: onnx.SparseTensorProto
    dense_nbytes: int  # the in-memory tensor's bytes (the stored values + indices are coo.nbytes)
    row: dict[str, Any]


def decide(value: ir.Value, graph_inputs: set[str], threshold: float, min_size: int,
           allowed: tuple[np.dtype, ...]) -> tuple[dict[str, Any] | None, Stored | None]:
    """(report row or None when not worth a row, Stored when the tensor is stored sparse) for one initializer.

    Sparse when: at least ``min_size`` elements (and at least one), a numeric dtype, more than ``threshold``
    zeros, not also a graph input (a caller can override it at run time) and the sparse proto is smaller
    than the dense one."""
    tensor = value.const_value
    if tensor is None or tensor.size < max(min_size, 1) or tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None, None
    try:
        array = tensor.numpy()
    except Exception:  # a type numpy cannot hold (e.g. 4-bit packed types)
        return None, None
    if array.dtype.kind not in "fiub" or array.dtype.itemsize == 0 or array.size == 0:
        return None, None
    zeros = 1.0 - np.count_nonzero(array) / array.size
    if zeros <= threshold:
        return None, None
    name = value.name or ""
    row: dict[str, Any] = {"initializer": name, "shape": list(array.shape), "dtype": str(array.dtype), "zero_fraction": round(zeros, 6)}
    if name in graph_inputs:
        return {**row, "skipped": "also a graph input (can be overridden at run time)"}, None
    coo = coo_encode(array, allowed)
    sparse = sparse_proto(name, coo)
    dense_bytes, sparse_bytes = ir.serde.serialize_tensor(tensor).ByteSize(), sparse.ByteSize()
    row.update({
        "nnz": int(coo.values.size), "layout": coo.layout, "index_type": str(coo.indices.dtype),
        "bytes_before": dense_bytes, "bytes_after": sparse_bytes, "floor_bytes": floor_bytes(array, allowed),
    })
    if sparse_bytes >= dense_bytes:
        return {**row, "skipped": "the sparse form is not smaller"}, None
    return row, Stored(name, coo, sparse, int(array.nbytes), row)


def graph_input_names(model: ir.Model) -> set[str]:
    return {v.name for v in model.graph.inputs if v.name}


def stored_initializers(model: ir.Model) -> list[Stored]:
    """The plan re-checked on the model as it is now: the initializers a save writes sparse, in graph order."""
    plan = read_plan(model)
    if plan is None:
        return []
    wanted = set(plan.initializers)
    inputs = graph_input_names(model)
    out = []
    for name, value in model.graph.initializers.items():
        if name in wanted:
            _, stored = decide(value, inputs, plan.threshold, plan.min_size, plan.allowed)
            if stored is not None:
                out.append(stored)
    return out


@contextlib.contextmanager
def detached(model: ir.Model, stored: Sequence[Stored]) -> Iterator[None]:
    """The ``stored`` initializers taken out of the main graph for the block (a save writes the rest as usual
    and adds them as sparse initializers), then put back in their original order. Their Values stay in place
    as node inputs, so the serialized graph still names them."""
    if not stored:
        yield
        return
    initializers = model.graph.initializers
    order = list(initializers.values())
    for s in stored:
        del initializers[s.name]
    try:
        yield
    finally:
        for name in list(initializers):
            del initializers[name]
        for value in order:
            initializers.add(value)


def add_sparse_initializers(proto: onnx.ModelProto, stored: Sequence[Stored]) -> onnx.ModelProto:
    """Append the ``stored`` tensors to ``proto``'s ``graph.sparse_initializer`` (in place; see ``detached``)."""
    proto.graph.sparse_initializer.extend(s.proto for s in stored)
    return proto
