"""The ``fold`` pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import fold_constants

from onnxpress.pass_infra import Pass, option


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    max_input: int = option(1024 * 1024, "do not fold nodes with an input of more than this many elements")
    max_output: int = option(1024 * 1024, "do not materialise folded tensors larger than this many elements")

    def validate(self) -> None:
        if self.max_input < 0 or self.max_output < 0:
            raise ValueError("max_input and max_output must be >= 0")


class FoldConstants(Pass):
    """``fold``: constant folding with onnxscript's optimizer.

    Rewrites every node whose inputs are all constants (and shape computations that are statically known)
    into an initializer, then removes what became unused. Lossless up to float rounding of the folded
    expression (ONNX reference evaluation of the same ops). Outputs larger than ``max_output`` elements are not
    materialised, so folding never bloats the file.
    """

    name = "fold"
    Options = FoldOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _signature(model)
        fold_constants(model, input_size_limit=self.options.max_input, output_size_limit=self.options.max_output)
        common.RemoveUnusedNodesPass()(model)
        # onnxscript reports a change when it only refreshed shapes; compare structure for an honest flag.
        return ir.passes.PassResult(model, _signature(model) != before)


def _signature(model: ir.Model) -> tuple:
    nodes = tuple(
        (n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return nodes, tuple(model.graph.initializers)
