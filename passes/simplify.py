"""The ``simplify`` pass."""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir

from onnxpress.pass_infra import Pass, option

_PROTO_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SimplifyOptions:
    skip_fuse_bn: bool = option(False, "keep BatchNormalization separate from the preceding Conv")


class Simplify(Pass):
    """``simplify``: onnxsim's graph simplification (constant propagation, shape folding, fusions it proves exact).

    Applies to models under 2 GB (onnxsim works on a serialized proto); larger models are skipped with the
    reason in the report. Lossless: onnxsim only rewrites subgraphs whose values it can compute or whose
    semantics are identical; the pipeline's validation checks the outputs within float rounding.
    """

    name = "simplify"
    Options = SimplifyOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxpress.io import has_external_data, initializer_bytes

        if initializer_bytes(model) > _PROTO_LIMIT // 2 or has_external_data(model):
            self.details.append({"skipped": "model has external data or is near 2 GB; onnxsim needs an in-memory proto"})
            return ir.passes.PassResult(model, False)
        import onnxsim  # only now: it imports torch (seconds, ~0.3 GB) even for a model it would skip
        proto = ir.to_proto(model)
        before = _structure_text(proto.graph)
        skipped = ["fuse_bn_into_conv"] if self.options.skip_fuse_bn else None
        try:
            simplified, ok = onnxsim.simplify(proto, check_n=0, skipped_optimizers=skipped)
        except Exception as exc:  # onnxsim raises for ops it cannot evaluate; simplification is optional
            self.details.append({"skipped": f"onnxsim failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"})
            return ir.passes.PassResult(model, False)
        if _structure_text(simplified.graph) == before and _same_initializer_values(model, simplified.graph):
            return ir.passes.PassResult(model, False)
        new = ir.serde.deserialize_model(simplified)
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        return ir.passes.PassResult(model, True)


def _structure_text(graph: onnx.GraphProto) -> str:
    """The graph printed without value_info (onnx-ir and onnxsim record shape info differently for equal
    graphs) and without initializer values (name, type and shape only; values: `_same_initializer_values`).
    Printing the values too took 3.5 s per call on MiniLM (90 MB of floats as text), 70% of the pipeline."""
    bare = onnx.GraphProto(name=graph.name)
    bare.input.extend(graph.input)
    bare.output.extend(graph.output)
    bare.node.extend(graph.node)
    bare.sparse_initializer.extend(graph.sparse_initializer)
    specs = [f"{t.name}:{t.data_type}:{list(t.dims)}" for t in graph.initializer]
    return onnx.printer.to_text(bare) + "\n" + "\n".join(specs)


def _same_initializer_values(model: ir.Model, graph: onnx.GraphProto) -> bool:
    """Bitwise equality of onnxsim's initializers with the model's (compared as onnx-ir serializes them,
    so data moved between raw_data and float_data still compares equal). The model itself is compared,
    not the proto given to onnxsim, which onnxsim is free to modify."""
    for tensor in graph.initializer:
        value = model.graph.initializers.get(tensor.name)
        if value is None or value.const_value is None:
            return False
        if ir.serde.deserialize_tensor(tensor).tobytes() != value.const_value.tobytes():
            return False
    return True
