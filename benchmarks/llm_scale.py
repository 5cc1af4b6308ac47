"""Scale of the LLM path: llama-type models with random weights, built from a transformers ``LlamaConfig`` at
a few sizes (up to ~1.1 B parameters), go through the same stages as SmolLM2:

1. ``init``: ``LlamaForCausalLM(config)`` with random weights, saved as a Hugging Face folder (fp32
   safetensors + the tiny test tokenizer, which the folder only needs to exist);
2. ``export``: ``onnxpress.llm.export.export_causal_lm`` (onnxruntime-genai's builder, fp32, external data);
3. ``int4``: ``qdq(mode=int4,weight_method=rtn,accuracy_level=4)`` on the exported decoder, written by
   ``optimize(output=int4/model.onnx)`` as an onnxruntime-genai folder (load, the pass, the folder's save);
4. ``generate``: onnxruntime-genai loads the int4 folder and generates 8 greedy tokens.

Every stage runs in its own process: wall time from start to exit (interpreter and imports included) and
that process's own peak RSS (VmHWM; the export stage also reports the builder child's peak) and CPU seconds
(the machine is shared: wall time follows its load, CPU time the work). RTN, not GPTQ:
GPTQ needs a Hessian per weight and calibration forwards of the fp32 model, which at 1 B parameters on two
cores would take most of an hour; RTN is the same graph and the same save, so size and memory scale the same.

    python benchmarks/llm_scale.py --markdown benchmarks/results/llm_scale.md
    python benchmarks/llm_scale.py --sizes 125m --keep /tmp/llm-scale      # one size, keep the folders
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import file_mb, machine, markdown_table, peak_rss_mb, run_child  # noqa: E402

# llama-type shapes (GQA, SwiGLU MLP, untied 32000-token embedding and head, like Llama-2 / TinyLlama)
SIZES = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    "500m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}
VOCAB = 32000
PIPELINE = "qdq(mode=int4,weight_method=rtn,accuracy_level=4)"
STAGES = ("init", "export", "int4", "generate")


def _config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZES[size])


def params_of(size: str) -> int:
    """Parameters of the config, counted from its shapes (no model built)."""
    c = SIZES[size]
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return layers * per_layer + 2 * VOCAB * d + d


# -- stages (each one a child process) ---------------------------------------------------------------------
def stage_init(size: str, work: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from onnxpress.models import smollm

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(size)).eval()  # transformers' own init: normal(0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    hf = work / "hf"
    model.save_pretrained(hf)
    smollm.tiny_tokenizer().save_pretrained(hf)
    return {"params": params, "hf_mb": sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 1e6}


def stage_export(size: str, work: Path) -> dict:
    from onnxpress.llm.export import export_causal_lm

    info = export_causal_lm(work / "hf", work / "fp32")
    shutil.rmtree(work / "hf")  # the safetensors copy is not needed again; disk is shared
    return {"builder_seconds": info.build_seconds, "builder_peak_rss_mb": info.builder_peak_rss_bytes / 1e6,
            "fp32_mb": file_mb(work / "fp32" / "model.onnx")}


def stage_int4(size: str, work: Path) -> dict:
    """The user's path: ``optimize`` of the genai folder's model into a new folder, which is then a whole
    onnxruntime-genai folder (``onnxpress.llm.folder``)."""
    import onnxpress

    marks: dict[str, float] = {}
    start = time.perf_counter()
    _, report = onnxpress.optimize(str(work / "fp32" / "model.onnx"), PIPELINE, validate_result=False, output=work / "int4" / "model.onnx",
                                   on_stage=lambda text: marks.setdefault(text, time.perf_counter()))
    end = time.perf_counter()
    return {"pass_seconds": sum(p.seconds for p in report.passes), "optimize_seconds": end - start,
            "save_seconds": end - marks.get("saving", end), "int4_mb": file_mb(work / "int4" / "model.onnx"),
            "files": sorted(p.name for p in (work / "int4").iterdir())}


def stage_generate(size: str, work: Path) -> dict:
    import onnxruntime_genai as og

    from onnxpress.llm.folder import genai_generate

    start = time.perf_counter()
    og.Model(str(work / "int4"))  # load alone, timed apart from generation
    loaded = time.perf_counter()
    tokens = genai_generate(work / "int4", list(range(3, 19)), 8)
    return {"load_seconds": loaded - start, "generate_seconds": time.perf_counter() - loaded, "tokens": len(tokens)}


def child(stage: str, size: str, work: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = globals()[f"stage_{stage}"](size, work)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb(), "cpu_s": cpu_seconds()}))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and the children it waited for (the builder): on a shared
    machine the wall time follows the load, the CPU time follows the work."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- driver ------------------------------------------------------------------------------------------------
def run_size(size: str, work: Path, log) -> dict:
    row: dict = {"size": size, "params_counted": params_of(size)}
    for stage in STAGES:
        run = run_child([sys.executable, __file__, "--child", stage, size, str(work)])
        if run.returncode:
            row[stage] = {"failed": run.stderr.strip().splitlines()[-1][:300] if run.stderr.strip() else f"exit {run.returncode}"}
            log(f"{size} {stage} FAILED: {row[stage]['failed']}")
            break
        row[stage] = {**json.loads(run.stdout.strip().splitlines()[-1]), "wall_s": run.wall_s, "load1": os.getloadavg()[0]}
        log(f"{size} {stage}: {json.dumps(row[stage])}")
    return row


def _get(row: dict, stage: str, key: str) -> float | None:
    value = row.get(stage, {}).get(key)
    return None if value is None else float(value)


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


RSS_KEY = {"init": "peak_rss_mb", "export": "builder_peak_rss_mb", "int4": "peak_rss_mb", "generate": "peak_rss_mb"}


def _params(row: dict) -> int:
    return row.get("init", {}).get("params", row["params_counted"])


def _marginal_rows(rows: list[dict]) -> list[list[str]]:
    """Per pair of consecutive sizes, each stage's extra CPU seconds and extra peak RSS per 100 M extra
    parameters: constant from pair to pair = linear growth (plus a fixed part: imports, the tokenizer, the
    graph); rising = worse than linear."""
    out = []
    for small, large in zip(rows, rows[1:]):
        extra = (_params(large) - _params(small)) / 1e8
        line = [f"{small['size']} -> {large['size']}", f"{extra * 100:.0f}"]
        for stage in STAGES:
            for key, scale, digits in (("cpu_s", 1.0, 1), (RSS_KEY[stage], 1.0, 0)):
                a, b = _get(small, stage, key), _get(large, stage, key)
                line.append("-" if a is None or b is None else _cell((b - a) * scale / extra, digits))
        out.append(line)
    return out


def markdown(rows: list[dict], argv: list[str]) -> str:
    table = []
    for r in rows:
        c = SIZES[r["size"]]
        cells = [f"{r['size']} ({c['num_hidden_layers']} x {c['hidden_size']}, ffn {c['intermediate_size']}, GQA {c['num_attention_heads']}/{c['num_key_value_heads']})",
                 f"{_params(r) / 1e6:.0f}", _cell(_get(r, "export", "fp32_mb")), _cell(_get(r, "int4", "int4_mb"), 1)]
        for stage in STAGES:
            rss = _get(r, stage, RSS_KEY[stage])
            cells += [f"{_cell(_get(r, stage, 'wall_s'))} / {_cell(_get(r, stage, 'cpu_s'))}", _cell(None if rss is None else rss / 1e3, 2)]
        cells.append(" / ".join(_cell(_get(r, s, "load1"), 1) for s in STAGES))
        table.append(cells)
    columns = ["model", "params M", "fp32 MB", "int4 MB"]
    for stage in STAGES:
        columns += [f"{stage} wall / CPU s", f"{stage} RSS GB"]
    columns.append("load avg after each stage")
    marginal_columns = ["sizes", "extra params M"] + [f"{stage} {what}" for stage in STAGES for what in ("CPU s / 100M", "RSS MB / 100M")]
    return (
        "# LLM scale: random-weight llama models through export and int4\n\n"
        f"Command: `.venv/bin/python benchmarks/llm_scale.py {' '.join(argv)}` on {datetime.date.today().isoformat()}. "
        f"Machine: {machine()}; shared with other engineers' jobs (1-minute load average after each stage in the last column): "
        "wall time follows the load, CPU time (user + system, the stage's process and the children it waited for) follows the work.\n\n"
        f"Stages, each its own process (RSS = that process's VmHWM): init = `LlamaForCausalLM(LlamaConfig(...))`, random weights, "
        f"saved as fp32 safetensors; export = onnxruntime-genai's builder through `onnxpress.llm.export` (RSS: the builder child's "
        f"peak); int4 = `onnxpress.optimize(fp32/model.onnx, \"{PIPELINE}\", output=int4/model.onnx)` (load, pass, save of the "
        "onnxruntime-genai folder); generate = onnxruntime-genai loads the int4 folder and generates 8 tokens. "
        f"Untied embedding and head, vocab {VOCAB}.\n\n" + markdown_table(columns, table) + "\n\n"
        "Marginal cost between consecutive sizes (the same figure from pair to pair = linear in size):\n\n"
        + markdown_table(marginal_columns, _marginal_rows(rows)) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--keep", help="build under this folder and keep it (default: a temporary folder, removed per size)")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "SIZE", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        stage, size, work = args.child
        child(stage, size, Path(work))
        return
    began = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {text}", flush=True)

    rows = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size} (valid: {', '.join(SIZES)})")
        base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llm-scale-"))
        work = base / size if args.keep else base
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            rows.append(run_size(size, work, log))
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
        text = markdown(rows, sys.argv[1:])
        if args.markdown:  # rewritten after every size: a run cut short still leaves its rows
            Path(args.markdown).write_text(text + "\n<!-- raw: " + json.dumps(rows) + " -->\n")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
