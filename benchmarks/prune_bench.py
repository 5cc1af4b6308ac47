"""Benchmark of the ``prune`` and ``sparsify`` passes: plain magnitude and data-aware (calibrated) pruning side by
side, in the same run, on MiniLM and the digits models.

    .venv/bin/python benchmarks/prune_bench.py [--skip-minilm] [--skip-digits] [--runs 20] [--markdown PATH]

Rows: the pipeline, the share of zeros in the pruned layers, the model bytes on disk, the task metric of the
model's ``evaluate`` (MiniLM: mean/min embedding cosine against fp32 and nearest-neighbour agreement;
digits: top-1 accuracy drop), the median CPU latency (onnxruntime, 2 threads, MiniLM only) and the time of
the passes. The ``sparsify`` rows report the pruned layers' stored bytes (dense vs sparse) and the COO floor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from onnxpress import runtime
from onnxpress.pass_infra import PassContext
from onnxpress.pipeline import Pipeline

# benchmarks/ is on sys.path: Python puts a script's folder first
from common import latency_session, machine, median_latency_ms  # noqa: E402

COLUMNS = ("model", "pipeline", "zeros", "MB", "metric", "ms (2 thr)", "speed-up", "pass s", "note")


def run_pipeline(text: str, src: Path, calibration) -> tuple[Any, float, list[dict[str, Any]]]:
    model = ir.load(src)
    pipe = Pipeline.parse(text)
    start = time.perf_counter()
    result = pipe.run(model, context=PassContext(calibration=calibration))
    seconds = time.perf_counter() - start
    details = [d for s in result.stats for d in s.details]
    return result.model, seconds, details


def save(model: Any, path: Path) -> Path:
    """``onnxpress.save``: it writes the initializers ``sparsify`` planned as sparse initializers."""
    import onnxpress

    onnxpress.save(model, path, external_data=False)
    return path


def pruned_share(details: list[dict[str, Any]]) -> str:
    rows = [d for d in details if "params" in d]
    if rows:
        total = sum(d["params"] for d in rows)
        return f"{1 - sum(d['nonzeros_after'] for d in rows) / total:.1%}"
    rows = [d for d in details if "units_before" in d]
    if rows:
        return f"units -{1 - sum(d['units_after'] for d in rows) / sum(d['units_before'] for d in rows):.0%}"
    return "-"


def latency(path: Path, feed: dict[str, np.ndarray], runs: int) -> float:
    return median_latency_ms(latency_session(path), feed, runs)


def paired_latency(base: Path, path: Path, feed: dict[str, np.ndarray], runs: int) -> tuple[float, float]:
    """Median ms of the fp32 model and the candidate, timed alternately so both see the same machine load."""
    sessions = [latency_session(p) for p in (base, path)]
    for s in sessions:
        for _ in range(3):
            runtime.run(s, feed)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            runtime.run(s, feed)
            times[i].append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def sparse_bytes(proto: onnx.ModelProto, names: set[str]) -> tuple[int, int]:
    """(stored bytes of the named tensors, dense bytes they stand for) in a sparsified proto."""
    stored = dense = 0
    for s in proto.graph.sparse_initializer:
        if s.values.name in names:
            stored += len(s.values.raw_data) + len(s.indices.raw_data)
            dense += int(np.prod(s.dims)) * onnx.helper.tensor_dtype_to_np_dtype(s.values.data_type).itemsize
    for t in proto.graph.initializer:
        if t.name in names:
            stored += len(t.raw_data)
            dense += len(t.raw_data)
    return stored, dense


def pruned_weight_names(model: ir.Model, details: list[dict[str, Any]]) -> set[str]:
    layers = {d["layer"] for d in details if "params" in d}
    return {n.inputs[1].name for n in model.graph if n.name in layers and len(n.inputs) > 1 and n.inputs[1] is not None}


def minilm_suite(runs: int, tmp: Path, only: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    from onnxpress.models import minilm

    src = Path(minilm.build())
    cal = minilm.calibration_feeds(n=80)
    feed = minilm.evaluation_feeds(batch_size=8)[0]
    notes = [f"MiniLM: {len(cal)} calibration batches (80 sentences), 250 evaluation sentences; latency on a batch of {feed['input_ids'].shape}"]
    base_ms = latency(src, feed, runs)
    rows = [{"model": "MiniLM", "pipeline": "fp32", "zeros": "-", "MB": src.stat().st_size / 1e6, "metric": "cos 1.0000",
             "ms (2 thr)": base_ms, "speed-up": 1.0, "pass s": 0.0, "note": ""}]
    linear = "prune(sparsity=0.5{})"
    cases = [
        ("magnitude 50%", linear.format(",scope=layer"), False),
        ("Wanda 50%", linear.format(",calibrated=true"), False),
        ("Wanda + SparseGPT 50%", linear.format(",calibrated=true,update=true,solver=sparsegpt"), False),
        ("Wanda + refit 50%", linear.format(",calibrated=true,update=true"), False),
        ("magnitude 2:4", "prune(method=nm)", False),
        ("Wanda 2:4", "prune(method=nm,calibrated=true)", False),
        ("structured 25% (weight norms)", "prune(method=structured,sparsity=0.25)", True),
        ("structured 25% calibrated", "prune(method=structured,sparsity=0.25,calibrated=true)", True),
        ("structured 25% calibrated+update", "prune(method=structured,sparsity=0.25,calibrated=true,update=true)", True),
        ("magnitude 80% + sparsify", "prune(sparsity=0.8,scope=layer),sparsify", False),
        ("Wanda + refit 80% + sparsify", "prune(sparsity=0.8,calibrated=true,update=true),sparsify", False),
    ]
    for label, text, timed in cases:
        if only and not any(o in label for o in only):
            continue
        model, seconds, details = run_pipeline(text, src, cal)
        path = save(model, tmp / f"minilm-{len(rows)}.onnx")
        m = minilm.evaluate(str(path))
        row = {"model": "MiniLM", "pipeline": f"{label}: {text}", "zeros": pruned_share(details), "MB": path.stat().st_size / 1e6,
               "metric": f"cos {m['mean_cos']:.4f} min {m['min_cos']:.3f} NN {m['nn_agreement']:.0%}", "pass s": seconds, "note": ""}
        if timed:
            base, ms = paired_latency(src, path, feed, runs)
            row.update({"ms (2 thr)": ms, "speed-up": base / ms, "note": f"fp32 {base:.1f} ms in the same alternating runs"})
        if "sparsify" in text:
            names = pruned_weight_names(ir.load(src), details)
            stored, dense = sparse_bytes(onnx.load(str(path)), names)
            sp_rows = [d for d in details if "floor_bytes" in d and "skipped" not in d and d["initializer"] in names]
            floor = sum(d["floor_bytes"] for d in sp_rows)
            row["note"] = (f"pruned layers {dense / 1e6:.2f} MB dense -> {stored / 1e6:.2f} MB sparse ({dense / stored:.2f}x), "
                           f"floor {floor / 1e6:.2f} MB (+{stored / floor - 1:.1%}), index types {sorted({d['index_type'] for d in sp_rows})}")
        rows.append(row)
        print(row, flush=True)
    return rows, notes


def digits_suite(tmp: Path) -> list[dict[str, Any]]:
    from onnxpress.models import digits

    rows = []
    for kind in ("mlp", "cnn"):
        src = Path(digits.build(kind))
        cal = digits.calibration_feeds(kind, n=512, batch_size=64)
        ref = digits.evaluate(str(src), kind=kind)
        rows.append({"model": f"digits-{kind}", "pipeline": "fp32", "zeros": "-", "MB": src.stat().st_size / 1e6,
                     "metric": f"top-1 {ref['accuracy']:.2%}", "pass s": 0.0, "note": ""})
        cases = [
            ("magnitude 80%", "prune(sparsity=0.8,scope=layer)"),
            ("magnitude 80% global", "prune(sparsity=0.8,scope=global)"),
            ("Wanda 80%", "prune(sparsity=0.8,calibrated=true)"),
            ("Wanda + refit 80%", "prune(sparsity=0.8,calibrated=true,update=true)"),
            ("Wanda + refit 80% per layer", "prune(sparsity=0.8,calibrated=true,update=true,scope=layer)"),
            ("magnitude 80% global + sparsify", "prune(sparsity=0.8,scope=global),sparsify"),
            ("structured 25% calibrated", "prune(method=structured,sparsity=0.25,calibrated=true)"),
        ]
        for label, text in cases:
            model, seconds, details = run_pipeline(text, src, cal)
            path = save(model, tmp / f"digits-{kind}-{len(rows)}.onnx")
            m = digits.evaluate(str(path), kind=kind)
            row = {"model": f"digits-{kind}", "pipeline": f"{label}: {text}", "zeros": pruned_share(details), "MB": path.stat().st_size / 1e6,
                   "metric": f"top-1 {m['accuracy']:.2%} (drop {100 * m['accuracy_drop']:+.2f} pt)", "pass s": seconds,
                   "note": "" if any("units_before" in d for d in details) or "structured" not in text else "no block found"}
            if "structured" in text and not any("units_before" in d for d in details):
                reasons = sorted({d["skipped"] for d in details if "skipped" in d})
                row["note"] = "no block pruned: " + "; ".join(reasons)[:150]
            rows.append(row)
            print(row, flush=True)
    return rows


def cells(r: dict[str, Any]) -> list[str]:
    def f(key, fmt):
        v = r.get(key)
        return "-" if v is None else format(v, fmt)

    return [r["model"], r["pipeline"], r["zeros"], f("MB", ".2f"), r["metric"], f("ms (2 thr)", ".1f"), f("speed-up", ".2f"), f("pass s", ".1f"), r.get("note", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--only", action="append", default=[], help="run only MiniLM cases whose label contains this (repeatable)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        if not args.skip_digits:
            rows += digits_suite(Path(tmp))
        if not args.skip_minilm:
            minilm_rows, minilm_notes = minilm_suite(args.runs, Path(tmp), tuple(args.only))
            rows += minilm_rows
            notes += minilm_notes
    table = Table(title="prune / sparsify")
    for c in COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*cells(r))
    Console(width=250).print(table)
    for n in notes:
        print(n)
    if args.markdown:
        lines = [
            "# prune / sparsify vs plain magnitude pruning",
            "",
            f"Command: `.venv/bin/python benchmarks/prune_bench.py --markdown {args.markdown}`. Machine: {machine()}.",
            "Calibration: MiniLM `calibration_feeds(n=80)` (padding tokens left out); digits 512 training images. Evaluation:",
            "MiniLM 250 held-out sentences (mean / min cosine of the sentence embedding against fp32, nearest-neighbour",
            "agreement); digits 450 held-out images. \"zeros\": share of zeros in the pruned layers (MiniLM: its 36 MatMul",
            "weights; the word-embedding Gather table is never pruned). Latency: median of alternating fp32 / pruned runs.",
            "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
        lines += [""] + notes
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
