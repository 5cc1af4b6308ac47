"""--bisect names the first pass of a pipeline that breaks the tolerance."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from graphs import mlp_model

import onnxpress
from onnxpress.cli import run
from onnxpress.pass_infra import Pass, option
from onnxpress.registry import registry


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
    scale: float = option(0.0, "relative noise added to every weight")


class WeightNoise(Pass):
    """Test only: a deliberately lossy pass that adds relative Gaussian noise to every float initializer."""

    name = "noise"
    Options = NoiseOptions
    lossless = False

    def call(self, model):
        if self.options.scale == 0:
            return ir.passes.PassResult(model, False)
        rng = np.random.default_rng(12345)  # not mlp_model's seed: the noise must not be proportional to w
        for value in model.graph.initializers.values():
            w = value.const_value.numpy()
            noisy = w + self.options.scale * np.abs(w).mean() * rng.standard_normal(w.shape).astype(w.dtype)
            value.const_value = ir.tensor(noisy, name=value.name)
        return ir.passes.PassResult(model, True)


@pytest.fixture(autouse=True)
def _register_noise(monkeypatch):
    monkeypatch.setitem(registry(), "noise", WeightNoise)


def test_bisect_names_first_failing_pass():
    model = mlp_model()
    out, report = onnxpress.optimize(model, "dedup,noise(scale=0.001),noise(scale=0.5),cse", bisect=True, tolerance=onnxpress.Tolerance(min_cosine=0.999))
    assert report.first_failing_pass == "noise(scale=0.5)"
    assert [text for text, _ in report.bisect] == ["dedup", "noise(scale=0.001)", "noise(scale=0.5)"]
    assert report.bisect[1][1].passed and report.bisect[1][1].min_cosine > 0.999
    assert report.bisect[2][1].min_cosine < 0.999
    assert [s.name for s in report.passes] == ["dedup", "noise", "noise"]  # cse never ran


def test_bisect_all_passing():
    out, report = onnxpress.optimize(mlp_model(), "dedup,noise(scale=0.0001)", bisect=True)
    assert report.first_failing_pass is None
    assert report.passed and len(report.bisect) == 2


def test_bisect_cli(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnxpress.save(mlp_model(), src)
    out = tmp_path / "out.onnx"
    code = run(["optimize", str(src), "-o", str(out), "-p", "dedup,noise(scale=0.5),cse", "--bisect", "--min-cosine", "0.999"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "onnxpress: error: bisect: pass 'noise(scale=0.5)' is the first to break the tolerance (mean per-sample cosine >= 0.999); "
        "later passes were not run"
    )
    assert not out.exists()
