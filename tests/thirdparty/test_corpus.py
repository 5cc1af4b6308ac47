"""Public ONNX models this project did not export (``corpus.CORPUS``: PaddlePaddle, TorchScript and dynamo
exports, tf2onnx/Keras, spox, an onnxruntime-quantized model, LSTM/GRU, If subgraphs, external data), through
the default lossless pipeline, qdq static/weight/int4 and ``--target mobile``. Each lossy run validates within
the stated cosine floor on realistic inputs (``corpus.Entry.inputs_kind``) or skips in the pass with its reason."""

from __future__ import annotations

import onnxruntime as ort
import pytest

import corpus

FAST = [e for e in corpus.CORPUS if not e.slow]


def _params(entries):
    return [pytest.param(e, id=e.key, marks=[pytest.mark.slow] if e.slow else []) for e in entries]


@pytest.mark.parametrize("entry", _params(corpus.CORPUS))
def test_lossless_pipeline_validates(entry, fetched):
    path, calib, evals = fetched(entry)
    row = corpus.run_mode(entry, "lossless", path, calib, evals)
    assert row["outcome"] == "validated", row.get("reason")
    assert row["tolerance"].startswith("|a-b| <= 0.0001")  # the lossless elementwise tolerance
    # Size is reported, not asserted: simplify can grow a model (silero-vad-op15: 1.29 -> 1.79 MB, If branches).


@pytest.mark.parametrize("mode", corpus.MODES)
@pytest.mark.parametrize("entry", _params(corpus.CORPUS))
def test_qdq_validates_or_skips_with_reason(entry, mode, fetched):
    path, calib, evals = fetched(entry)
    row = corpus.run_mode(entry, mode, path, calib, evals)
    if mode in entry.skip:
        assert row["outcome"] == "skipped", row
        assert row["reason"]
        return
    if row["outcome"] == "skipped":
        # The pass skipped on its own: only for a reason it states (e.g. int4 covers MatMul/Gemm, the model has Conv only).
        assert row["reason"] and "covers MatMul and Gemm only" in row["reason"], row
        return
    assert row["outcome"] == "validated", row.get("reason")
    assert row["min_cosine"] >= entry.floors.get(mode, 0.99) - 0.02  # mean >= floor; the worst sample close to it
    assert row["layers"] >= 1 and row["bytes_after"] <= row["bytes_before"] * 1.05  # int4 of one small Gemm saves ~nothing


@pytest.mark.parametrize("entry", _params([e for e in corpus.CORPUS if e.key in corpus.MOBILE]))
def test_mobile_target_writes_loadable_ort(entry, fetched, tmp_path):
    path, _calib, evals = fetched(entry)
    row = corpus.run_mobile(entry, path, evals, tmp_path)
    assert row["outcome"] == "validated", row.get("reason")
    session = ort.InferenceSession(str(tmp_path / "mobile.ort"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] and row["ort_bytes"] > 1000
