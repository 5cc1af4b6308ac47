"""The ``strip-metadata`` pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping

import onnx_ir as ir

from onnxpress.pass_infra import Pass, option


@dataclasses.dataclass(frozen=True)
class StripMetadataOptions:
    keep: tuple[str, ...] = option(
        ("onnxpress.",), "metadata keys starting with one of these prefixes are kept (onnxpress's own marks: factorize/prune read them to stay idempotent)"
    )


def _annotated(model: ir.Model) -> Iterator[ir.Node | ir.Value | ir.Graph | ir.Function]:
    """Every object of the model that carries ``metadata_props`` and a ``doc_string``, except the model."""
    for graph in (model.graph, *model.functions.values()):
        yield graph
        yield from graph.inputs
        yield from graph.outputs
        if isinstance(graph, ir.Graph):
            yield from graph.initializers.values()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            yield node
            yield from node.outputs
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield attr.value
                elif attr.type == ir.AttributeType.GRAPHS:
                    yield from attr.value


def _dropped(props: MutableMapping[str, str], keep: tuple[str, ...]) -> list[str]:
    return [k for k in props if not k.startswith(keep)]


def metadata_bytes(model: ir.Model, keep: tuple[str, ...] = StripMetadataOptions.keep) -> int:
    """Bytes of debug metadata the pass removes (keys + values + doc strings): its report."""
    total = 0
    for obj in _annotated(model):
        total += sum(len(k) + len(obj.metadata_props[k]) for k in _dropped(obj.metadata_props, keep))
        total += len(obj.doc_string or "")
    return total


class StripMetadata(Pass):
    """``strip-metadata``: drop debug metadata: node, value and graph ``metadata_props`` and doc strings.

    Applies to every model; pays most on exporter output (torch.onnx's dynamo exporter stores a stack trace,
    module hierarchy and FX node text on every node: ~0.5 MB on all-MiniLM-L6-v2). Lossless: no node,
    tensor or attribute changes, only debug annotations. Kept: model-level ``metadata_props`` (producer facts
    a deployment may read, and onnxpress's pipeline stamp) and keys starting with a ``keep`` prefix
    (onnxpress's own marks, which factorize and prune read so that a second run leaves their work alone).
    """

    name = "strip-metadata"
    Options = StripMetadataOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        keep = self.options.keep
        removed = metadata_bytes(model, keep)
        if not removed:
            return ir.passes.PassResult(model, False)
        for obj in _annotated(model):
            for key in _dropped(obj.metadata_props, keep):
                del obj.metadata_props[key]
            obj.doc_string = None
        self.details.append({"metadata_bytes_removed": removed})
        return ir.passes.PassResult(model, True)
