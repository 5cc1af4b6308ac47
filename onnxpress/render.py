"""Rendering of reports as rich tables and lines (the CLI prints them; the API never prints).

Everything a model or a user can name (node, value and initializer names, pipeline text, op types and
domains, metadata, doc strings, paths) reaches rich only as ``rich.text.Text`` built by :func:`safe`:

- never as a ``str`` that rich would parse as markup (``[/m/encoder/...]`` is a closing tag to rich, and a
  ``MarkupError`` ended runs on every TorchScript model); colours are ``Text`` styles, never markup;
- control characters (ANSI escape sequences, newlines, bidi overrides) shown as visible escapes
  (``\\x1b[31m``), so a name cannot recolour, move the cursor or reorder the terminal's text;
- absurdly long names capped as ``head…tail (N chars)``; the JSON report keeps the full text.

Tables fold long cells onto more lines instead of cutting them with ``…``, and :func:`make_console`
prints piped output (CI logs, ``| tee``, files) at a width that keeps tables readable.
"""

from __future__ import annotations

import collections
import math
import os
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

# Width of piped output (stdout/stderr not a terminal) unless COLUMNS says otherwise: 80 columns (rich's
# default) cut every per-layer table.  Measured on a 12-layer model with TorchScript names
# (/m/encoder/layer.N/attention/self/query/MatMul) and a static qdq pipeline excluding one of them: the
# default output's widest table is 180 columns at its natural width, so 200 prints every row of it on one
# line (names stay grep-able); --verbose per-layer tables (~300 columns) fold their cells instead.
PIPED_WIDTH = 200
# Longest name shown whole in a table cell: real layer names are < 150 characters (TorchScript paths of
# deep decoders); longer ones are head…tail with the length.
NAME_CAP = 200
# Pipeline texts in tables (pass rows, bisect rows) are longer by nature (include=[...] lists of names);
# the Result table and the --quiet line always show the whole pipeline (it re-creates the model).
TEXT_CAP = 2000
# Rows of the per-layer summary (the worst layers by error); --verbose shows every row.
WORST_LAYERS = 10

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Unicode categories printed as escapes: controls (ANSI ESC, BEL, C1), format characters (bidi overrides,
# zero-width), line/paragraph separators, surrogates (unencodable), unassigned code points.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"}


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape(text: str) -> str:
    if text.isascii() and text.isprintable():  # the common case: nothing to look at per character
        return text
    return "".join(_escape_char(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)


def plain(value: Any, cap: int | None = NAME_CAP) -> str:
    """``value`` as one line of printable text: control and format characters as visible escapes, and
    longer than ``cap`` characters shortened to ``head…tail (N chars)`` (N: the original length)."""
    text = value if isinstance(value, str) else str(value)
    if cap is not None and len(text) > cap:
        keep = max(cap - 24, 8)  # room for "… (1,234,567 chars)"
        head, tail = text[: keep * 2 // 3], text[-(keep - keep * 2 // 3):]
        return f"{_escape(head)}…{_escape(tail)} ({len(text):,} chars)"
    return _escape(text)


def safe(value: Any, cap: int | None = NAME_CAP, style: str = "") -> Text:
    """A model- or user-derived value as a ``Text`` rich prints literally (see :func:`plain`)."""
    return Text(plain(value, cap), style=style)


class _PlainConsole(Console):
    """A console that looks at its stream at every print, not once at creation: the CLI creates its
    consoles at import, and the stream can change after that (tests capture it, a caller redirects it)."""

    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        if self.is_terminal:
            return super().size
        columns = os.environ.get("COLUMNS", "")
        return ConsoleDimensions(int(columns) if columns.isdigit() else PIPED_WIDTH, super().size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def soft_wrap(self) -> bool:
        return not self.is_terminal  # piped: a line outside a table is one line, never broken or cut

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:  # Console.__init__ assigns it; the stream decides
        pass


def make_console(stderr: bool = False) -> Console:
    """The console the CLI prints with: markup, highlighting and emoji codes off (text is printed as it
    is); on a terminal rich's usual width and colours; piped, ``PIPED_WIDTH`` columns (or COLUMNS when
    set) and soft wrapping, so lines outside tables are never broken or cut.  Whether the stream is a
    terminal is decided at each print, so a console created at import is right too."""
    return _PlainConsole(stderr=stderr, markup=False, highlight=False, emoji=False)


def size_change(before: float, after: float) -> str:
    """``3.93x smaller`` / ``1.59x larger`` / ``same size``; changes under 10% as a percentage
    (``0.6% smaller``), where a ratio would read ``1.01x``."""
    if before == after:
        return "same size"
    if before <= 0 or after <= 0:
        return f"{'larger' if after > before else 'smaller'} ({before:,.0f} -> {after:,.0f} bytes)"
    word = "smaller" if after < before else "larger"
    ratio = max(before, after) / min(before, after)
    if ratio >= 1.1:
        return f"{ratio:.2f}x {word}"
    percent = abs(after - before) / before * 100
    return f"{percent:.1f}% {word}" if percent >= 0.1 else f"<0.1% {word}"


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.3f} MB"


def _table(title: Any = None, columns: Sequence[str | tuple[str, str]] = (), *, caption: Any = None, show_header: bool = True) -> Table:
    """A table whose title, caption and headers are literal text and whose columns fold long cells."""
    table = Table(
        title=None if title is None else safe(title, cap=None),
        caption=None if caption is None else safe(caption, cap=None),
        show_header=show_header,
    )
    for col in columns:
        name, justify = (col, "left") if isinstance(col, str) else col
        table.add_column(safe(name, cap=None), justify=justify, overflow="fold", no_wrap=False)  # type: ignore[arg-type]
    return table


def text_table(title: Any = None, columns: Sequence[str | tuple[str, str]] = (), *, caption: Any = None, show_header: bool = True) -> Table:
    """A rich Table for other modules' reports: title, caption and headers literal, long cells folded
    (``columns``: names or (name, justify) pairs).  Give it cells built with :func:`safe`."""
    return _table(title, columns, caption=caption, show_header=show_header)


def render_rows(title: Any, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]], caption: Any = None) -> Table:
    """Any table of text (e.g. the mobile execution providers, ``onnxpress passes``): every cell literal;
    ``columns``: names or (name, justify) pairs."""
    table = _table(title, columns, caption=caption)
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else safe(cell) for cell in row))
    return table


def _ok(passed: bool, ok: str = "ok", failed: str = "FAIL") -> Text:
    return Text(ok, style="green") if passed else Text(failed, style="bold red")


# ---------------------------------------------------------------------------------------------- optimize


def render_validation(report, decides: bool = True) -> Table:
    """The output comparison; ``decides=False``: reported beside an acceptance that decides the verdict, so an
    output under the default floor reads "under floor", not a failure."""
    runs = getattr(report, "feeds", 1)
    title = f"Validation on {report.provider} ({report.tolerance.describe()}; {report.samples} sample(s) in {runs} run(s))"
    if not decides:
        title = f"Outputs on {report.provider} against the original ({report.samples} sample(s); reported, the acceptance below decides)"
    table = _table(title, ("output", ("shape", "right"), ("max abs", "right"), ("rel L2 mean", "right"), ("cosine mean", "right"), "verdict"))
    for o in report.outputs:
        verdict = _ok(o.within_tolerance) if decides else Text("within floor" if o.within_tolerance else "under floor", style="yellow" if not o.within_tolerance else "")
        if not o.within_tolerance and o.note:
            verdict = Text.assemble(verdict, " ", safe(o.note, cap=TEXT_CAP))
        table.add_row(safe(o.name), safe(list(o.shape)), f"{o.max_abs:.3g}", f"{o.rel_l2:.3g}", f"{o.cosine:.6f}", verdict)
    return table


def render_bisect(report) -> Table:
    table = _table(
        f"Bisect: validation after every pass ({report.bisect[0][1].tolerance.describe()})",
        ("after pass", ("max abs", "right"), ("rel L2", "right"), ("min cosine", "right"), "verdict"),
    )
    for text, r in report.bisect:
        worst_abs = max(o.max_abs for o in r.outputs)
        worst_l2 = max(o.rel_l2 for o in r.outputs)
        table.add_row(safe(text, cap=TEXT_CAP), f"{worst_abs:.3g}", f"{worst_l2:.3g}", f"{r.min_cosine:.6f}", _ok(r.passed, failed="FIRST FAILURE"))
    return table


def render_passes(stats) -> Table:
    table = _table("Passes", ("pass", ("time s", "right"), ("nodes", "right"), ("initializer bytes", "right"), ("params", "right"), ("modified", "right")))
    for s in stats:
        table.add_row(
            safe(s.text, cap=TEXT_CAP),
            f"{s.seconds:.3f}",
            f"{s.before.nodes} -> {s.after.nodes}",
            f"{s.before.initializer_bytes:,} -> {s.after.initializer_bytes:,}",
            f"{s.before.parameters:,} -> {s.after.parameters:,}",
            "yes" if s.modified else "no",
        )
    return table


def _verdict(report) -> Text:
    if getattr(report, "budget", None) is not None:  # a budget search (its result, or a run that made one)
        return _ok(report.passed, "budget met", "budget NOT met")
    if getattr(report, "validation", None) is None:
        return Text("not validated", style="yellow")
    return _ok(report.passed, "passed", "FAILED")


def render_result(report, written: Sequence[Any] | None) -> Table:
    """The closing table of ``optimize``/``export``: pipeline (whole), size, verdict, files written
    (``written=None``: nothing was written)."""
    table = _table("Result", ("", ""), show_header=False)
    table.add_row("pipeline", safe(report.pipeline or "(none)", cap=None))
    table.add_row("size", f"{megabytes(report.bytes_before)} -> {megabytes(report.bytes_after)} ({size_change(report.bytes_before, report.bytes_after)})")
    table.add_row("validation", _verdict(report))
    if written:
        table.add_row("written", Text(", ").join(safe(path, cap=None) for path in written))
    else:
        table.add_row("written", "nothing (validation failed; --keep-failed writes anyway)")
    return table


def render_result_line(report, output: Any = None, written: bool = True) -> Text:
    """The one line ``--quiet`` prints: verdict, size before -> after, pipeline, output path. Print it with
    ``console.print(line, soft_wrap=True)`` so that a terminal, not rich, wraps it."""
    parts = [
        _verdict(report),
        Text(f": {megabytes(report.bytes_before)} -> {megabytes(report.bytes_after)} ({size_change(report.bytes_before, report.bytes_after)}); pipeline "),
        safe(report.pipeline or "(none)", cap=None),
        Text("; written ") + safe(output, cap=None) if written and output is not None else Text("; nothing written"),
    ]
    return Text.assemble(*parts)


# ---------------------------------------------------------------------------------------------- per-layer details

_NAME_KEYS = ("layer", "initializer")
# Error columns of the summary, in display order; the first present ranks the layers.  (key, higher is worse)
_ERROR_KEYS = (
    ("model_cosine_alone", False), ("output_cosine", False), ("output_rel_error", True), ("output_error", True),
    ("weight_rel_error", True), ("weight_error", True), ("frobenius_error", True), ("spectral_error", True),
)
_RANK_ORDER = ("model_cosine_alone", "output_rel_error", "output_error", "weight_rel_error", "weight_error", "frobenius_error", "spectral_error", "output_cosine")
# (before key, after key, column): the size columns of the summary, the first present is summed in the totals
_SIZE_KEYS = (("bytes_before", "bytes_after", "bytes"), ("params_before", "params_after", "params"), ("params", "nonzeros_after", "nonzeros"), ("units_before", "units_after", "units"))
_MAX_ERROR_COLUMNS = 4


def _compact(value: Any) -> str:
    """Nested report values (activation ranges, scale summaries) on one line, floats to 4 digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def _fmt(value: Any, key: str = "") -> Text:
    if isinstance(value, Text):
        return value
    if isinstance(value, bool) or value is None:
        return Text("" if value is None else str(value))
    if isinstance(value, float):
        return Text(f"{value:.6f}" if "cosine" in key else f"{value:.4g}")  # 0.99996 must not read "1"
    if isinstance(value, int):
        return Text(str(value))
    if isinstance(value, (dict, list, tuple)):
        return safe(_compact(value), cap=TEXT_CAP)
    return safe(value)


def _number(value: Any) -> float | None:
    """A numeric cell as float; None for text, booleans and NaN (a NaN error cannot be ranked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _worst_first(rows: list[dict], key: str, higher_is_worse: bool) -> list[dict]:
    ranked = [r for r in rows if _number(r.get(key)) is not None]
    return sorted(ranked, key=lambda r: -_number(r[key]) if higher_is_worse else _number(r[key]))  # type: ignore[operator]


def _all_rows_table(title: str, rows: list[dict]) -> Table:
    """Every row and every key, one column each; nested values (a layer's activation ranges, its scale
    summary) would make a row tens of lines tall: they stay in the JSON report, named in the caption."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    nested = [k for k in keys if any(isinstance(r.get(k), dict) for r in rows)]
    keys = [k for k in keys if k not in nested]
    caption = f"{', '.join(nested)}: in the JSON report (--report)" if nested else None
    table = _table(title, keys, caption=caption)
    _keep_names_whole(table, keys, rows)
    for row in rows:
        table.add_row(*(_fmt(row.get(k), k) for k in keys))
    return table


def _keep_names_whole(table: Table, keys: Sequence[Any], rows: list[dict]) -> None:
    """Name columns get their width first (up to 64): a wide table folds its numbers, not the names."""
    for column, key in zip(table.columns, keys):
        if key in (*_NAME_KEYS, "weight"):
            column.min_width = min(max((len(plain(r.get(key, ""))) for r in rows), default=0), 64) or None


def _summary_table(title: str, rows: list[dict], worst: int) -> Table:
    name_key = next(k for k in _NAME_KEYS if any(k in r for r in rows))
    done = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    rank = next(((k, hi) for k in _RANK_ORDER for key, hi in _ERROR_KEYS if key == k and any(_number(r.get(k)) is not None for r in done)), None)
    if rank is not None:
        shown = _worst_first(done, *rank)[:worst]
        how = f"the {len(shown)} worst of {len(done)} rewritten layers by {rank[0]}"
    else:
        shown = (done or skipped)[:worst]
        how = f"{len(shown)} of {len(rows)} rows"
    errors = [(k, hi) for k, hi in _ERROR_KEYS if any(_number(r.get(k)) is not None for r in shown)][:_MAX_ERROR_COLUMNS]
    size = next(((b, a, col) for b, a, col in _SIZE_KEYS if any(b in r and a in r for r in done)), None)
    columns: list[str | tuple[str, str]] = [name_key]
    if any("op" in r for r in shown):
        columns.append("op")
    columns += [(k, "right") for k, _ in errors]
    if size:
        columns.append((f"{size[2]} before -> after", "right"))
    if any("skipped" in r for r in shown):
        columns.append("skipped")
    caption = f"{how}; --verbose (or the JSON report) shows all {len(rows)}"
    if skipped:
        reasons = collections.Counter(plain(r["skipped"], cap=120) for r in skipped)
        caption += "; skipped: " + "; ".join(f"{reason} ({n})" for reason, n in reasons.most_common(5))
        if len(reasons) > 5:
            caption += f"; {len(reasons) - 5} other reasons"
    table = _table(title, columns, caption=caption if len(shown) < len(rows) or skipped else None)
    _keep_names_whole(table, columns, shown)
    for r in shown:
        cells: list[Any] = [safe(r.get(name_key, ""))]
        if "op" in columns:
            cells.append(safe(r.get("op", "")))
        cells += [_fmt(r.get(k), k) for k, _ in errors]
        if size:
            cells.append(f"{r[size[0]]:,} -> {r[size[1]]:,}" if size[0] in r and size[1] in r else "")
        if "skipped" in columns:
            cells.append(safe(r.get("skipped", ""), cap=TEXT_CAP))
        table.add_row(*cells)
    # totals over every row, not only the rows shown
    table.add_section()
    totals: list[Any] = [Text(f"total: {len(done)} rewritten, {len(skipped)} skipped", style="bold")]
    if "op" in columns:
        totals.append("")
    totals += ["" for _ in errors]
    if size:
        before = sum(r[size[0]] for r in done if size[0] in r and size[1] in r)
        after = sum(r[size[1]] for r in done if size[0] in r and size[1] in r)
        totals.append(f"{before:,} -> {after:,} ({size_change(before, after)})")
    if "skipped" in columns:
        totals.append("")
    table.add_row(*totals)
    return table


def render_details(stats, verbose: bool = False, worst: int = WORST_LAYERS) -> list[Table]:
    """Per pass with per-layer details, a table: summarised (the ``worst`` layers by error, then a totals
    row: layers rewritten / skipped, bytes or parameters before -> after) unless ``verbose`` (every row,
    every key).  Passes whose details are one count (cse, dedup) have no table: the pass table says it."""
    tables = []
    for s in stats:
        rows = [d for d in s.details if isinstance(d, dict)]
        if not rows or s.name in ("dedup", "cse"):
            continue
        title = f"{plain(s.text, cap=TEXT_CAP)}: per layer"
        if verbose or not any(k in r for r in rows for k in _NAME_KEYS):  # not per layer (e.g. fusion counts): small
            tables.append(_all_rows_table(title, rows))
        else:
            tables.append(_summary_table(title, rows, worst))
    return tables


def render_acceptance(rows: Sequence[dict]) -> Table:
    """The acceptance conditions on the task's metrics (``OptimizeReport.acceptance``)."""
    table = _table(f"Acceptance on {rows[0]['on']}", ("condition", ("measured", "right"), "verdict"))
    for row in rows:
        table.add_row(safe(row["condition"]), f"{row['value']:.6g}", _ok(row["passed"]))
    return table


def render_metrics(title: Any, metrics: dict) -> Table:
    table = _table(title, ("metric", ("value", "right")))
    for key, value in metrics.items():
        table.add_row(safe(key), f"{value:.6g}" if isinstance(value, float) else safe(value))
    return table


# ---------------------------------------------------------------------------------------------- inspect


def render_inspect(info: dict, title: Any) -> list[Table]:
    """``onnxpress inspect`` as tables: header (opsets, producer, counts, metadata), inputs and outputs,
    nodes by op type, initializers by dtype, the largest initializers (``info``: ``inspect.summarize``)."""
    head = _table(title, ("", ""), show_header=False)
    head.add_row("ir_version", safe(info["ir_version"]))
    head.add_row("opsets", safe(", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opsets"].items()), cap=TEXT_CAP))
    head.add_row("producer", safe(info["producer"]))
    for key in ("graph", "doc_string"):
        if info.get(key):
            head.add_row(key, safe(info[key]))
    head.add_row("nodes", f"{info['nodes']:,}")
    head.add_row("parameters", f"{info['parameters']:,}")
    head.add_row("initializer bytes", f"{info['initializer_bytes']:,}")
    head.add_row("file bytes", f"{info['file_bytes']:,}")
    for key, value in info.get("metadata", {}).items():
        head.add_row(Text("metadata ") + safe(key), safe(value, cap=TEXT_CAP))
    io_table = _table("Inputs and outputs", ("kind", "name", "dtype", "shape"))
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], safe(v["name"]), safe(v["dtype"]), safe(v["shape"], cap=TEXT_CAP))
    ops = _table("Nodes by op type", ("op", ("count", "right")))
    for op, n in info["ops"].items():
        ops.add_row(safe(op), f"{n:,}")
    dt = _table("Initializers by dtype", ("dtype", ("tensors", "right"), ("parameters", "right"), ("bytes", "right")))
    for d, row in info["by_dtype"].items():
        dt.add_row(safe(d), f"{row['tensors']:,}", f"{row['parameters']:,}", f"{row['bytes']:,}")
    big = _table(f"Largest {len(info['largest'])} initializers", ("name", "dtype", "shape", ("bytes", "right")))
    for row in info["largest"]:
        big.add_row(safe(row["name"]), safe(row["dtype"]), safe(row["shape"], cap=TEXT_CAP), f"{row['bytes']:,}")
    return [head, io_table, ops, dt, big]


class _Description(ProgressColumn):
    """A progress task's description as literal text: a pass's text holds layer names, and rich's
    ``TextColumn`` parses markup (``[/m/...]`` in a pipeline raised MarkupError in the refresh thread)."""

    def render(self, task: Task) -> Text:
        return safe(task.description, cap=120)


def make_progress(console: Console, *, transient: bool = True, disable: bool = False) -> Progress:
    """The CLI's progress bar (spinner, description, bar, done/total, time); any description is shown
    literally (use it instead of ``Progress(TextColumn("{task.description}"), ...)``)."""
    return Progress(
        SpinnerColumn(), _Description(), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=transient, disable=disable,
    )


def print_all(console: Console, renderables: Iterable[Any]) -> None:
    """Print tables/lines; a ``str`` is printed as literal text (never markup)."""
    for item in renderables:
        console.print(safe(item, cap=None) if isinstance(item, str) else item)


# ---------------------------------------------------------------------------------------------- the whole run


def render_data(report) -> Table | None:
    """Where the run's calibration and evaluation data came from (``onnxpress.rundata``)."""
    data = getattr(report, "data", None)
    if not data:
        return None
    table = _table("Data", ("", ""), show_header=False)
    table.add_row("calibration (fit)", safe(data.get("calibration") or "none", cap=TEXT_CAP))
    evaluation = safe(data.get("evaluation") or "", cap=TEXT_CAP)
    if data.get("generated"):
        evaluation = Text.assemble(evaluation, " ", Text("(random inputs: the verdict says little about real data)", style="yellow"))
    table.add_row("evaluation (verdict)", evaluation)
    return table


def render_sample_metrics(report) -> Table:
    """Per-sample statistics of every output of a validation: mean, worst and 5% tail."""
    table = _table(
        f"Per-sample metrics on {report.data or 'the evaluation data'} ({report.samples} samples)",
        ("output", ("cos mean", "right"), ("cos min", "right"), ("cos p5", "right"), ("rel L2 mean", "right"), ("rel L2 p95", "right"), ("max abs", "right")),
    )
    for o in report.outputs:
        summary = o.summary()
        table.add_row(safe(o.name), *(f"{summary[k]:.6f}" if k.endswith("cos") else f"{summary[k]:.3g}" for k in ("cos", "min_cos", "p5_cos", "rel_l2", "p95_rel_l2", "max_abs")))
    return table


def render_optimize(report, verbose: bool = False, quiet: bool = False) -> list[Any]:
    """Everything ``onnxpress optimize`` prints for an ``api.OptimizeReport`` (``quiet``: the result line)."""
    written = list(getattr(report, "written", []) or [])
    if quiet:
        return [render_result_line(report, written[0] if written else None, written=bool(written))]
    items: list[Any] = []
    if report.budget is not None:
        from onnxpress.budget.report import renderables as budget_renderables

        items.extend(budget_renderables(report.budget, verbose=verbose))
    else:
        items.append(render_passes(report.passes))
        items.extend(render_details(report.passes, verbose=verbose))
    data = render_data(report)
    if data is not None:
        items.append(data)
    if report.bisect:
        items.append(render_bisect(report))
    elif report.validation is not None:
        items.append(render_validation(report.validation, decides=getattr(report, "validation_decides", True)))
        if report.validation.samples > 1:
            items.append(render_sample_metrics(report.validation))
    if report.task_metrics:
        items.append(render_metrics("Task metrics on the evaluation data", report.task_metrics))
    if getattr(report, "acceptance", None):
        items.append(render_acceptance(report.acceptance))
    if report.mobile is not None:
        items.append(render_validation(report.mobile.validation))
        items.append(render_rows("Mobile execution providers", report.mobile.COLUMNS, report.mobile.rows()))
        items.extend(Text.assemble("note: ", safe(note, cap=None)) for note in report.mobile.notes)
    items.extend(Text.assemble("note: ", safe(note, cap=None)) for note in getattr(report, "notes", []))
    items.append(render_result(report, written or None))
    return items
