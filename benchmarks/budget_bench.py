"""Benchmark of ``onnxpress.budget.search`` (the accuracy budget) against the best single-technique peer,
onnxruntime's 4-bit MatMulNBits quantizer, both run here on the same models in the same run.

    .venv/bin/python benchmarks/budget_bench.py [--models minilm,digits,lm] [--jobs 2] [--markdown PATH] [--plots DIR]

Targets (issue 7): MiniLM at mean cosine >= 0.98: <= 11.4 MB; digits CNN at <= 1 point accuracy drop:
>= 10x smaller; small LM at <= 10% perplexity increase: >= 6x smaller. Each model's task metric comes
from its ``onnxpress.models`` module (``evaluate``), on its held-out evaluation data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnxpress.api import model_bytes

TARGETS = {
    # name: (task module, build kwargs, budget text, metric to show, size target text, check(size_ratio, mb))
    "minilm": ("minilm", {}, "mean_cos>=0.98", "mean_cos", "<= 11.4 MB", lambda ratio, mb: mb <= 11.4),
    "digits": ("digits", {"kind": "cnn"}, "accuracy_drop<=1%", "accuracy_drop", ">= 10x smaller", lambda ratio, mb: ratio >= 10.0),
    "lm": ("lm", {}, "ppl_increase_rel<=10%", "ppl_increase_rel", ">= 6x smaller", lambda ratio, mb: ratio >= 6.0),
}
# Calibration per model: MiniLM uses all 512 calibration sentences (disjoint from the 250 evaluation ones): the
# embedding split keeps the table rows the calibration text uses at 4 bits, so more text covers more of new text.
CALIBRATION = {"minilm": {"n": 512}}


def _base() -> str | None:
    """The lossless passes run before the search: ``strip-metadata`` (the exporter's per-node stack traces,
    0.67 MB of MiniLM) where this onnxpress has it. Not the whole default pipeline: its ``simplify``
    turns MatMul+Add into Gemm."""
    from onnxpress.registry import registry

    return "strip-metadata" if "strip-metadata" in registry() else None


BASE = _base()


def peer_matmulnbits(src: Path, out: Path) -> Path:
    """onnxruntime's MatMulNBits 4-bit quantizer (RTN, blocks of 32, asymmetric), MatMul and Gather."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=32, is_symmetric=False,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        q.process()
    onnx.save(q.model.model, str(out))
    return out


def _module(task: str):
    import importlib

    return importlib.import_module(f"onnxpress.models.{task}")


def _evaluate(module, model, kwargs):
    """The task metrics against the module's own fp32 build (``reference=None``: minilm reads its cached
    reference embeddings instead of re-running the fp32 model at every check)."""
    from onnxpress.tasks import with_relative

    if "kind" in kwargs:
        return with_relative(module.evaluate(model, kind=kwargs["kind"]))
    return with_relative(module.evaluate(model))


def run_one(name: str, jobs: int, plots: Path, tmp: Path) -> list[dict]:
    from onnxpress import budget, tasks
    from onnxpress.budget.progress import LogLines

    task, kwargs, budget_text, metric, target_text, check = TARGETS[name]
    module = _module(task)
    src = Path(module.build(**kwargs))
    fp32_bytes = model_bytes(onnx.load(str(src)))
    calib = module.calibration_feeds(**kwargs, **CALIBRATION.get(name, {}))
    rows = [{"model": name, "method": "fp32", "MB": fp32_bytes / 1e6, "ratio": 1.0, "metric": metric, "value": None, "seconds": 0.0, "budget": budget_text}]

    start = time.perf_counter()
    peer_path = peer_matmulnbits(src, tmp / f"{name}-nbits.onnx")
    peer_s = time.perf_counter() - start
    peer_bytes = model_bytes(onnx.load(str(peer_path)))
    peer_metrics = _evaluate(module, str(peer_path), kwargs)
    rows.append({"model": name, "method": "ORT MatMulNBits 4-bit RTN b32 (+Gather)", "MB": peer_bytes / 1e6, "ratio": fp32_bytes / peer_bytes,
                 "metric": metric, "value": peer_metrics.get(metric), "seconds": peer_s, "budget": budget_text,
                 "meets_budget": budget.Budget.parse(budget_text).ok(float(peer_metrics.get(metric, float("nan"))))})

    def evaluate(m):
        return _evaluate(module, m, kwargs)

    evaluate.accepts_session = tasks.resolve(task, str(src)).accepts_session  # score the simulation session, no model per check

    print(f"  {name}: searching {budget_text} ...", flush=True)
    start = time.perf_counter()
    result = budget.search(str(src), budget_text, calibration=calib, evaluate=evaluate, base=BASE, jobs=jobs, progress=True if sys.stderr.isatty() else LogLines(sys.stdout), cache=False, baselines=True)
    seconds = time.perf_counter() - start
    png = result.plot(plots / f"budget-{name}.png")
    ratio = fp32_bytes / result.bytes_after
    mb = result.bytes_after / 1e6
    rows.append({"model": name, "method": "onnxpress budget search", "MB": mb, "ratio": ratio, "metric": metric, "value": result.value,
                 "seconds": seconds, "budget": budget_text, "meets_budget": result.passed, "target": target_text, "target_met": bool(result.passed and check(ratio, mb)),
                 "pipeline": result.pipeline, "plot": str(png), "phases": result.seconds, "attempts": len(result.attempts),
                 "choices": _choice_summary(result), "measured": sum(1 for c in result.candidates if c.get("measured", True)),
                 "candidates": len(result.candidates)})
    return rows


def _choice_summary(result) -> str:
    counts: dict[str, int] = {}
    for row in result.layers:
        counts[row.choice] = counts.get(row.choice, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def render(rows: list[dict], machine: str) -> tuple[object, str]:
    from rich.table import Table

    table = Table(title=f"budget search vs ORT MatMulNBits 4-bit ({machine})")
    cols = ["model", "method", "budget", "MB", "ratio", "metric", "value", "meets budget", "target", "search s"]
    for c in cols:
        table.add_column(c)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["model"], r["method"], r["budget"], f"{r['MB']:.3f}", f"{r['ratio']:.2f}x", r["metric"], _fmt(r["value"]),
            "" if "meets_budget" not in r else ("yes" if r["meets_budget"] else "no"),
            "" if "target" not in r else f"{r['target']}: {'met' if r['target_met'] else 'NOT met'}",
            f"{r['seconds']:.1f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        if "pipeline" in r:
            notes.append(f"- **{r['model']}** per-layer choices: {r['choices']}; builds: {r['attempts']}; candidates measured in ORT: "
                         f"{r['measured']} of {r['candidates']} (the others predicted); phases (s): "
                         + ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items()) + f"; plot: `{r['plot']}`")
            notes.append(f"  pipeline: `{r['pipeline'][:600]}{'...' if len(r['pipeline']) > 600 else ''}`")
    return table, "\n".join(md + [""] + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,digits,lm")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--plots", type=Path, default=None, help="folder for the Pareto plots (default: the onnxpress cache)")
    args = ap.parse_args()
    from rich.console import Console

    from onnxpress.models import common

    plots = args.plots or (common.cache_dir() / "budget-plots")
    plots.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(run_one(name.strip(), args.jobs, plots, Path(tmp)))
    table, md = render(rows, machine)
    Console(width=200).print(table)
    print(md)
    if args.markdown:
        import onnxruntime

        head = (f"# budget search vs ORT MatMulNBits 4-bit\n\nCommand: `.venv/bin/python benchmarks/budget_bench.py --markdown {args.markdown}` "
                f"(peer built in the same run; search base pipeline: `{BASE or 'none'}`). Machine: {machine}, onnxruntime {onnxruntime.__version__}.\n\n")
        args.markdown.write_text(head + md + "\n")


if __name__ == "__main__":
    main()
