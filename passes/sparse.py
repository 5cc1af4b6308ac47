"""The ``sparsify`` pass: store mostly-zero initializers as ONNX sparse initializers (COO).

The encoding (index layout, index type, sizes) is pure numpy at the top; the proto rewrite is below.

An ONNX ``SparseTensorProto`` holds the non-zero ``values`` [NNZ] and their ``indices``: either linearized
positions [NNZ] or coordinates [NNZ, rank], ascending. For a 2-D weight the linear form is the smaller one
unless the coordinates fit a type of less than half the width (e.g. a [200, 200] weight: linear indices
need int32, coordinates int8 x 2). Index types, measured: onnxruntime 1.32 loads int8, int16, int32 and
int64 indices (and refuses unsigned ones); the onnx checker accepts only int64. ``indices=narrow`` (default)
uses the narrowest signed type that holds the indices, ``indices=int64`` what the checker accepts.

onnx-ir drops ``graph.sparse_initializer`` when a model goes through it, so this pass runs on the
serialized model, after every IR pass (``proto_stage``). Loading such a model with ``onnxpress.load``
densifies it again.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxpress.errors import UsageError
from onnxpress.pass_infra import GraphCounts, Pass, PassStats, option

# Signed integer types, narrowest first. onnxruntime 1.32 reads all four as sparse indices; unsigned types
# are refused at load ("graph.cc ... sparse initializer" error); the onnx checker wants INT64 only.
INDEX_TYPES: tuple[np.dtype, ...] = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64))


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
# The pass
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class SparsifyOptions:
    threshold: float = option(0.5, "store an initializer sparse when more than this share of its values is zero (and the sparse form is smaller)")
    indices: Literal["narrow", "int64"] = option("narrow", "index type: narrow (int8/int16/int32, read by onnxruntime) or int64 (the only type the onnx checker accepts)")
    min_size: int = option(64, "initializers with fewer elements stay dense")

    def validate(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError("threshold must be in [0, 1)")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")


def _counts(proto: onnx.ModelProto) -> GraphCounts:
    """Nodes (all graphs), stored bytes and stored values of the top graph's dense and sparse initializers."""

    def nodes(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += nodes(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(nodes(g) for g in attr.graphs)
        return total

    nbytes = params = 0
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            nbytes += int(info.get("length", 0) or 0)
        elif t.HasField("raw_data"):
            nbytes += len(t.raw_data)
        else:
            nbytes += numpy_helper.to_array(t).nbytes
        params += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    for s in proto.graph.sparse_initializer:
        for t in (s.values, s.indices):
            nbytes += len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
        params += int(np.prod(s.values.dims, dtype=np.int64))
    return GraphCounts(nodes(proto.graph), nbytes, params)


class Sparsify(Pass):
    """``sparsify``: store initializers that are mostly zeros as ONNX sparse initializers (COO).

    Rewrites the serialized model: every initializer of the main graph with at least ``min_size`` elements,
    more than ``threshold`` zeros and a smaller sparse encoding moves from ``graph.initializer`` to
    ``graph.sparse_initializer`` (non-zero values plus linear or coordinate indices, whichever is smaller,
    in the narrowest index type; ``indices=int64`` for what the onnx checker accepts). Applies after
    pruning (``prune(...),sparsify``); it must be the last pass of a pipeline (it works on the proto,
    which onnx-ir cannot hold). Skipped: initializers that are also graph inputs, external data, strings.
    Lossless: onnxruntime expands the values back to exactly the dense tensor; ``onnxpress.load`` densifies.
    Each converted initializer reports its shape, zero share, layout, index type, bytes before and after
    and the floor NNZ x (value bytes + narrowest index bytes).
    """

    name = "sparsify"
    Options = SparsifyOptions
    lossless = True
    proto_stage = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise UsageError("sparsify works on the serialized model: run it last in a pipeline (onnxpress.optimize / Pipeline.run) or call run_proto(proto)")

    def run_proto(self, proto: onnx.ModelProto) -> bool:
        """Rewrite ``proto`` in place; returns whether anything changed. Sets ``self.stats`` and ``self.details``."""
        o = self.options
        start = time.perf_counter()
        self.details = []
        before = _counts(proto)
        allowed = INDEX_TYPES if o.indices == "narrow" else (np.dtype(np.int64),)
        graph = proto.graph
        inputs = {i.name for i in graph.input}
        kept: list[onnx.TensorProto] = []
        added: list[onnx.SparseTensorProto] = []
        for tensor in graph.initializer:
            converted = self._convert(tensor, inputs, allowed)
            if converted is None:
                kept.append(tensor)
            else:
                added.append(converted)
        modified = bool(added)
        if modified:
            del graph.initializer[:]
            graph.initializer.extend(kept)
            graph.sparse_initializer.extend(added)
        self.stats = PassStats(
            name=self.name, text=str(self), seconds=time.perf_counter() - start, modified=modified,
            before=before, after=_counts(proto), verified=None, details=list(self.details),
        )
        return modified

    def _convert(self, tensor: onnx.TensorProto, inputs: set[str], allowed: tuple[np.dtype, ...]) -> onnx.SparseTensorProto | None:
        o = self.options
        size = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
        if size < max(o.min_size, 1) or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            self.details.append({"initializer": tensor.name, "skipped": "external data (not read)"})
            return None
        try:
            array = numpy_helper.to_array(tensor)
        except Exception:  # a type numpy cannot hold
            return None
        if array.dtype.kind not in "fiub" or array.dtype.itemsize == 0:
            return None
        zeros = 1.0 - np.count_nonzero(array) / array.size
        if zeros <= o.threshold:
            return None
        row: dict[str, Any] = {"initializer": tensor.name, "shape": list(array.shape), "dtype": str(array.dtype), "zero_fraction": round(zeros, 6)}
        if tensor.name in inputs:
            self.details.append({**row, "skipped": "also a graph input (can be overridden at run time)"})
            return None
        coo = coo_encode(array, allowed)
        sparse = sparse_proto(tensor.name, coo)
        dense_bytes, sparse_bytes = tensor.ByteSize(), sparse.ByteSize()
        row.update({
            "nnz": int(coo.values.size), "layout": coo.layout, "index_type": str(coo.indices.dtype),
            "bytes_before": dense_bytes, "bytes_after": sparse_bytes, "floor_bytes": floor_bytes(array, allowed),
        })
        if sparse_bytes >= dense_bytes:
            self.details.append({**row, "skipped": "the sparse form is not smaller"})
            return None
        self.details.append(row)
        return sparse
