"""The ``prune-unused`` pass."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxpress.pass_infra import Pass


class PruneUnused(Pass):
    """``prune-unused``: remove nodes, initializers, functions and opset imports that no output depends on.

    Applies to every model. Lossless: graph outputs are computed by exactly the same nodes as before.
    Built on onnx-ir's RemoveUnusedNodesPass / RemoveUnusedFunctionsPass / RemoveUnusedOpsetsPass.
    """

    name = "prune-unused"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for inner in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            modified = inner(model).modified or modified
        return ir.passes.PassResult(model, modified)
