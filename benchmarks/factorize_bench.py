"""Benchmark of the ``factorize`` pass: plain SVD and data-aware (calibrated) factorization side by side, at
several parameter budgets, in the same run.

    .venv/bin/python benchmarks/factorize_bench.py [--skip-minilm] [--skip-lm] [--skip-digits] [--markdown PATH]

For each model and budget (``ratio``: fraction of every linear layer's parameters kept) it prints the share
of the linear layers' parameters kept, the model bytes, the task metric of the model's ``evaluate`` (MiniLM:
mean/min embedding cosine against fp32; LM: perplexity and its increase; digits: accuracy and agreement),
the median per-layer relative output error (calibrated rows) and the time of the pass itself.
Models come from ``onnxpress.models.<name>``; a model whose module is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from onnxpress.api import model_bytes
from onnxpress.pass_infra import PassContext
from onnxpress.pipeline import Pipeline

BUDGETS = {
    "digits": (0.5, 0.25, 0.1),
    "minilm": (0.9, 0.75, 0.5),
    "lm": (0.9, 0.75, 0.5),
}
COLUMNS = ("model", "pipeline", "linear kept", "MB", "metric", "fp32 / ref", "median layer out err", "pass s")


def linear_params(model: ir.Model) -> int:
    total = 0
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            tensor = ir.convenience.get_const_tensor(node.inputs[1])
            if tensor is None and node.inputs[1].producer() is not None and node.inputs[1].producer().op_type == "Transpose":
                tensor = ir.convenience.get_const_tensor(node.inputs[1].producer().inputs[0])
            if tensor is not None and len(tensor.shape) == 2:
                total += tensor.size
    return total


def run_pass(text: str, src: Path, calibration, out: Path) -> tuple[Path, float, list[dict[str, Any]]]:
    model = ir.load(src)
    p = Pipeline.parse(text).passes[0]
    p.context = PassContext(calibration=calibration)
    start = time.perf_counter()
    p(model)
    seconds = time.perf_counter() - start
    ir.save(model, out)
    return out, seconds, p.details


def metric_text(name: str, m: dict[str, Any]) -> tuple[str, str]:
    if name == "minilm":
        return f"cos mean {m['mean_cos']:.4f} min {m['min_cos']:.4f} nn {m['nn_agreement']:.3f}", ""
    if name == "lm":
        ppl = m.get("perplexity")
        ref = m.get("reference_perplexity")
        inc = (ppl / ref - 1) if (ppl is not None and ref) else m.get("perplexity_increase")
        return f"ppl {ppl:.3f} ({inc:+.1%})" if inc is not None else f"ppl {ppl:.3f}", f"{ref:.3f}" if ref else ""
    acc = m.get("accuracy")
    return f"acc {acc:.4f} agree {m.get('agreement', float('nan')):.4f}", f"{m.get('reference_accuracy', float('nan')):.4f}"


def suite(name: str, module: Any, src: Path, calibration, evaluate, budgets, tmp: Path) -> list[dict[str, Any]]:
    base = ir.load(src)
    total_linear = linear_params(base)
    rows = [{"model": name, "pipeline": "fp32", "linear kept": "100%", "MB": model_bytes(base) / 1e6,
             "metric": metric_text(name, evaluate(src))[0], "fp32 / ref": "", "median layer out err": "", "pass s": ""}]
    configs = []
    for ratio in budgets:
        configs.append(f"factorize(ratio={ratio})")
        configs.append(f"factorize(ratio={ratio},calibrated=true)")
        configs.append(f"factorize(ratio={ratio},calibrated=true,share=true)")
    for i, text in enumerate(configs):
        path, seconds, details = run_pass(text, src, calibration if "calibrated" in text else None, tmp / f"{name}_{i}.onnx")
        removed = sum(d.get("params_before", 0) - d.get("params_after", 0) for d in details)
        errors = [d["output_error"] for d in details if "output_error" in d]
        metric, ref = metric_text(name, evaluate(path))
        rows.append({
            "model": name, "pipeline": text, "linear kept": f"{1 - removed / total_linear:.1%}",
            "MB": model_bytes(ir.load(path)) / 1e6, "metric": metric, "fp32 / ref": ref,
            "median layer out err": f"{statistics.median(errors):.3f}" if errors else "",
            "pass s": f"{seconds:.1f}",
        })
    return rows


def load_module(name: str):
    try:
        return importlib.import_module(f"onnxpress.models.{name}")
    except ImportError as exc:
        print(f"{name}: skipped (onnxpress.models.{name} not available: {exc})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="factorize-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_digits and (digits := load_module("digits")):
            src = Path(digits.build("mlp"))
            rows += suite("digits", digits, src, digits.calibration_feeds("mlp"), lambda p: digits.evaluate(str(p), kind="mlp", reference=str(src)), BUDGETS["digits"], tmp)
        if not args.skip_minilm and (minilm := load_module("minilm")):
            src = Path(minilm.build())
            n_cal = min(256, len(minilm.calibration_sentences()))
            rows += suite("minilm", minilm, src, minilm.calibration_feeds(n=n_cal), lambda p: minilm.evaluate(str(p), reference=str(src)), BUDGETS["minilm"], tmp)
        if not args.skip_lm and (lm := load_module("lm")):
            src = Path(lm.build())
            rows += suite("lm", lm, src, lm.calibration_feeds(), lambda p: lm.evaluate(str(p), reference=str(src)), BUDGETS["lm"], tmp)
    table = Table(title=f"factorize: plain vs calibrated ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    for col in COLUMNS:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    Console(width=200).print(table)
    if args.markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |" for r in rows]
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import machine

        head = [
            "# factorize: plain SVD vs data-aware (calibrated) low-rank factorization",
            "",
            f"Command: `.venv/bin/python benchmarks/factorize_bench.py --markdown {args.markdown}`. Machine: {machine()}.",
            "`linear kept`: share of the parameters of all MatMul/Gemm weights that remain. `ratio`: fraction of each",
            "layer's parameters kept. MiniLM: 256 calibration sentences (all, up to 256), 250 evaluation sentences, cosine of sentence",
            "embeddings against fp32, `nn`: nearest-neighbour agreement. Digits: MLP 64-256-256-10, 64 calibration images,",
            "450 held-out images. `pass s`: time of the pass alone (calibrated: includes the one ORT run over the calibration data).",
            "",
        ]
        args.markdown.write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
