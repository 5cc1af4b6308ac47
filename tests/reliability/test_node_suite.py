"""The lossless default pipeline over every model of the ONNX backend test data (node tests + shipped suites)."""

import collections

import pytest
from node_suite import run_suite, summarize

from onnxpress.api import default_pipeline


@pytest.mark.slow
def test_default_pipeline_over_onnx_backend_test_data(capsys):
    results = run_suite(default_pipeline(), workers=2)
    counts = summarize(results)
    reasons = collections.Counter(r.split(":")[0] for _, s, r in results if s == "skipped")
    with capsys.disabled():
        print(f"\nONNX backend test data, pipeline {default_pipeline()}: {counts}; skip reasons: {reasons.most_common()}")
    failed = [(n, r) for n, s, r in results if s == "failed"]
    assert not failed, failed[:20]
    assert counts.get("matched", 0) > 1500  # the suite really ran: most models are rewritten and matched
