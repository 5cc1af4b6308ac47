"""``--holdout 0`` (documented in ``optimize --help`` as "0: none") turns the hold-out off: the verdict is on the
calibration data itself, and the report says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graphs import mlp_model

import onnxpress
from onnxpress import rundata
from onnxpress.cli import run


@pytest.mark.parametrize("text", ["0", "0.0"])
def test_parse_holdout_zero_is_no_holdout(text):
    assert rundata.parse_holdout(text) == 0


def test_cli_holdout_zero_validates_on_the_calibration_data_itself(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(k=16, h=32, n=8), src)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "-p", "qdq(mode=weight)", "--calibration", str(tmp_path / "calib.npz"),
                "--holdout", "0", "--min-cosine", "0.97", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["split"] is None and report["data"]["evaluation_feeds"] == report["data"]["calibration_feeds"]
    assert "--holdout 0" in report["validation"]["data"] and report["validation"]["samples"] == 48
