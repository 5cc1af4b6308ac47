"""Rendering of reports as rich tables (the CLI prints them; the API never prints)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.3f} MB"


def render_validation(report) -> Table:
    table = Table(title=f"Validation on {report.provider} ({report.tolerance.describe()}, {report.samples} input set(s))")
    for col in ("output", "shape", "max abs", "rel L2", "cosine", "verdict"):
        table.add_column(col, justify="right" if col not in ("output", "verdict") else "left")
    for o in report.outputs:
        verdict = "[green]ok[/]" if o.within_tolerance else f"[red]FAIL[/] {o.note}"
        table.add_row(o.name, str(list(o.shape)), f"{o.max_abs:.3g}", f"{o.rel_l2:.3g}", f"{o.cosine:.6f}", verdict)
    return table


def render_bisect(report) -> Table:
    table = Table(title=f"Bisect: validation after every pass ({report.bisect[0][1].tolerance.describe()})")
    for col in ("after pass", "max abs", "rel L2", "min cosine", "verdict"):
        table.add_column(col, justify="left" if col in ("after pass", "verdict") else "right")
    for text, r in report.bisect:
        worst_abs = max(o.max_abs for o in r.outputs)
        worst_l2 = max(o.rel_l2 for o in r.outputs)
        table.add_row(text, f"{worst_abs:.3g}", f"{worst_l2:.3g}", f"{r.min_cosine:.6f}", "[green]ok[/]" if r.passed else "[red]FIRST FAILURE[/]")
    return table


def render_passes(stats) -> Table:
    table = Table(title="Passes")
    for col in ("pass", "time s", "nodes", "initializer bytes", "params", "modified"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for s in stats:
        table.add_row(
            s.text,
            f"{s.seconds:.3f}",
            f"{s.before.nodes} -> {s.after.nodes}",
            f"{s.before.initializer_bytes:,} -> {s.after.initializer_bytes:,}",
            f"{s.before.parameters:,} -> {s.after.parameters:,}",
            "yes" if s.modified else "no",
        )
    return table


def render_details(stats) -> list[Table]:
    tables = []
    for s in stats:
        rows = [d for d in s.details if isinstance(d, dict)]
        if not rows or s.name in ("dedup", "cse"):
            continue
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        table = Table(title=f"{s.text}: per layer")
        for k in keys:
            table.add_column(k)
        for row in rows[:200]:
            table.add_row(*(_fmt(row.get(k, "")) for k in keys))
        if len(rows) > 200:
            table.caption = f"{len(rows) - 200} more rows in the JSON report"
        tables.append(table)
    return tables


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_metrics(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    return table
