"""The ``sparsify`` pass: plan to store mostly-zero initializers as ONNX sparse initializers (COO).

onnx-ir holds no sparse initializers, so the pass does not rewrite the graph: it decides which initializers
are stored sparse and records that decision in the model (``onnxpress.sparse_storage`` metadata, see
``onnxpress.sparse_storage``); ``onnxpress.save`` writes them as ``graph.sparse_initializer`` (COO). The model
in memory stays dense with the same values, so validation and any pass after ``sparsify`` see ordinary
tensors; at save the plan is re-checked and a tensor a later pass changed so that it is no longer mostly
zero (or removed or renamed) is written dense. The encoding maths lives in ``onnxpress.sparse_storage``
(the core writes it; passes import the core, never the other way) and is re-exported here.

Index types: ``indices=narrow`` (default) uses the narrowest signed type that holds the indices (onnxruntime
1.32 reads int8..int64), ``indices=int64`` what the onnx checker accepts. ``onnxpress.load`` densifies.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxpress.pass_infra import GraphCounts, Pass, option
from onnxpress.sparse_storage import (  # noqa: F401 - re-exported: the encoding is part of this pass's API
    INDEX_CHOICES,
    INDEX_TYPES,
    Coo,
    StoragePlan,
    Stored,
    coo_decode,
    coo_encode,
    decide,
    floor_bytes,
    graph_input_names,
    narrowest_index_type,
    read_plan,
    sparse_proto,
    stored_initializers,
    write_plan,
)


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


class Sparsify(Pass):
    """``sparsify``: store initializers that are mostly zeros as ONNX sparse initializers (COO) when saved.

    Plans, on the in-memory model: every initializer of the main graph with at least ``min_size`` elements,
    more than ``threshold`` zeros and a smaller sparse encoding (non-zero values plus linear or coordinate
    indices, whichever is smaller, in the narrowest index type; ``indices=int64`` for what the onnx checker
    accepts) is recorded in the ``onnxpress.sparse_storage`` metadata; ``onnxpress.save`` writes it to
    ``graph.sparse_initializer``. Skipped: initializers that are also graph inputs, strings. Lossless:
    onnxruntime expands the values back to exactly the dense tensor; the in-memory model never changes its
    values. The last ``sparsify`` of a pipeline decides (its plan replaces an earlier one). Each planned
    initializer reports its shape, zero share, layout, index type, bytes before and after and the floor
    NNZ x (value bytes + narrowest index bytes); the statistics' "after" counts the stored bytes.
    """

    name = "sparsify"
    Options = SparsifyOptions
    lossless = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        inputs = graph_input_names(model)
        self.planned = []
        for value in model.graph.initializers.values():
            row, stored = decide(value, inputs, o.threshold, o.min_size, INDEX_CHOICES[o.indices])
            if row is not None:
                self.details.append(row)
            if stored is not None:
                self.planned.append(stored)
        plan = StoragePlan(tuple(s.name for s in self.planned), o.threshold, o.indices, o.min_size)
        modified = write_plan(model, plan)
        return ir.passes.PassResult(model, modified)

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.planned: list[Stored] = []

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        model = model_or_result.model if isinstance(model_or_result, ir.passes.PassResult) else model_or_result
        prior = stored_initializers(model)  # a plan already in the model (an earlier sparsify, a loaded file)
        result = super().__call__(model)
        # The tensors stay dense in memory; what the pass changes is what a save stores: count that.
        if self.stats is not None:
            self.stats.before = _as_stored(self.stats.before, prior)
            self.stats.after = _as_stored(self.stats.after, self.planned)
        return result


def _as_stored(counts: GraphCounts, stored: list[Stored]) -> GraphCounts:
    """``counts`` of the dense model with the ``stored`` tensors counted as a save writes them (values + indices)."""
    return dataclasses.replace(
        counts,
        initializer_bytes=counts.initializer_bytes - sum(s.dense_nbytes - s.coo.nbytes for s in stored),
        parameters=counts.parameters - sum(int(np.prod(s.coo.shape, dtype=np.int64)) - int(s.coo.values.size) for s in stored),
    )
