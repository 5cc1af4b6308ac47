"""Rendering is plain text: model-derived strings print literally, whole (or capped with their length),
never as rich markup, never as terminal control sequences; piped output is not cut at 80 columns.

Every renderer is printed to consoles writing to io.StringIO (not a terminal): the CLI's console
(``render.make_console``), and a default rich console with markup ON, which proves that the renderers
themselves never hand rich a markup string (a caller printing them anywhere is safe too).
"""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.text import Text

import onnxpress
from onnxpress import render
from onnxpress.inspect import summarize

TS_NAME = "/m/encoder/layer.0/attention/self/query/MatMul"  # every TorchScript node name starts with "/"
CLOSE = "[/x]"
LINK = "[link=http://e]a[/link]"
BOLD = "[bold]"
ANSI = "\x1b[31mred\x1b[0m"
ANSI_SHOWN = "\\x1b[31mred\\x1b[0m"
LONG = "L" * 4000 + "[/long]" + "M" * 5993  # 10,000 characters, markup in the middle
LONG_SHOWN = "(10,000 chars)"
assert len(LONG) == 10_000
LAYERS = (TS_NAME, CLOSE, LINK, BOLD, ANSI, LONG)
LITERAL = (TS_NAME, CLOSE, LINK, BOLD, ANSI_SHOWN)  # what must appear as is


def hostile_model(path, d: int = 16):
    """x -> 6 x (MatMul -> Relu) -> y; node, initializer and value names are the hostile strings; the
    input/output names, graph name, doc string and metadata too."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x[bold]"
    for i, name in enumerate(LAYERS):
        w = f"{name}.weight"
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [prev, w], [f"{name}/out{i}"], name=name))
        nodes.append(helper.make_node("Relu", [f"{name}/out{i}"], [f"{name}/relu{i}"], name=f"{name}/Relu"))
        prev = f"{name}/relu{i}"
    nodes.append(helper.make_node("Identity", [prev], [f"{CLOSE}y{ANSI}"], name="out"))
    graph = helper.make_graph(
        nodes, f"g{LINK}", [helper.make_tensor_value_info("x[bold]", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(f"{CLOSE}y{ANSI}", TensorProto.FLOAT, ["N", d])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10, doc_string=f"doc {BOLD}{ANSI}")
    helper.set_model_props(model, {f"key{CLOSE}": f"value{LINK}\x1b]8;;http://evil\x1b\\", "long": LONG})
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A real run: weight-only int8 with one TorchScript-named layer excluded (the issue's pipeline)."""
    path = hostile_model(tmp_path_factory.mktemp("hostile") / "m.onnx")
    _, report = onnxpress.optimize(path, f"strip-metadata,qdq(mode=weight,exclude=[{TS_NAME}])")
    return path, report


def consoles(width: int | None = None):
    """(name, console, buffer): the CLI's console piped, and a markup-ON rich console."""
    out = []
    for name, markup in (("cli", False), ("markup-on", True)):
        buf = io.StringIO()
        out.append((name, Console(file=buf, width=width or render.PIPED_WIDTH, markup=markup, highlight=markup, emoji=markup), buf))
    return out


def column_text(output: str, column: int) -> str:
    """The text of a table column, folded cells joined (rich folds long cells onto more lines)."""
    parts = []
    for line in output.splitlines():
        cells = re.split(r"[│┃]", line)
        if len(cells) > column + 1 and line.lstrip()[:1] in ("│", "┃"):
            parts.append(cells[column + 1].strip())
    return "".join(parts)


def squash(text: str) -> str:
    return "".join(text.split())


def every_renderable(path, report) -> list:
    items = [render.render_passes(report.passes), *render.render_details(report.passes), *render.render_details(report.passes, verbose=True)]
    items += [render.render_validation(report.validation), render.render_result(report, [str(path)])]
    items += render.render_inspect(summarize(path), title=f"{path}{CLOSE}")
    items += [render.render_metrics(f"metrics {BOLD}", {LINK: 1.0, CLOSE: "x"}), render.render_rows(f"rows {CLOSE}", ["a", "b"], [[LINK, ANSI]])]
    return items


# ---------------------------------------------------------------------------------------------- text helpers


def test_plain_escapes_control_characters_visibly():
    assert render.plain(ANSI) == ANSI_SHOWN
    assert render.plain("a\nb\tc\x07\x7f\u202ed\u2028") == "a\\nb\\tc\\x07\\x7f\\u202ed\\u2028"
    assert render.plain("µ-layer/日本") == "µ-layer/日本"  # printable non-ASCII stays as it is
    assert render.plain(CLOSE) == CLOSE  # markup is not escaped: it is never parsed


def test_plain_caps_absurd_names_with_their_length():
    shown = render.plain(LONG)
    assert len(shown) <= render.NAME_CAP
    assert shown.startswith("L" * 100) and "…" in shown and shown.endswith("M" * 20 + " " + LONG_SHOWN)
    assert render.plain("n" * render.NAME_CAP) == "n" * render.NAME_CAP  # at the cap: whole
    assert render.plain(LONG, cap=None) == LONG


@pytest.mark.parametrize(
    "before, after, text",
    [
        (393, 100, "3.93x smaller"), (100, 159, "1.59x larger"), (100, 100, "same size"),
        (1000, 994, "0.6% smaller"), (1000, 1050, "5.0% larger"), (100000, 99999, "<0.1% smaller"), (100, 0, "smaller (100 -> 0 bytes)"),
    ],
)
def test_size_change(before, after, text):
    assert render.size_change(before, after) == text


def test_make_console_piped_is_plain_and_wide(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    console = render.make_console()
    assert not console.is_terminal and console.width == render.PIPED_WIDTH
    console.print(f"{CLOSE} {LINK} :smile: 'quoted' 12 " + "w" * 300)
    out = sys.stdout.getvalue()
    assert out == f"{CLOSE} {LINK} :smile: 'quoted' 12 " + "w" * 300 + "\n"  # no markup, emoji, wrapping
    monkeypatch.setenv("COLUMNS", "120")
    assert console.width == 120  # an explicit COLUMNS is the user's choice, read at each print
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    console.print("v" * 300)
    assert sys.stdout.getvalue() == "v" * 300 + "\n"  # the new stream: still piped, still one line
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats the stream as a terminal: rich's own width and wrapping
    monkeypatch.setenv("COLUMNS", "77")
    assert console.is_terminal and not console.soft_wrap and console.width == 77
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    err = render.make_console(stderr=True)
    err.print(BOLD)
    assert sys.stderr.getvalue() == BOLD + "\n"


# ---------------------------------------------------------------------------------------------- renderers


@pytest.mark.parametrize("width", [80, render.PIPED_WIDTH, 100_000], ids=["w80", "piped", "unbounded"])
def test_every_renderer_prints_hostile_names_literally(hostile_run, width):
    path, report = hostile_run
    for name, console, buf in consoles(width):
        for item in every_renderable(path, report):
            console.print(item)  # a MarkupError would raise here
        out = buf.getvalue()
        flat = squash(out.replace("│", "").replace("┃", ""))
        assert "\x1b" not in out, name  # no escape sequence reaches the terminal
        assert "…" not in out.replace("…M", "").replace("L…", ""), name  # rich never cut a cell
        for text in LITERAL:
            if width >= 10_000:
                assert text in out, (name, text)
            assert squash(text) in flat, (name, text)
        assert squash(LONG_SHOWN) in flat and LONG not in out, name


def test_names_in_a_folded_column_are_whole(hostile_run):
    """At 80 columns the per-layer table folds: the name column still holds every name, whole."""
    _, report = hostile_run
    for _, console, buf in consoles(80):
        console.print(render.render_details(report.passes, verbose=True)[0])
        names = column_text(buf.getvalue(), 0)
        for text in LITERAL:
            assert squash(text) in names, text


def test_pass_and_result_show_the_whole_pipeline(hostile_run):
    path, report = hostile_run
    pipeline = "qdq(mode=weight,exclude=[" + ",".join(f"/m/encoder/layer.{i}/attention/self/query/MatMul" for i in range(6)) + "])"
    assert len(pipeline) > 300
    report.pipeline = pipeline
    for _, console, buf in consoles():
        console.print(render.render_result(report, [str(path)]))
        console.print(render.render_result_line(report, str(path)), soft_wrap=True)
        out = buf.getvalue()
        assert squash(pipeline) in squash(column_text(out, 1))  # the Result table's value column
        line = out.strip().splitlines()[-1]
        assert pipeline in line and line.endswith(f"written {path}")  # the --quiet line: one line, whole


def test_result_says_larger_for_growth(hostile_run):
    _, report = hostile_run
    grown = type(report)(**{**report.__dict__, "bytes_before": 100_000, "bytes_after": 159_000})
    for _, console, buf in consoles():
        console.print(render.render_result(grown, []))
        console.print(render.render_result_line(grown, None, written=False), soft_wrap=True)
        out = buf.getvalue()
        assert out.count("1.59x larger") == 2 and "smaller" not in out
        assert out.strip().splitlines()[-1].endswith("nothing written")


def test_validation_verdict_is_styled_text_not_markup(hostile_run):
    _, report = hostile_run
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard", width=200, markup=False)
    console.print(render.render_validation(report.validation))
    out = buf.getvalue()
    assert "\x1b[32mok" in out  # green on a terminal
    assert "[green]" not in out and "\x1b[31mred" not in out  # the name's own escape stays visible text
    assert ANSI_SHOWN in out


# ---------------------------------------------------------------------------------------------- per-layer summary


class _Stats:
    def __init__(self, name, text, details):
        self.name, self.text, self.details = name, text, details


def test_details_summary_shows_the_worst_layers_and_totals():
    rows = [{"layer": f"/m/layer.{i}/MatMul", "op": "MatMul", "bytes_before": 4096, "bytes_after": 1152, "output_rel_error": i / 1000, "output_cosine": 1 - i / 1e5} for i in range(30)]
    rows += [{"layer": CLOSE, "op": "MatMul", "skipped": "excluded by option"}, {"layer": LINK, "op": "Gemm", "skipped": "excluded by option"}]
    stats = [_Stats("qdq", "qdq(mode=static)", rows)]
    (table,) = render.render_details(stats)
    buf = io.StringIO()
    Console(file=buf, width=render.PIPED_WIDTH, markup=True).print(table)
    out = buf.getvalue()
    shown = [i for i in range(30) if f"/m/layer.{i}/MatMul " in out]
    assert shown == list(range(20, 30))  # the 10 worst by output_rel_error, nothing else
    assert out.index("/m/layer.29/") < out.index("/m/layer.20/")  # worst first
    assert "total: 30 rewritten, 2 skipped" in out
    assert f"{30 * 4096:,} -> {30 * 1152:,} (3.56x smaller)" in out
    assert "skipped: excluded by option (2)" in " ".join(out.split())  # the reasons of skipped rows, counted
    assert "0.999710" in out  # cosines keep 6 decimals (0.99971 must not print as "1")
    assert "the 10 worst of 30 rewritten layers by output_rel_error" in " ".join(out.split())
    (full,) = render.render_details(stats, verbose=True)
    buf = io.StringIO()
    Console(file=buf, width=100_000).print(full)
    out = buf.getvalue()
    assert all(f"/m/layer.{i}/MatMul " in out for i in range(30)) and CLOSE in out and LINK in out


def test_details_of_a_real_run_rank_by_error(hostile_run):
    _, report = hostile_run
    qdq = next(s for s in report.passes if s.name == "qdq")
    done = [r for r in qdq.details if "skipped" not in r]
    assert len(done) == 5 and sum("skipped" in r for r in qdq.details) == 1  # the TorchScript-named layer was excluded
    buf = io.StringIO()
    Console(file=buf, width=100_000).print(render.render_details([qdq])[0])
    out = buf.getvalue()
    worst = max(done, key=lambda r: r["weight_rel_error"])
    before, after = sum(r["bytes_before"] for r in done), sum(r["bytes_after"] for r in done)
    assert "total: 5 rewritten, 1 skipped" in out and f"{before:,} -> {after:,} ({render.size_change(before, after)})" in out
    assert f"{worst['weight_rel_error']:.4g}" in out


def test_inspect_renders_metadata_and_doc_literally(hostile_run):
    path, _ = hostile_run
    info = summarize(path)
    buf = io.StringIO()
    console = Console(file=buf, width=100_000, markup=True)
    for table in render.render_inspect(info, title=str(path)):
        console.print(table)
    out = buf.getvalue()
    assert f"key{CLOSE}" in out and f"value{LINK}\\x1b]8;;http://evil\\x1b\\" in out  # no OSC 8 hyperlink reaches the terminal
    assert f"g{LINK}" in out and f"doc {BOLD}{ANSI_SHOWN}" in out
    assert "x[bold]" in out and f"{CLOSE}y{ANSI_SHOWN}" in out
    assert "\x1b" not in out


def test_strings_printed_with_print_all_are_literal():
    buf = io.StringIO()
    render.print_all(Console(file=buf, markup=True, width=200), [f"note: {CLOSE} {ANSI}", Text("styled", style="bold")])
    assert buf.getvalue() == f"note: {CLOSE} {ANSI_SHOWN}\nstyled\n"


# ---------------------------------------------------------------------------------------------- budget report


def _budget_result(n_layers: int = 14):
    from types import SimpleNamespace as NS

    names = [*LAYERS, *(f"/m/encoder/layer.{i}/mlp/fc1/MatMul" for i in range(n_layers - len(LAYERS)))]
    layers = [NS(name=n, op="MatMul", shape=(384, 1536), choice="int8", rank=None, bytes_before=589_824, bytes_after=147_456, error_alone=(n_layers - i) / 1000) for i, n in enumerate(names)]
    pipeline = "qdq(mode=weight,include=[" + ",".join(f'"{n}"' for n in names[:5]) + "])"
    return NS(
        budget=NS(text=f"cos>=0.99{CLOSE}", metric="cos", op=">=", value=0.99), passed=False, pipeline=pipeline,
        bytes_before=1_000_000, bytes_after=1_590_000, predicted_bytes=1_500_000, value=0.98, fit_value=0.985, evaluation=f"held-out {BOLD}",
        metrics={"cos": 0.98, f"user{LINK}": 0.5}, layers=layers, candidates=[{"measured": True}], attempts=[{}],
        points=[NS(label=f"built {ANSI}", kind="built", bytes=1_590_000, predicted_d=0.01, value=0.98, passed=False)],
        seconds={"search": 1.0}, notes=[f"note {CLOSE}{ANSI}"],
    )


def _budget_report():
    try:  # the budget package (onnxpress/budget/report.py) ...
        from onnxpress.budget import report
    except ImportError:  # ... or the module it was split from
        from onnxpress import budget_report as report
    return report


def test_budget_report_is_literal_summarised_and_says_larger():
    budget_report = _budget_report()
    result = _budget_result()
    for verbose in (False, True):
        for name, console, buf in consoles(100_000):
            for item in budget_report.renderables(result, verbose=verbose):
                console.print(item)
            out = buf.getvalue()
            assert "\x1b" not in out and "(1.59x larger; predicted" in out, name  # the model grew
            assert "4.00x smaller" in out, name  # while the layers' weights shrank
            assert render.plain(result.pipeline, cap=None) in out and f"note {CLOSE}{ANSI_SHOWN}" in out and f"cos>=0.99{CLOSE}" in out, name
            assert f"user{LINK}" in out and f"built {ANSI_SHOWN}" in out and LONG_SHOWN in out, name
            assert "total: 14 layers" in out and f"{14 * 589.824:.1f}" in out, name
            shown = [i for i in range(14) if f"/m/encoder/layer.{i}/mlp/fc1/MatMul " in out]
            # summarised: the 10 layers with the largest error alone (the first 10 here); verbose: all
            assert shown == (list(range(8)) if verbose else list(range(4))), (name, shown)
            layers = out.split("per-layer decisions")[1]
            assert layers.index(TS_NAME) < layers.index(f"│ {CLOSE} ") < layers.index("/m/encoder/layer.3/mlp")  # worst first


def test_progress_descriptions_are_literal():
    """A pass's text in the progress bar: rich's TextColumn would parse '[/m/...]' as a closing tag."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200, markup=True)
    with render.make_progress(console, transient=False) as progress:
        task = progress.add_task(f"pass qdq(exclude=[{TS_NAME}]) {ANSI}", total=2)
        progress.advance(task)
        progress.refresh()
    out = buf.getvalue()
    assert f"pass qdq(exclude=[{TS_NAME}]) {ANSI_SHOWN}" in out and "\x1b[31mred" not in out and "1/2" in out

