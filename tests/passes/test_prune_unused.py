from graphs import apply_and_check, op_types, redundant_model

from onnxpress.passes.prune_unused import PruneUnused


def test_prune_unused_removes_dead_nodes_and_initializers():
    model = redundant_model()
    out, modified = apply_and_check(PruneUnused(), model, atol=0, rtol=0)
    assert modified
    assert "Sigmoid" in op_types(model) and "Sigmoid" not in op_types(out)
    assert "unused" in model.graph.initializers and "unused" not in out.graph.initializers
