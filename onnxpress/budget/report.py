"""The budget report: rich tables and the size-vs-fidelity (Pareto) plot of a ``BudgetResult``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from onnxpress.render import TEXT_CAP, WORST_LAYERS, safe, size_change, text_table

if TYPE_CHECKING:  # pragma: no cover
    from onnxpress.budget.result import BudgetResult


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.2f}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3e}"
    return f"{value:.5f}"


def summary_table(result: BudgetResult) -> Any:
    """The search's outcome.  Every user- or model-derived string (budget text, pipeline with layer names,
    metric names of a user's task, notes) is a literal ``Text`` (``render.safe``), never rich markup."""
    table = text_table(f"budget {result.budget.text or result.budget}: {'met' if result.passed else 'NOT met'}", ("", ""), show_header=False)
    table.columns[0].style = "bold"
    table.add_row("size", f"{_mb(result.bytes_before)} MB -> {_mb(result.bytes_after)} MB ({size_change(result.bytes_before, result.bytes_after)}; predicted {_mb(result.predicted_bytes)} MB)")
    se = result.attempts[-1].get("standard_error", 0.0) if result.attempts else 0.0
    se_text = f" ± {se:.2g} s.e.; met means clearing the budget by 1.645 s.e." if se else ""
    table.add_row(f"{result.budget.metric} (held-out: the verdict)", f"{_fmt(result.value)}{se_text} (budget {result.budget.op} {result.budget.value:g}; measured on the built model, {result.evaluation})")
    table.add_row(f"{result.budget.metric} (fit set)", f"{_fmt(result.fit_value)} (the same model on the calibration data the search fitted to; for comparison only)")
    others = {k: v for k, v in result.metrics.items() if k not in (result.budget.metric, "d")}
    if others:
        table.add_row("other metrics", safe(", ".join(f"{k} {_fmt(v)}" for k, v in others.items()), cap=TEXT_CAP))
    table.add_row("pipeline", safe(result.pipeline, cap=None))
    table.add_row("time", ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    table.add_row("builds", f"{len(result.attempts)} (checks on the path: {sum(1 for p in result.points if p.kind == 'path')})")
    measured = sum(1 for c in result.candidates if c.get("measured", True))
    table.add_row("candidates", f"{len(result.candidates)} ({measured} measured in onnxruntime, {len(result.candidates) - measured} predicted from the layer's gain)")
    for note in result.notes:
        table.add_row("note", safe(note, cap=TEXT_CAP))
    return table


def layer_table(result: BudgetResult, worst: int | None = None) -> Any:
    """Every layer's decision (``worst=None``), or the ``worst`` layers by their error alone; then a totals
    row over all layers (bytes before -> after)."""
    layers = list(result.layers)
    shown = layers if worst is None else sorted(layers, key=lambda r: -(r.error_alone if r.error_alone == r.error_alone else math.inf))[:worst]
    caption = None if len(shown) == len(layers) else f"the {len(shown)} layers of {len(layers)} with the largest error alone (d); --verbose (or the JSON report) shows all"
    columns = (("layer", "left"), ("op", "left"), ("shape", "left"), ("choice", "left"), ("rank", "right"), ("KB before", "right"), ("KB after", "right"), ("error alone (d)", "right"))
    table = text_table("per-layer decisions", columns, caption=caption)
    for row in shown:
        table.add_row(
            safe(row.name), safe(row.op), "x".join(map(str, row.shape)), safe(row.choice), "" if row.rank is None else str(row.rank),
            f"{row.bytes_before / 1e3:.1f}", f"{row.bytes_after / 1e3:.1f}", _fmt(row.error_alone),
        )
    if layers:
        before, after = sum(r.bytes_before for r in layers), sum(r.bytes_after for r in layers)
        table.add_section()
        table.add_row(Text(f"total: {len(layers)} layers", style="bold"), "", "", "", "", f"{before / 1e3:.1f}", f"{after / 1e3:.1f}", size_change(before, after))
    return table


def points_table(result: BudgetResult) -> Any:
    table = text_table(f"size vs {result.budget.metric} (simulated unless 'built')", ("configuration", "kind", "MB", "predicted d", result.budget.metric, "meets budget"))
    rows = [p for p in result.points if p.kind != "path"] + sorted((p for p in result.points if p.kind == "path"), key=lambda p: -p.bytes)
    for p in rows:
        table.add_row(safe(p.label, cap=TEXT_CAP), p.kind, _mb(p.bytes), _fmt(p.predicted_d), _fmt(p.value), "" if p.passed is None else ("yes" if p.passed else "no"))
    return table


def renderables(result: BudgetResult, verbose: bool = False) -> list[Any]:
    """Summary, per-layer decisions (the worst layers and totals unless ``verbose``), size vs metric."""
    return [summary_table(result), layer_table(result, None if verbose else WORST_LAYERS), points_table(result)]


_COLOURS = {"int8": "tab:blue", "int4": "tab:green", "lowrank+int8": "tab:orange", "lowrank+int4": "tab:red", "lowrank": "tab:purple"}


def plot(result: BudgetResult, path: Path) -> Path:
    """Two panels: the model size vs the budget metric (path checks, uniform baselines, the built model,
    the budget line), and every (layer, candidate) as bytes saved vs error alone, by technique."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    metric = result.budget.metric
    path_pts = sorted((p for p in result.points if p.kind == "path" and p.value is not None), key=lambda p: p.bytes)
    ok = [p for p in path_pts if p.passed]
    bad = [p for p in path_pts if not p.passed]
    if ok:
        ax.scatter([p.bytes / 1e6 for p in ok], [p.value for p in ok], c="tab:green", s=22, label="search: configuration meets budget")
    if bad:
        ax.scatter([p.bytes / 1e6 for p in bad], [p.value for p in bad], c="tab:red", marker="x", s=26, label="search: breaks budget")
    for p in result.points:
        if p.kind == "baseline" and p.value is not None:
            ax.scatter([p.bytes / 1e6], [p.value], marker="s", s=40, edgecolors="black", facecolors="none")
            ax.annotate(p.label.split(" (")[0], (p.bytes / 1e6, p.value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    built = [p for p in result.points if p.kind == "built"]
    if built:
        b = built[-1]
        ax.scatter([b.bytes / 1e6], [b.value], marker="*", s=260, c="gold", edgecolors="black", zorder=5, label=f"chosen, built: {b.bytes / 1e6:.3f} MB")
    ax.axhline(result.budget.value, color="grey", linestyle="--", linewidth=1, label=f"budget {result.budget.op} {result.budget.value:g}")
    xs = [p.bytes / 1e6 for p in result.points if p.value is not None and math.isfinite(p.value)]
    if xs:  # zoom on the configurations measured (the fp32 size is in the title)
        ax.set_xlim(min(xs) * 0.9, max(xs) * 1.08)
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(metric)
    ax.set_title(f"size vs {metric} ({result.evaluation})", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)

    chosen = {(r.name, r.choice) for r in result.layers}
    for tech, colour in _COLOURS.items():
        pts = [c for c in result.candidates if c["technique"].split("/")[0] == tech and c.get("measured", True)]
        if pts:
            bx.scatter([(c["bytes_before"] - c["bytes"]) / 1e3 for c in pts], [max(c["d"], 1e-12) for c in pts], s=14, c=colour, alpha=0.7, label=tech)
        guessed = [c for c in result.candidates if c["technique"].split("/")[0] == tech and not c.get("measured", True)]
        if guessed:
            bx.scatter([(c["bytes_before"] - c["bytes"]) / 1e3 for c in guessed], [max(c["d"], 1e-12) for c in guessed], s=14, marker="+", c=colour, alpha=0.5, label=f"{tech} (predicted)")
    picked = [c for c in result.candidates if (c["layer"], c["choice"]) in chosen]
    if picked:
        bx.scatter([(c["bytes_before"] - c["bytes"]) / 1e3 for c in picked], [max(c["d"], 1e-12) for c in picked], s=70, facecolors="none", edgecolors="black", label="chosen per layer")
    bx.set_xscale("symlog", linthresh=1.0)
    bx.set_yscale("log")
    bx.set_xlabel("bytes saved by the layer's candidate (KB)")
    bx.set_ylabel("output error d of the candidate alone")
    bx.set_title("sensitivity: every (layer, candidate)", fontsize=10)
    bx.legend(fontsize=8, loc="best")
    bx.grid(alpha=0.3)
    fig.suptitle(f"onnxpress budget {result.budget.text or result.budget}: {result.bytes_before / 1e6:.2f} MB -> {result.bytes_after / 1e6:.3f} MB ({size_change(result.bytes_before, result.bytes_after)})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
