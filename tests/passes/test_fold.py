from graphs import apply_and_check, op_types, redundant_model

from onnxpress.passes.fold import FoldConstants
from onnxpress.pipeline import Pipeline


def test_fold_turns_constant_subexpression_into_initializer():
    model = redundant_model()
    out, modified = apply_and_check(FoldConstants(), model, atol=1e-6, rtol=1e-6)
    assert modified
    # c2 = Mul(c, c) is constant: one Mul fewer; the data-dependent Mul stays
    assert op_types(model).count("Mul") == 2
    assert op_types(out).count("Mul") == 1


def test_fold_size_limit_keeps_large_constants_unfolded():
    out, modified = apply_and_check(FoldConstants(max_input=0, max_output=0), redundant_model(), atol=0, rtol=0)
    assert op_types(out).count("Mul") == 2 or not modified


def test_fold_options_round_trip():
    p = Pipeline.parse("fold(max_input=10,max_output=20)")
    assert p.passes[0].options.max_input == 10
    assert str(p) == "fold(max_input=10,max_output=20)"


def test_fold_keeps_sequence_models_valid_below_opset_13():
    """onnxscript's ConcatFromSequence/SplitToSequence folding emits opset-13 forms; fold must not use it there."""
    from graphs import text_model

    model = text_model(
        """
        <ir_version: 7, opset_import: ["" : 11]>
        g (float[2,3] x) => (float[2,2,3] y)
        {
            s = SequenceConstruct(x, x)
            y = ConcatFromSequence<axis=1, new_axis=1>(s)
        }
        """
    )
    out, _ = apply_and_check(FoldConstants(), model, atol=0, rtol=0)
    assert all(n.op_type != "Unsqueeze" or len(n.inputs) == 1 for n in out.graph)
