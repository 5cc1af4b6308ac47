"""The ``lift-constants`` pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxpress.pass_infra import Pass, option


@dataclasses.dataclass(frozen=True)
class LiftConstantsOptions:
    size_limit: int = option(16, "lift Constant nodes holding at least this many elements (smaller ones stay nodes)")

    def validate(self) -> None:
        if self.size_limit < 0:
            raise ValueError("size_limit must be >= 0")


class LiftConstants(Pass):
    """``lift-constants``: Constant nodes of the main graph holding tensors -> initializers (onnx-ir's pass).

    Why: weight-rewriting passes (qdq, factorize, prune) find weights as initializers, but paddle2onnx and spox
    write every weight as a ``Constant`` node (PP-OCRv4 det: 342 of them), so ``qdq`` found nothing to
    quantize. The pipeline inserts this step before a lossy pass when the main graph has such a Constant; it can
    also be written in a pipeline. Lossless: the same values, stored as initializers.
    """

    name = "lift-constants"
    Options = LiftConstantsOptions
    lossless = True

    @classmethod
    def applies(cls, model: ir.Model) -> bool:
        """Whether the main graph has a Constant the default options would lift (the pipeline asks this)."""
        return bool(lifted_candidates(model.graph, LiftConstantsOptions().size_limit))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = len(lifted_candidates(model.graph, self.options.size_limit))
        if not count:
            return ir.passes.PassResult(model, False)
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=self.options.size_limit)(model)
        self.details.append({"layer": "(model)", "lifted": count})
        return ir.passes.PassResult(model, True)


def lifted_candidates(graph: ir.Graph, size_limit: int) -> list[ir.Node]:
    """Main-graph Constant nodes with a tensor ``value`` of at least ``size_limit`` elements."""
    found = []
    for node in graph:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.size >= size_limit:
            found.append(node)
    return found
