"""Held-out truth: calibration (fit) and evaluation (verdict) data are different sets, verdicts are per-sample
statistics, and the budget's "met" is said on data the search never fitted to."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import mlp_model

import onnxpress
from onnxpress import metrics, rundata
from onnxpress.cli import run
from onnxpress.errors import UsageError
from onnxpress.validate import Tolerance

VOCAB, DIM, HIDDEN, SEQ = 512, 32, 16, 8


def embedding_model(seed: int = 0) -> ir.Model:
    """ids[N, S] -> Gather(table[V, D]) -> MatMul(W[D, H]) -> y[N, S, H]; named nodes (the budget selects by name)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    w = (rng.standard_normal((DIM, HIDDEN)) / np.sqrt(DIM)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"), onnx.helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")],
        "g",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "S"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "S", HIDDEN])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def zipf_ids(n: int, seed: int) -> np.ndarray:
    """Token ids as in text: a few frequent tokens, a long tail (rank-frequency ~ 1/rank)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1)
    return rng.choice(VOCAB, size=(n, SEQ), p=p / p.sum()).astype(np.int64)


# -- pure functions ----------------------------------------------------------------------------------------
def test_per_sample_metrics_see_bad_samples_that_the_batch_cosine_hides():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((32, 64))
    out = ref.copy()
    out[[3, 7, 11]] = -ref[[3, 7, 11]]  # three samples of 32 inverted: below the 5% tail
    whole_batch = metrics.cosine(out, ref)
    per = metrics.compare_outputs([{"y": out}], [{"y": ref}], [{"x": np.zeros((32, 3))}])["y"]
    summary = per.summary()
    assert per.count == 32
    assert whole_batch == pytest.approx(26 / 32, abs=0.05)
    assert summary["min_cos"] == pytest.approx(-1.0)
    assert summary["cos"] == pytest.approx(26 / 32)  # (29 * 1 + 3 * (-1)) / 32
    assert summary["p5_cos"] == pytest.approx(-1.0) and summary["cos"] > 0.8
    assert summary["max_rel_l2"] == pytest.approx(2.0)
    # a feed whose inputs disagree on the leading size is one sample
    assert metrics.feed_batch({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}) is None
    assert len(metrics.sample_slices(np.zeros((4, 2)), None)) == 1


def test_validation_verdict_is_the_mean_per_sample_cosine():
    model = mlp_model(k=8, h=16, n=4)
    noisy = ir.from_proto(ir.to_proto(model))
    w = noisy.graph.initializers["w2"].const_value.numpy()
    noisy.graph.initializers["w2"].const_value = ir.tensor(w + 0.05 * np.random.default_rng(1).standard_normal(w.shape).astype(np.float32), name="w2")
    feeds = [{"x": np.random.default_rng(i).standard_normal((8, 8)).astype(np.float32)} for i in range(3)]
    report = onnxpress.validate(model, noisy, inputs=feeds, tolerance=Tolerance(min_cosine=0.5))
    (out,) = report.outputs
    assert report.samples == 24 and report.feeds == 3
    assert out.cosine_min <= out.cosine_p5 <= out.cosine <= 1.0
    assert out.rel_l2 <= out.rel_l2_p95 <= out.rel_l2_max
    assert report.metrics()["cos"] == out.cosine and report.passed == (out.cosine >= 0.5)


def test_split_is_seeded_by_sample_and_refuses_tiny_sides():
    fit, held = rundata.split_indices(32, None, seed=0)
    assert len(held) == 8 and len(fit) == 24 and not set(fit) & set(held)
    assert (fit, held) == rundata.split_indices(32, None, seed=0)
    assert rundata.split_indices(32, None, seed=1) != (fit, held)
    assert rundata.holdout_count(400, None) == 100  # 25%
    assert rundata.holdout_count(10, None) == 8  # at least 8 ...
    assert rundata.holdout_count(9, None) == 7  # ... but 2 stay to fit
    assert rundata.holdout_count(100, 0.1) == 10 and rundata.holdout_count(100, 16) == 16
    assert rundata.parse_holdout("0.2") == 0.2 and rundata.parse_holdout("12") == 12
    for n, holdout in ((3, None), (10, 9), (10, 1), (5, 0.1)):
        with pytest.raises(UsageError, match="fewer than 2"):
            rundata.holdout_count(n, holdout)
    with pytest.raises(UsageError):
        rundata.parse_holdout("lots")


def test_prepare_holds_out_calibration_samples_and_batches_the_rest(tmp_path):
    model = mlp_model(k=8, h=16, n=4)
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = rundata.prepare(model, calibration=tmp_path / "calib.npz")
    assert data.split["samples"] == 40 and len(data.split["evaluation_indices"]) == 10
    fit_rows = np.concatenate([f["x"] for f in data.calibration])
    held_rows = np.concatenate([f["x"] for f in data.evaluation])
    assert fit_rows.shape == (30, 8) and held_rows.shape == (10, 8)
    np.testing.assert_array_equal(held_rows, x[data.split["evaluation_indices"]])
    assert "held-out" in data.evaluation_source
    # evaluation data given: all calibration is fit data; nothing given: generated, said so
    given = rundata.prepare(model, calibration=tmp_path / "calib.npz", evaluation=[{"x": x[:4]}])
    assert sum(len(f["x"]) for f in given.calibration) == 40 and given.split is None
    nothing = rundata.prepare(model)
    assert nothing.generated and "generated" in nothing.evaluation_source


# -- the overfit the held-out verdict catches ------------------------------------------------------------------
def test_budget_verdict_on_held_out_catches_the_embedding_split_overfit():
    """16 calibration sentences index a fraction of a 512-row table; the split stores every other row in 2 bits.
    Verified on the calibration data itself (the old behaviour, holdout=0) the search says "met" while unseen
    text is far below the budget; with a held-out part the verdict is computed on unseen samples and holds."""
    model = embedding_model()
    calibration = [{"ids": zipf_ids(1, seed=i)} for i in range(16)]
    unseen = [{"ids": zipf_ids(8, seed=1000 + i)} for i in range(8)]
    budget = "cos>=0.98"

    _, old = onnxpress.optimize(model, budget=budget, calibration=calibration, holdout=0, budget_options={"cache": False})
    assert old.budget.passed  # what the old behaviour claimed
    old_unseen = onnxpress.validate(model, old.budget.model, inputs=unseen).metrics()["cos"]
    assert old_unseen < 0.98, "the overfit should be visible on unseen text"

    _, new = onnxpress.optimize(model, budget=budget, calibration=calibration, budget_options={"cache": False})
    assert new.data["split"]["samples"] == 16 and len(new.data["split"]["evaluation_indices"]) == 8
    assert "held-out" in new.budget.evaluation
    new_unseen = onnxpress.validate(model, new.budget.model, inputs=unseen).metrics()["cos"]
    assert new.budget.passed and new_unseen >= 0.975, (new.budget.pipeline, new_unseen)
    assert new.bytes_after > old.bytes_after  # the honest answer is a larger model
    # the report says what happened: the fit/held-out disagreement, the split's coverage on held-out text
    attempts = new.budget.attempts
    assert all("fit_value" in a for a in attempts)
    assert len({a["pipeline"] for a in attempts}) == len(attempts), "a back-off rebuilt the same model"
    if any(a["heldout_checks"] for a in attempts):
        assert any("rejected by the held-out check" in n or "too small" in n for n in new.budget.notes)


# -- the CLI ---------------------------------------------------------------------------------------------------
def test_static_int8_with_only_calibration_validates_on_held_out_samples(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(k=16, h=32, n=8), src)
    x = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "out.onnx"
    # a random-weight MLP on Gaussian inputs (per-tensor activation ranges, no real structure): cosine floor 0.97;
    # the real-model version (digits, default 0.99 floor) is in tests/models/test_digits.py
    code = run(["optimize", str(src), "-o", str(out), "-p", "qdq(mode=static)", "--calibration", str(tmp_path / "calib.npz"),
                "--min-cosine", "0.97", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["split"]["samples"] == 48 and len(report["data"]["split"]["evaluation_indices"]) == 12
    assert "held-out" in report["validation"]["data"] and not report["validation"]["generated"]
    assert report["validation"]["samples"] == 12 and report["validation"]["passed"]
    printed = capsys.readouterr().out
    assert "held-out part of the calibration data" in printed and "Per-sample metrics" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--holdout", "47"], "fewer than 2"),
        (["--holdout", "0.001"], "fewer than 2"),
        (["--holdout", "many"], "--holdout"),
        (["--inputs", "WRONG"], "inputs do not match"),
    ],
)
def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(k=16, h=32, n=8), src)
    np.savez(tmp_path / "calib.npz", x=np.zeros((48, 16), np.float32))
    np.savez(tmp_path / "wrong.npz", z=np.zeros((4, 16), np.float32))
    extra = [str(tmp_path / "wrong.npz") if e == "WRONG" else e for e in extra]
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "-p", "qdq(mode=static)", "--calibration", str(tmp_path / "calib.npz"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("onnxpress: error:") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# -- user tasks ------------------------------------------------------------------------------------------------
TASK_FILE = '''
import numpy as np

# labels of every sample the task may be given (calibration rows while the search compares configurations,
# evaluation rows for the verdict), looked up by the sample's bytes
LABELS = {labels}


def accuracy(session_factory, data):
    session = session_factory()
    name = session.get_inputs()[0].name
    hits = []
    for feed in data:
        predictions = session.run(None, {{name: feed[name]}})[0].argmax(-1)
        hits.extend(int(p) == LABELS[row.tobytes().hex()] for p, row in zip(predictions, feed[name]))
    return {{"accuracy": float(np.mean(hits))}}


def broken(session_factory, data):
    return {{"note": "no numbers here"}}
'''


def _labelled(model_path, rows):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    predictions = sess.run(None, {"x": rows})[0].argmax(-1)
    return {row.tobytes().hex(): int(p) for row, p in zip(rows, predictions)}


def test_user_task_drives_an_accuracy_budget(tmp_path, capsys):
    model = mlp_model(k=16, h=32, n=8)
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"  # the budget search names layers in its pipeline text by node name
    src = tmp_path / "in.onnx"
    onnxpress.save(model, src)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    ev = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    labels = {**_labelled(src, x), **_labelled(src, ev)}  # the fp32 model is 100% accurate by construction
    (tmp_path / "mytask.py").write_text(TASK_FILE.format(labels=labels))
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "eval.npz", x=ev)
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "--budget", "accuracy_drop<=2%", "--task", f"{tmp_path / 'mytask.py'}:accuracy",
                "--calibration", str(tmp_path / "calib.npz"), "--inputs", str(tmp_path / "eval.npz"), "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["budget"]["passed"] and report["budget"]["metrics"]["accuracy_drop"] <= 0.02
    assert report["budget"]["metrics"]["reference_accuracy"] == 1.0
    assert report["bytes_after"] < report["bytes_before"]
    # the same callable from Python, as a function object, for a pipeline run: reported task metrics
    import importlib.util

    spec = importlib.util.spec_from_file_location("mytask", tmp_path / "mytask.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, rep = onnxpress.optimize(model, "qdq(mode=weight)", task=mod.accuracy, evaluation=[{"x": ev}])
    assert rep.task_metrics["reference_accuracy"] == 1.0 and 0.9 <= rep.task_metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("spec, message", [("nosuchmodule_xyz:fn", "cannot import"), ("FILE:broken", "no numbers"), ("FILE:missing", "no callable")])
def test_bad_user_task_is_one_line_exit_2(tmp_path, capsys, spec, message):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(k=16, h=32, n=8), src)
    (tmp_path / "mytask.py").write_text(TASK_FILE.format(labels={}))
    spec = spec.replace("FILE", str(tmp_path / "mytask.py"))
    np.savez(tmp_path / "eval.npz", x=np.zeros((16, 16), np.float32))
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "-p", "qdq(mode=weight)", "--task", spec, "--inputs", str(tmp_path / "eval.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_0d_array_in_calibration_data_is_shared_by_every_sample(tmp_path):
    """An audio model's sample rate is one scalar for all samples: it has no sample axis and is not split."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "sr"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]), onnx.helper.make_tensor_value_info("sr", onnx.TensorProto.FLOAT, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((12, 1, 4)).astype(np.float32), sr=np.array(2.0, np.float32))
    data = rundata.prepare(model, calibration=tmp_path / "c.npz")
    assert len(data.evaluation) == 8 and all(float(f["sr"]) == 2.0 for f in data.evaluation + data.calibration)


def test_a_held_out_mean_must_clear_the_budget_by_its_standard_error():
    """8 held-out samples whose mean just meets the budget with a wide spread are not enough evidence."""
    from onnxpress.budget import Budget

    per = metrics.SampleMetrics(cos=[0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.96, 0.99])
    summary = per.summary()
    assert summary["cos"] == pytest.approx(0.993) and summary["cos_se"] == pytest.approx(np.std(per.cos, ddof=1) / np.sqrt(8))
    budget = Budget.parse("cos>=0.99")
    assert budget.ok(summary["cos"]) and not budget.ok_with_confidence(summary["cos"], summary["cos_se"])
    assert budget.ok_with_confidence(0.995, 0.001) and Budget.parse("rel_l2<=0.05").ok_with_confidence(0.04, 0.005)
    assert not Budget.parse("rel_l2<=0.05").ok_with_confidence(0.045, 0.005)
    # the standard error travels with the worst output
    worst = metrics.worst([{"cos": 0.99, "cos_se": 0.001}, {"cos": 0.97, "cos_se": 0.02}])
    assert worst == {"cos": 0.97, "cos_se": 0.02}


def test_accept_conditions_on_a_task_decide_a_pipeline_verdict():
    from onnxpress.models import digits

    model = str(digits.build("mlp"))
    _, report = onnxpress.optimize(model, "qdq(mode=weight)", task="digits", accept=["accuracy_drop<=1%", "agreement>=0.5"])
    assert [a["condition"] for a in report.acceptance] == ["accuracy_drop<=1%", "agreement>=0.5"]
    assert report.acceptance[0]["value"] == report.task_metrics["accuracy_drop"] and report.passed
    assert not report.validation_decides and report.validation is not None  # the output comparison is still reported
    _, strict = onnxpress.optimize(model, "qdq(mode=weight)", task="digits", accept="agreement>=1.01")
    assert not strict.passed and not strict.acceptance[0]["passed"]
    # without --accept (and no task default), the output floor decides as before
    _, plain = onnxpress.optimize(model, "qdq(mode=weight)", task="digits")
    assert plain.acceptance == [] and plain.validation_decides
    with pytest.raises(UsageError, match="a --budget is its own"):
        onnxpress.optimize(model, budget="accuracy_drop<=1%", task="digits", accept="agreement>=0.5")
