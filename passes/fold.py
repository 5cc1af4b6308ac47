"""The ``fold`` pass."""

from __future__ import annotations

import contextlib
import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer import _constant_folding as constant_folding
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
        unsafe = _UNSAFE_PARTIAL_EVALUATORS
        if model.opset_imports.get("", 13) < 13:
            unsafe += _UNSAFE_BELOW_OPSET_13
        with _without_partial_evaluators(unsafe):
            fold_constants(model, input_size_limit=self.options.max_input, output_size_limit=self.options.max_output)
        common.RemoveUnusedNodesPass()(model)
        # onnxscript reports a change when it only refreshed shapes; compare structure for an honest flag.
        return ir.passes.PassResult(model, _signature(model) != before)


# onnxscript 0.7's SplitToSequence partial evaluator crashes when `split` is neither constant nor of known
# shape, and it and ConcatFromSequence's emit Split/Unsqueeze with axes as inputs also at opsets below 13
# (where they are attributes: an invalid model). Found by the ONNX backend node suite
# (test_sequence_model5/8, test_split_to_sequence_1).
_UNSAFE_PARTIAL_EVALUATORS = (("", "SplitToSequence"),)
_UNSAFE_BELOW_OPSET_13 = (("", "ConcatFromSequence"),)


@contextlib.contextmanager
def _without_partial_evaluators(keys):
    table = constant_folding.registry.op_evaluators
    saved = {key: table.pop(key) for key in keys if key in table}
    try:
        yield
    finally:
        table.update(saved)


def _signature(model: ir.Model) -> tuple:
    nodes = tuple(
        (n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return nodes, tuple(model.graph.initializers)
