"""The LLM text set: 20 calibration and 40 evaluation prose paragraphs that never overlap."""

from onnxpress.models import llm_text


def test_llm_paragraph_sets_are_disjoint_prose():
    cal, ev = llm_text.calibration_texts(), llm_text.eval_texts()
    assert (len(cal), len(ev)) == (llm_text.N_CALIBRATION, llm_text.N_EVAL)
    assert len(set(cal + ev)) == len(cal) + len(ev)
    # no shared 8-word run between the sets (so no shared sentence either)
    cal_runs = set().union(*(llm_text.shingles(p) for p in cal))
    ev_runs = set().union(*(llm_text.shingles(p) for p in ev))
    assert cal_runs and ev_runs and not cal_runs & ev_runs
    for p in cal + ev:
        assert 40 <= len(p.split()) <= 160 and p[0].isupper() and p.endswith(".")
        assert ">>>" not in p and "=" not in p


def test_paragraphs_of_keeps_prose_and_drops_code():
    prose = " ".join(["This sentence is plain English prose about a module."] * 6)
    doc = f"{prose}\n\nUse x = f(y) to call it, as in the example below, which is code and not prose at all " + "really " * 40 + "."
    assert llm_text.paragraphs_of(doc) == [prose]
    assert llm_text.shingles("a b c d e f g h i") == {tuple("abcdefgh"), tuple("bcdefghi")}
