"""The ``dedup`` pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common

from onnxpress.pass_infra import Pass, option


@dataclasses.dataclass(frozen=True)
class DedupOptions:
    max_bytes: int = option(4 * 1024**3, "initializers larger than this many bytes are not compared")

    def validate(self) -> None:
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")


class DeduplicateInitializers(Pass):
    """``dedup``: merge initializers with identical dtype, shape and bytes into one.

    Applies to every model with repeated constant tensors (tied weights, repeated biases, shape constants).
    Lossless: consumers read bit-identical data. Built on onnx-ir's DeduplicateHashedInitializersPass
    (hashes first, compares bytes on a hash match, so large tensors are not compared pairwise).
    """

    name = "dedup"
    Options = DedupOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph.initializers)
        common.DeduplicateHashedInitializersPass(size_limit=self.options.max_bytes)(model)
        removed = before - len(model.graph.initializers)
        if removed:
            self.details.append({"initializers_merged": removed})
        return ir.passes.PassResult(model, removed > 0)
