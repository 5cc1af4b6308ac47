"""The built-in ``llm`` task through the orchestrator and the CLI: a causal LM with a KV cache gets real
calibration (prefill + decode steps) and held-out evaluation prose, perplexity / greedy agreement as
metrics and budget keys, from any working directory (external data)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

import onnxpress  # noqa: E402
from onnxpress.cli import run  # noqa: E402
from onnxpress.models import smollm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    return smollm.tiny_onnx() / "model.onnx"


def test_pipeline_with_task_llm_validates_on_held_out_prose(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the model's external data is found from anywhere
    out = tmp_path / "q.onnx"
    code = run(["optimize", str(tiny_model), "-o", str(out), "-p", "qdq(mode=int4,block_size=32)", "--task", "llm",
                "--min-cosine", "0.9", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert "task's evaluation data" in report["data"]["evaluation"] and not report["validation"]["generated"]
    assert report["validation"]["samples"] == 40  # one sample per held-out paragraph (prefill, empty past)
    metrics = report["task_metrics"]
    assert metrics["reference_perplexity"] > 1 and abs(metrics["ppl_increase_rel"]) < 0.5
    assert 0.0 <= metrics["greedy_agreement"] <= 1.0
    assert report["bytes_after"] < report["bytes_before"] / 2


def test_budget_on_perplexity_is_met_on_the_task_data(tiny_model):
    model, report = onnxpress.optimize(str(tiny_model), budget="ppl_increase_rel<=3%", task="llm", budget_options={"cache": False})
    assert report.budget.passed and report.budget.metrics["ppl_increase_rel"] <= 0.03
    assert report.bytes_after < report.bytes_before
    assert report.budget.metrics["reference_perplexity"] > 1
    # held-out truth: configurations are compared on selection paragraphs no pass calibrated on, the verdict is the
    # evaluation set's
    assert any("compares configurations on its fit data (20 selection paragraphs" in n for n in report.budget.notes)
    assert report.budget.fit_value != report.budget.value
    assert "factorize" not in report.budget.pipeline  # the llm task's grid: int8 / int4 per layer


def test_task_llm_without_a_tokenizer_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    import onnx

    onnx.save(onnx.load(str(smollm.tiny_onnx() / "model.onnx")), str(src), save_as_external_data=True, location="m.onnx.data")
    code = run(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", "qdq(mode=weight)", "--task", "llm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no tokenizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_export_causal_lm_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    code = run(["export", "--causal-lm", str(tmp_path / "notamodel"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("onnxpress: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a full export through onnxruntime-genai's builder (~1 minute)
def test_export_causal_lm_from_an_hf_folder_writes_a_genai_folder(tmp_path, capsys):
    out = tmp_path / "exported"
    code = run(["export", "--causal-lm", str(smollm.tiny_hf_folder()), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (out / name).is_file(), name
    # the exported folder is a valid target for the llm task straight away
    _, report = onnxpress.optimize(str(out / "model.onnx"), "qdq(mode=weight)", task="llm", validate_result=False)
    assert report.task_metrics["reference_perplexity"] > 1 and abs(report.task_metrics["ppl_increase_rel"]) < 0.05


def test_eval_task_llm_reports_perplexity_against_the_reference(tiny_model, tmp_path, capsys):
    out = tmp_path / "q" / "model.onnx"
    assert run(["optimize", str(tiny_model), "-o", str(out), "-p", "qdq(mode=weight)", "--no-validate"]) == 0
    capsys.readouterr()
    assert run(["eval", str(out), "--task", "llm", "--reference", str(tiny_model), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["reference_perplexity"] > 1 and 0 < abs(metrics["ppl_increase_rel"]) < 0.2
    assert run(["eval", str(out), "--task", "llm"]) == 2
    assert "--reference" in capsys.readouterr().err
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([list(range(5, 45)), list(range(100, 130))]))
    assert run(["eval", str(out), "--task", "llm", "--reference", str(tiny_model), "--eval-data", str(ids), "--json"]) == 0
    on_ids = json.loads(capsys.readouterr().out)
    assert on_ids["reference_perplexity"] != metrics["reference_perplexity"]  # the user's sequences, not the built-in text


def test_user_text_calibrates_and_the_task_decides_the_verdict(tiny_model, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(smollm_text() for _ in range(3)), encoding="utf-8")
    ids = tmp_path / "eval.npz"
    import numpy as np

    np.savez(ids, input_ids=np.random.default_rng(0).integers(5, 300, size=(6, 40)))
    out = tmp_path / "o" / "model.onnx"
    code = run(["optimize", str(tiny_model), "-o", str(out), "-p", "qdq(mode=int4,block_size=32)", "--task", "llm",
                "--calibration", str(text), "--eval-data", str(ids), "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert str(text) in report["data"]["calibration"] and "windows of up to 128" in report["data"]["calibration"]
    assert str(ids) in report["data"]["evaluation"] and report["validation"]["samples"] == 6
    # a lossy pipeline with the llm task: its perplexity condition decides, the output floor is reported only
    (condition,) = report["acceptance"]
    assert condition["condition"] == "ppl_increase_rel<=10%" and condition["value"] == report["task_metrics"]["ppl_increase_rel"]
    assert condition["passed"] and report["passed"] and report["validation_decides"] is False


def smollm_text() -> str:
    from onnxpress.models import llm_text

    return " ".join(llm_text.calibration_texts()[:2])


def test_a_failed_acceptance_exits_1_and_writes_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "o" / "model.onnx"
    code = run(["optimize", str(tiny_model), "-o", str(out), "-p", "qdq(mode=int4,block_size=32)", "--task", "llm",
                "--accept", "greedy_agreement>=0.999", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("onnxpress: error: not accepted on") and "greedy_agreement>=0.999 measured" in err[-1]
    assert not out.parent.exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "llm", "--calibration", "{short}"], "shorter than one sequence of 128 tokens"),
    (["--calibration", "{text}"], "need --task llm"),
    (["--accept", "accuracy_drop<=1%"], "--accept judges task metrics"),
    (["--task", "llm", "--accept", "accuracy_drop<=1%"], "the task reports no 'accuracy_drop'"),
    (["--task", "llm", "--calibration", "{text}", "--holdout", "0.5"], "--holdout splits .npz"),
])
def test_llm_data_and_acceptance_bad_input_is_one_line(tiny_model, tmp_path, capsys, args, message):
    (tmp_path / "short.txt").write_text("Too short.", encoding="utf-8")
    (tmp_path / "text.txt").write_text(smollm_text(), encoding="utf-8")
    args = [a.format(short=tmp_path / "short.txt", text=tmp_path / "text.txt") for a in args]
    out = tmp_path / "o" / "model.onnx"
    code = run(["optimize", str(tiny_model), "-o", str(out), "-p", "qdq(mode=weight)", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.parent.exists()
