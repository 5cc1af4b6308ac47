"""The small byte-level GPT trained on Python standard-library source: export fidelity and held-out perplexity."""

import math

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.export import compare_with_module  # noqa: E402
from onnxpress.models import common, lm  # noqa: E402

PARAMETERS = 285_312


def test_byte_tokenizer_round_trip():
    ids = lm.encode("def f(x):\n    return 'é'")
    assert ids.dtype == np.int64 and ids.max() < lm.VOCAB
    assert lm.decode(ids) == "def f(x):\n    return 'é'"


def test_next_token_nll_of_uniform_logits_is_log_vocab():
    ids = np.array([[1, 2, 3, 4]])
    nll = lm.next_token_nll(np.zeros((1, 4, lm.VOCAB), np.float32), ids)
    assert nll.shape == (1, 3)
    np.testing.assert_allclose(nll, math.log(lm.VOCAB))
    confident = np.full((1, 4, lm.VOCAB), -30.0, np.float32)
    confident[0, np.arange(3), ids[0, 1:]] = 30.0
    assert lm.next_token_nll(confident, ids).max() < 1e-6


def test_corpus_and_feeds_are_disjoint():
    train, heldout = lm.corpus()
    assert len(train) > 1_000_000 and len(heldout) > 50_000
    assert not set(lm.TRAIN_FILES) & set(lm.HELDOUT_FILES)
    ev = lm.evaluation_feeds()
    assert sum(len(f["input_ids"]) for f in ev) == lm.EVAL_WINDOWS
    assert all(f["input_ids"].shape[1] == lm.CONTEXT and f["input_ids"].dtype == np.int64 for f in ev)
    cal = lm.calibration_feeds(n=16, batch_size=8)
    assert len(cal) == 2 and cal[0]["input_ids"].shape == (8, lm.CONTEXT)


def test_module_size():
    assert common.parameter_count(lm.make_module()) == PARAMETERS


def test_training_is_a_fixed_seeded_number_of_steps():
    # the first steps of the real recipe, twice: bit-identical weights (one torch thread, seeded data order)
    a, info_a = lm.train(steps=3)
    b, info_b = lm.train(steps=3)
    assert info_a["steps"] == info_b["steps"] == 3 and info_a["tokens_seen"] == 3 * lm.BATCH * lm.CONTEXT
    assert info_a["final_train_loss"] == info_b["final_train_loss"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], lm.make_module().state_dict()["head.weight"])  # it did train


def test_learning_rate_schedule_depends_on_the_step_only():
    rates = [lm.learning_rate(s) for s in range(lm.STEPS)]
    assert rates[0] == pytest.approx(lm.LEARNING_RATE / lm.WARMUP)
    assert max(rates) == pytest.approx(lm.LEARNING_RATE, rel=0.01) and rates[-1] == pytest.approx(0.1 * lm.LEARNING_RATE, rel=0.01)


def test_cache_key_follows_the_recipe():
    key = lm.recipe_digest()
    assert len(key) == 12 and key == lm.recipe_digest()
    assert lm.recipe_digest({**lm.RECIPE, "steps": lm.STEPS + 1}) != key
    assert lm.recipe_digest({**lm.RECIPE, "train_files": lm.TRAIN_FILES[:-1]}) != key


@pytest.mark.slow
def test_fp32_perplexity_far_below_uniform(lm_path):
    scores = lm.evaluate(lm_path)
    # uniform guessing over 256 byte values has perplexity 256; byte frequencies alone (unigram) about 23.6
    unigram = lm.unigram_perplexity()
    assert 20.0 < unigram < 30.0
    assert scores["perplexity"] < lm.FP32_MAX_PERPLEXITY < 0.6 * unigram
    assert scores["ppl_increase"] == 0.0 and scores["ppl_increase_rel"] == 0.0 and scores["top1_agreement"] == 1.0
    assert scores["tokens"] == lm.EVAL_WINDOWS * (lm.CONTEXT - 1)
    info = common.build_info(lm_path)
    assert info["perplexity"] == pytest.approx(scores["perplexity"], rel=1e-6)
    assert info["steps"] == lm.STEPS and info["recipe"] == lm.recipe_digest() and lm.recipe_digest() in lm_path.name
    assert info["unigram_perplexity"] == pytest.approx(unigram)


@pytest.mark.slow
def test_export_matches_torch_with_dynamic_batch_and_sequence(lm_path):
    model = onnxpress.load(lm_path)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "sequence"]
    assert model.graph.inputs[0].dtype == ir.DataType.INT64
    assert [str(d) for d in model.graph.outputs[0].shape][-1] == "256"
    net = lm.module()
    for batch, length in ((1, 7), (3, lm.CONTEXT)):
        (ids,) = lm.example_inputs(batch=batch, length=length)
        report = compare_with_module(net, lm_path, (ids,))
        assert report.outputs[0].shape == (batch, length, lm.VOCAB)
        assert report.outputs[0].max_abs < 1e-4


@pytest.mark.slow
def test_metric_sees_damage(lm_path):
    model = onnxpress.load(lm_path)
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        w = value.const_value.numpy()
        if w.ndim == 2 and w.shape == (lm.WIDTH, lm.MLP_WIDTH):
            value.const_value = ir.Tensor((w + rng.normal(0, 2 * w.std(), w.shape)).astype(np.float32), name=value.name)
    scores = lm.evaluate(model)
    assert scores["ppl_increase"] > 0.1 and scores["top1_agreement"] < 0.99
    assert scores["ppl_increase_rel"] == pytest.approx(scores["ppl_increase"] / scores["reference_perplexity"], rel=1e-9)
