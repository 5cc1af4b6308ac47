from graphs import apply_and_check, redundant_model

from onnxpress.passes.dedup import DeduplicateInitializers
from onnxpress.pipeline import Pipeline


def test_dedup_merges_identical_weights_exactly():
    model = redundant_model()
    out, modified = apply_and_check(DeduplicateInitializers(), model, atol=0, rtol=0)
    assert modified
    assert len(out.graph.initializers) == len(model.graph.initializers) - 1
    matmul_weights = {n.inputs[1].name for n in out.graph if n.op_type == "MatMul"}
    assert len(matmul_weights) == 1


def test_dedup_respects_size_limit():
    out, modified = apply_and_check(DeduplicateInitializers(max_bytes=8), redundant_model(), atol=0, rtol=0)
    assert not modified  # the 64-byte duplicates are above the limit


def test_dedup_text_round_trip():
    assert str(Pipeline.parse("dedup(max_bytes=1024)")) == "dedup(max_bytes=1024)"
