"""`make demo`'s accuracy-budget part: the search on the digits CNN writes its Pareto plot and its chosen
model meets the budget when measured again, independently of the search."""

import pytest

from onnxpress.models import demo


@pytest.mark.slow
def test_demo_budget_part_writes_pareto_plot_and_meets_budget(tmp_path):
    from onnxpress.models import digits

    result, plot = demo.budget_demo(tmp_path, cache=False)

    assert plot == tmp_path / "budget-digits.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert result.passed
    assert result.budget.metric == "accuracy_drop" and result.budget.value == pytest.approx(0.01)
    # the chosen point is marked in the plot: the built model is one of the points
    assert [p.kind for p in result.points].count("built") >= 1
    assert result.bytes_after < result.bytes_before
    # measured again on the saved file, with the task's own evaluation (450 held-out images)
    saved = tmp_path / "budget-digits.onnx"
    metrics = digits.evaluate(str(saved), kind="cnn")
    assert metrics["accuracy_drop"] <= 0.01
    assert metrics["accuracy_drop"] == pytest.approx(result.value, abs=1e-9)
