import onnx_ir as ir
from graphs import apply_and_check, mlp_model

from onnxpress.passes.strip_metadata import StripMetadata, metadata_bytes


def _annotated_mlp() -> ir.Model:
    model = mlp_model()
    for node in model.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "File model.py, line 3, in forward\n" * 4
        node.metadata_props["namespace"] = f"mlp/{node.op_type}"
        node.doc_string = "exported node"
    model.graph.inputs[0].metadata_props["pkg.torch.onnx.original_node_name"] = "x"
    model.graph.metadata_props["pkg.torch.export.ExportedProgram.graph_signature"] = "inputs: x"
    model.graph.doc_string = "graph doc"
    model.metadata_props["producer.note"] = "kept"
    return model


def test_strip_metadata_removes_debug_annotations_and_keeps_numbers():
    model = _annotated_mlp()
    before = metadata_bytes(model)
    assert before > 400
    out, modified = apply_and_check(StripMetadata(), model, atol=0, rtol=0)
    assert modified
    assert metadata_bytes(out) == 0
    assert all(not node.metadata_props and not node.doc_string for node in out.graph)
    assert not out.graph.inputs[0].metadata_props and not out.graph.metadata_props
    assert out.metadata_props["producer.note"] == "kept"  # model-level facts stay
    assert len(ir.to_proto(out).SerializeToString()) < len(ir.to_proto(model).SerializeToString()) - before // 2


def test_strip_metadata_keeps_onnxpress_marks_so_factorize_stays_idempotent():
    from onnxpress.passes.factorize import Factorize

    factorized = Factorize(Factorize.Options(ratio=0.5, min_size=0))(mlp_model(k=32, h=64, n=32)).model
    marks = {n.name: dict(n.metadata_props) for n in factorized.graph if n.metadata_props}
    assert marks, "factorize marks its nodes"
    for node in factorized.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "trace"
    stripped = StripMetadata()(factorized).model
    assert {n.name: dict(n.metadata_props) for n in stripped.graph if n.metadata_props} == marks
    assert not Factorize(Factorize.Options(ratio=0.5, min_size=0))(stripped).modified


def test_strip_metadata_on_clean_model_reports_no_change():
    result = StripMetadata()(mlp_model())
    assert not result.modified


def test_strip_metadata_is_in_the_default_pipeline():
    from onnxpress.passes import DEFAULT_PIPELINE

    assert DEFAULT_PIPELINE.split(",")[0] == "strip-metadata"
