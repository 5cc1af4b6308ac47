from graphs import apply_and_check, op_types, redundant_model, text_model

from onnxpress.passes.cse import CommonSubexpressionElimination


def test_cse_merges_repeated_node():
    model = redundant_model()
    out, modified = apply_and_check(CommonSubexpressionElimination(), model, atol=0, rtol=0)
    assert modified
    assert op_types(model).count("Relu") == 2
    assert op_types(out).count("Relu") == 1


def test_cse_never_merges_random_ops():
    model = text_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y)
        {
            r1 = RandomUniformLike(x)
            r2 = RandomUniformLike(x)
            s = Add(r1, r2)
            y = Mul(s, x)
        }
        """
    )
    work = text_model(str(model)) if False else model
    result = CommonSubexpressionElimination()(work)
    assert not result.modified
    assert op_types(result.model).count("RandomUniformLike") == 2
