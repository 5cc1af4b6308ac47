"""The ``upgrade-opset`` pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxpress import opset, runtime
from onnxpress.errors import OnnxpressError
from onnxpress.pass_infra import Pass, option


@dataclasses.dataclass(frozen=True)
class UpgradeOpsetOptions:
    opset: int = option(21, "default-domain (ai.onnx) opset to raise the model to; a model already at or above it is left alone")
    check: bool = option(True, "run the model before and after the conversion in onnxruntime (a calibration batch, else generated inputs) within the lossless tolerance")

    def validate(self) -> None:
        if not 7 <= self.opset <= opset.newest_opset():
            raise ValueError(f"opset must be between 7 and {opset.newest_opset()} (the installed onnx package's newest)")


class UpgradeOpset(Pass):
    """``upgrade-opset``: raise the default-domain opset with ``onnx.version_converter`` (any opset from 7).

    The pipeline inserts it before a pass that needs a newer opset than the model has (``Pass.required_opset``,
    e.g. ``qdq`` needs 13 for per-axis DequantizeLinear), so an opset-11 model quantizes; it can also be written
    in a pipeline. Other domains (ai.onnx.ml, com.microsoft) pass through unchanged. Lossless: with ``check`` the
    converted model must match the original in onnxruntime within the lossless tolerance, else the pass fails
    with one line naming the op types the converter rewrote. Its report row says from -> to and which nodes
    changed.
    """

    name = "upgrade-opset"
    Options = UpgradeOpsetOptions
    lossless = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.options.opset
        current = opset.default_opset(model)
        if current is None or current >= target:
            why = "no ai.onnx opset import" if current is None else f"already at opset {current}"
            self.details.append({"layer": "(model)", "skipped": why})
            return ir.passes.PassResult(model, False)
        # A copy that keeps finding external data: the check runs the original from it.
        original = runtime.copy_model(model) if self.options.check else None
        summary = opset.convert(model, target)
        row = summary.to_row()
        if original is not None:
            result = opset.check(original, model, self.context.calibration)
            row["check"] = result.note
            row["max_abs"] = result.max_abs
            if result.passed is False:
                ops = ", ".join(summary.ops_touched()[:6]) or "none"
                where = f" (output '{result.worst_output}': max abs error {result.max_abs:.3g})" if result.worst_output else ""
                raise OnnxpressError(
                    f"converting opset {current} -> {target} is not lossless{where}: {result.note}; "
                    f"op types the converter rewrote: {ops}"
                )
        row["summary"] = summary.describe()
        self.details.append(row)
        return ir.passes.PassResult(model, True)
