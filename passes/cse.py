"""The ``cse`` pass."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxpress.pass_infra import Pass


class CommonSubexpressionElimination(Pass):
    """``cse``: common subexpression elimination — identical nodes on identical inputs are computed once.

    Applies to deterministic ops (random ops are never merged). Lossless: the merged node computes
    exactly what each copy computed. Built on onnx-ir's CommonSubexpressionEliminationPass.
    """

    name = "cse"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        common.CommonSubexpressionEliminationPass()(model)
        removed_unused = common.RemoveUnusedNodesPass()(model).modified
        after = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        if before != after:
            self.details.append({"nodes_merged": before - after})
        return ir.passes.PassResult(model, before != after or removed_unused)
