"""The ``strip-metadata`` pass."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxpress.pass_infra import Pass


def _values(graph: ir.Graph | ir.Function):
    yield from graph.inputs
    yield from graph.outputs
    if isinstance(graph, ir.Graph):
        yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def metadata_bytes(model: ir.Model) -> int:
    """Bytes of the debug metadata this pass removes (keys + values + doc strings), for its report."""
    total = 0
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            total += sum(len(k) + len(v) for k, v in node.metadata_props.items()) + len(node.doc_string or "")
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    total += sum(len(k) + len(v) for k, v in attr.value.metadata_props.items())
        total += sum(len(k) + len(v) for k, v in graph.metadata_props.items()) + len(graph.doc_string or "")
        for value in _values(graph):
            total += sum(len(k) + len(v) for k, v in value.metadata_props.items()) + len(value.doc_string or "")
    return total


class StripMetadata(Pass):
    """``strip-metadata``: drop debug metadata: node, value and graph ``metadata_props`` and doc strings.

    Applies to every model; pays most on exporter output (torch.onnx's dynamo exporter stores a stack trace,
    module hierarchy and FX node text on every node: ~0.5 MB on all-MiniLM-L6-v2). Lossless: no node,
    tensor or attribute changes, only debug annotations. Model-level ``metadata_props`` (producer facts a
    deployment may read, and onnxpress's own pipeline stamp) are kept. Built on onnx-ir's
    ClearMetadataAndDocStringPass, plus the per-value annotations that pass leaves.
    """

    name = "strip-metadata"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = metadata_bytes(model)
        if not removed:
            return ir.passes.PassResult(model, False)
        common.ClearMetadataAndDocStringPass()(model)
        for graph in (model.graph, *model.functions.values()):
            graph.metadata_props.clear()
            graph.doc_string = None
            for value in _values(graph):
                value.metadata_props.clear()
                value.doc_string = None
            for node in ir.traversal.RecursiveGraphIterator(graph):
                node.doc_string = None
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.GRAPH:
                        attr.value.metadata_props.clear()
                        attr.value.doc_string = None
        self.details.append({"metadata_bytes_removed": removed})
        return ir.passes.PassResult(model, True)
