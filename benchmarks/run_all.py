"""`make bench`: every benchmark in one run on this machine, then benchmarks/RESULTS.md from their tables.

Each benchmark script writes its own table to benchmarks/results/<name>.md (measured figures, the peer in
the same run); this script runs them in order and writes RESULTS.md: a headline per benchmark (its key
ratio, read from its table), the machine, then every table.

    python benchmarks/run_all.py                    # all benchmarks (~30 min), then RESULTS.md
    python benchmarks/run_all.py qdq tool_speed     # a subset, then RESULTS.md from all tables present
    python benchmarks/run_all.py --from-results     # no runs: RESULTS.md from the existing results/*.md
    python benchmarks/run_all.py --quick            # CI smoke: small sizes, into /tmp/onnxpress-bench-quick
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, temp_cwd  # noqa: E402  (machine is re-exported: other benchmarks import it from here)

__all__ = ["machine", "main"]

QUICK_DIR = Path("/tmp/onnxpress-bench-quick")
NOTES = HERE / "notes"  # hand-written analysis per benchmark, appended to its section of RESULTS.md


def _markdown(path: Path) -> list[str]:
    return ["--markdown", str(path)]


# name -> (script, arguments given the table's path, extra arguments for --quick, or None: not in the quick run);
# order: cheap first, so a partial run still yields tables
BENCHMARKS: dict[str, tuple[str, Callable[[Path], list[str]], list[str] | None]] = {
    "tool_speed": ("tool_speed_bench.py", _markdown, ["--quick"]),
    "qdq": ("qdq_bench.py", lambda path: ["--profile", *_markdown(path)], ["--skip-minilm", "--runs", "3"]),
    "factorize": ("factorize_bench.py", _markdown, ["--skip-minilm", "--skip-lm"]),
    "prune": ("prune_bench.py", _markdown, ["--skip-minilm"]),
    "budget": ("budget_bench.py", _markdown, ["--models", "digits"]),
    "heldout": ("heldout_bench.py", _markdown, ["--quick"]),
    "mobile": ("mobile_bench.py", _markdown, ["--skip-minilm", "--runs", "5"]),
    "scale": ("scale_bench.py", lambda path: ["--out", str(path)], ["--sizes", "0.05"]),
    # the LLM benchmarks need the SmolLM2 export (~8 min) and minutes per model: not in CI's quick run (the slow
    # tests run the same code on SmolLM2 and a tiny llama)
    "llm_int4": ("llm_int4_bench.py", _markdown, None),
    "llm_budget": ("llm_budget_bench.py", _markdown, None),
    "llm_scale": ("llm_scale.py", _markdown, None),
}


# -- headlines: the key figure of each table --------------------------------------------------------
def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """Every GitHub markdown table in ``text`` as a list of rows (column name -> cell text)."""
    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i + 1 < len(lines):
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = _cells(lines[i])
                rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [p.strip().replace("\\|", "|") for p in parts[1:-1]]


def _rows(text: str) -> list[dict[str, str]]:
    return [row for table in parse_tables(text) for row in table]


def _find(rows: list[dict[str, str]], **contains: str) -> dict[str, str]:
    """The first row whose cells contain the given texts (column -> substring)."""
    for row in rows:
        if all(sub in row.get(col, "") for col, sub in contains.items()):
            return row
    raise LookupError(f"no row with {contains}")


def _headline_tool_speed(text: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith("Headline:"))
    return line.removeprefix("Headline:").strip()


def _headline_qdq(text: str) -> str:
    rows = _rows(text)
    try:
        ours = _find(rows, model="MiniLM", method="onnxpress qdq static int8")
    except LookupError:  # a quick run: digits only
        ours = _find(rows, model="digits-cnn", method="onnxpress qdq static int8")
        peer = _find(rows, model="digits-cnn", method="ORT quantize_static")
        return f"digits CNN static int8: {ours['task metric']} vs ORT quantize_static {peer['task metric']} ({ours['MB']} vs {peer['MB']} MB)."
    peer = _find(rows, model="MiniLM", method="ORT quantize_static")
    ours4 = _find(rows, model="MiniLM", method="onnxpress qdq int4")
    peer4 = _find(rows, model="MiniLM", method="MatMulNBits")
    return (f"MiniLM static int8: mean cos {ours['mean cos']} vs ORT quantize_static {peer['mean cos']} ({ours['MB']} vs {peer['MB']} MB); "
            f"int4: {ours4['MB']} MB at {ours4['mean cos']} vs ORT MatMulNBits {peer4['MB']} MB at {peer4['mean cos']}.")


def _headline_factorize(text: str) -> str:
    rows = _rows(text)
    if not any(r.get("model") == "minilm" for r in rows):  # a quick run: digits only
        calibrated = _find(rows, model="digits", pipeline="factorize(ratio=0.25,calibrated=true)")
        plain = _find(rows, model="digits", pipeline="factorize(ratio=0.25)")
        return f"digits MLP, 27% of linear parameters kept: data-aware {calibrated['metric']} vs plain SVD {plain['metric']}."
    calibrated = _find(rows, model="minilm", pipeline="factorize(ratio=0.75,calibrated=true)")
    plain = _find(rows, model="minilm", pipeline="factorize(ratio=0.75)")
    return (f"MiniLM, 25% fewer linear parameters: data-aware {calibrated['metric']} vs plain SVD {plain['metric']} "
            f"(mean cos 0.98 target: see the table's targets).")


def _headline_prune(text: str) -> str:
    rows = _rows(text)
    if not any(r.get("model") == "MiniLM" for r in rows):  # a quick run: digits only
        best = _find(rows, model="digits-mlp", pipeline="Wanda + refit 80% per layer")
        plain = _find(rows, model="digits-mlp", pipeline="magnitude 80%: ")
        return f"digits MLP 80% unstructured: Wanda + refit per layer {best['metric']} vs plain magnitude {plain['metric']}."
    best = _find(rows, model="MiniLM", pipeline="Wanda + refit 50%")
    plain = _find(rows, model="MiniLM", pipeline="magnitude 50%")
    return f"MiniLM 50% unstructured: Wanda + refit {best['metric']} vs plain magnitude {plain['metric']}."


def _headline_budget(text: str) -> str:
    rows = _rows(text)
    parts = []
    for model in ("minilm", "digits", "lm"):
        own = [r for r in rows if r.get("model") == model]  # exact: "lm" is a substring of "minilm"
        try:
            ours = _find(own, method="onnxpress budget search")
        except LookupError:
            continue
        peer = _find(own, method="MatMulNBits")
        parts.append(f"{model} ({ours['budget']}): {ours['MB']} MB, {ours['ratio']} smaller, target {ours['target'] or '-'}; "
                     f"ORT MatMulNBits {peer['MB']} MB, meets budget: {peer['meets budget'] or '-'}")
    if not parts:
        raise LookupError("no budget rows")
    return "; ".join(parts) + "."


def _headline_mobile(text: str) -> str:
    rows = _rows(text)
    model = "MiniLM" if any(r.get("model") == "MiniLM" for r in rows) else "digits-cnn"  # a quick run: digits only
    q = _find(rows, model=model, variant="qdq int8", style="basic")
    fp = _find(rows, model=model, variant="fp32", style="basic")
    return f"{model} .ort: int8 {q['.ort MB']} MB ({q['.ort task metric']}) vs fp32 {fp['.ort MB']} MB."


def _headline_scale(text: str) -> str:
    rows = _rows(text)
    if not rows:
        raise LookupError("no scale rows")
    return "; ".join(f"{r.get('model', '?')}: {r.get('wall s', '?')} s, peak RSS {r.get('RSS / model bytes', '?')} the model's bytes" for r in rows) + "."


def _headline_heldout(text: str) -> str:
    rows = [r for r in _rows(text) if "OLD" not in r.get("verdict on", "")]
    if not rows:
        raise LookupError("no held-out rows")
    unseen = next(k for k in rows[0] if k.startswith("unseen cos"))
    return "; ".join(f"n={r['calibration n']}: {r['MB']} MB, held-out {r['held-out cos']} vs {unseen} {r[unseen]}" for r in rows) + "."


def _headline_llm_int4(text: str) -> str:
    rows = _rows(text)
    peer = _find(rows, model="builder int4")
    ours = [r for r in rows if r.get("model", "").startswith("onnxpress") and r.get("MB")]
    best = min(ours, key=lambda r: float(r["ppl increase"].rstrip("%")))
    return (f"SmolLM2-135M int4 (source weights Q4_1): onnxpress best {best['MB']} MB at {best['ppl increase']} perplexity, "
            f"{best['decode tok/s (2 threads)']} tok/s vs the onnxruntime-genai builder {peer['MB']} MB at {peer['ppl increase']}, "
            f"{peer['decode tok/s (2 threads)']} tok/s.")


def _headline_llm_budget(text: str) -> str:
    rows = [r for r in _rows(text) if r.get("held-out ppl increase")]
    ours = next(r for r in reversed(rows) if r.get("model", "").startswith("onnxpress budget") and r.get("MB", "-") != "-")
    peer = _find(rows, model="builder int8")
    return (f"SmolLM2-135M ppl_increase_rel<=3%: {ours['MB']} MB at {ours['held-out ppl increase']} held-out in {ours['build wall']}, "
            f"{ours['build peak RSS']}; builder int8 {peer['MB']} MB at {peer['held-out ppl increase']}.")


def _headline_llm_scale(text: str) -> str:
    rows = [r for r in _rows(text) if r.get("int4 MB")]
    if not rows:
        raise LookupError("no scale rows")
    return "; ".join(f"{r['params M']}M: int4 stage {r['int4 wall / CPU s']} s, {r['int4 RSS GB']} GB" for r in rows) + " (wall / CPU s, peak RSS)."


HEADLINES: dict[str, Callable[[str], str]] = {
    "tool_speed": _headline_tool_speed,
    "qdq": _headline_qdq,
    "factorize": _headline_factorize,
    "prune": _headline_prune,
    "budget": _headline_budget,
    "heldout": _headline_heldout,
    "mobile": _headline_mobile,
    "scale": _headline_scale,
    "llm_int4": _headline_llm_int4,
    "llm_budget": _headline_llm_budget,
    "llm_scale": _headline_llm_scale,
}


def headline(name: str, text: str) -> str:
    try:
        return HEADLINES[name](text)
    except (LookupError, StopIteration, KeyError):
        return "(no headline: the table's format was not recognised; see the table below)"


def title(text: str, fallback: str) -> str:
    first = next((line for line in text.splitlines() if line.startswith("#")), "")
    return first.lstrip("#").strip() or fallback


# -- RESULTS.md ----------------------------------------------------------------------------------------
def write_results(results: Path, out: Path, ran: dict[str, tuple[int, float]] | None = None) -> Path:
    """RESULTS.md from the tables in ``results``: headlines, machine, then every table, in BENCHMARKS order."""
    tables = {name: (results / f"{name}.md").read_text() for name in BENCHMARKS if (results / f"{name}.md").exists()}
    how = ("measured by `make bench` (`python benchmarks/run_all.py`)" if ran else
           "assembled by `python benchmarks/run_all.py --from-results` from the tables in benchmarks/results/ (each names its own command)")
    parts = [
        "# onnxpress benchmark results",
        "",
        f"{how.capitalize()} on {datetime.date.today().isoformat()}. Machine: {machine()}.",
        "Every table compares onnxpress with the peer tool measured in the same run on the same data; latency is the median of",
        "repeated onnxruntime runs after warm-up; ratios are the headline, absolute times depend on the machine.",
        "",
        "## Headlines",
        "",
        "| benchmark | key figures (from its table) |",
        "|---|---|",
    ]
    for name, text in tables.items():
        parts.append(f"| [{name}](#{_anchor(title(text, name))}) | {headline(name, text).replace('|', chr(92) + '|')} |")
    missing = [name for name in BENCHMARKS if name not in tables]
    if missing:
        parts += ["", f"Not measured yet (no results/<name>.md): {', '.join(missing)}."]
    png = plot_size_vs_fidelity(tables, results / PLOT)
    if png is not None:
        parts += ["", f"![MiniLM size vs fidelity, every method](results/{PLOT})" if results.parent == out.parent else f"Plot: {png}"]
    if ran:
        parts += ["", "Run: " + ", ".join(f"{name} exit {code} in {seconds:.0f} s" for name, (code, seconds) in ran.items()) + "."]
    parts.append("")
    for name, text in tables.items():
        body = text.strip()
        if not body.startswith("#"):
            body = f"# {name}\n\n{body}"
        parts += [_demote(body), ""]
        notes = NOTES / f"{name}.md"
        if notes.exists():  # hand-kept analysis beside the generated table (a rerun overwrites results/, not notes/)
            parts += [f"*Notes on {name} kept by hand in benchmarks/notes/{name}.md (development runs, analysis against the issue's targets):*", "",
                      _demote(notes.read_text().strip()), ""]
    out.write_text("\n".join(parts))
    return out


# -- the size vs fidelity plot of every MiniLM method in the tables -------------------------------------
PLOT = "size_vs_fidelity.png"


def minilm_points(tables: dict[str, str]) -> list[tuple[str, str, float, float]]:
    """(benchmark, method, MB, mean cosine) of every MiniLM row that has both, read from the tables."""
    points = []
    for name, text in tables.items():
        for row in _rows(text):
            if row.get("model", "").lower() != "minilm":
                continue
            label = row.get("method") or row.get("pipeline") or ""
            cos = row.get("mean cos") or row.get("value") if row.get("metric", "") in ("", "mean_cos") else None
            if cos is None:
                found = re.search(r"cos(?: mean)? ([0-9.]+)", row.get("metric", ""))
                cos = found.group(1) if found else None
            try:
                mb, value = float(row.get("MB", "")), float(cos or "")
            except ValueError:
                continue
            points.append((name, label, mb, value))
    return points


def plot_size_vs_fidelity(tables: dict[str, str], path: Path) -> Path | None:
    """One scatter of MB vs mean embedding cosine: onnxpress's methods and the peers', every benchmark."""
    points = minilm_points(tables)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    markers = {"qdq": "o", "factorize": "s", "prune": "^", "budget": "*", "mobile": "D"}
    # Named in the zoom panel: the peers and onnxpress's small models; offsets alternate to keep labels apart
    named = {"ORT quantize_dynamic per-channel": "ORT dynamic int8", "ORT MatMulNBits RTN b32 + Gather": "ORT MatMulNBits 4-bit",
             "onnxpress qdq static int8": "onnxpress static int8", "onnxpress qdq weight int8": "onnxpress weight int8",
             "onnxpress qdq int4 (MatMulNBits)": "onnxpress int4", "onnxpress budget search": "onnxpress --budget cos>=0.98"}
    offsets = [(6, 6), (6, -12), (-70, 8), (-40, -14)]
    small = [p for p in points if p[2] <= 26 and p[3] >= 0.95]
    for panel, pts in ((ax, points), (zoom, small)):
        for name, label, mb, cos in pts:
            peer = label.startswith("ORT")
            color = "tab:red" if peer else ("tab:gray" if label == "fp32" else "tab:blue")
            panel.scatter(mb, cos, marker=markers.get(name, "o"), color=color, s=110 if name == "budget" else 36, alpha=0.8)
            if panel is zoom and label in named:
                panel.annotate(named.pop(label), (mb, cos), textcoords="offset points", xytext=offsets[len(named) % 4], fontsize=8)
        panel.set_xlabel("model size (MB)")
        panel.grid(True, alpha=0.3)
    for name, marker in markers.items():
        if any(p[0] == name for p in points):
            ax.scatter([], [], marker=marker, color="tab:blue", label=name)
    ax.legend(title="benchmark (red: peer)", loc="lower center", fontsize=8)
    ax.set_ylabel("mean sentence-embedding cosine to fp32")
    ax.set_ylim(max(0.0, min(p[3] for p in points) - 0.02), 1.005)
    ax.set_title("all-MiniLM-L6-v2: every method in benchmarks/results")
    zoom.set_title("zoom: models <= 26 MB (blue: onnxpress, red: peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _demote(markdown: str) -> str:
    """One level down for every heading (the tables' titles become sections of RESULTS.md)."""
    return "\n".join("#" + line if re.match(r"#+ ", line) else line for line in markdown.splitlines())


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks and write benchmarks/RESULTS.md.")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--from-results", action="store_true", help="run nothing: regenerate RESULTS.md from the existing results/*.md")
    parser.add_argument("--quick", action="store_true", help=f"CI smoke run: small sizes, tables and RESULTS.md under {QUICK_DIR}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} (valid: {', '.join(BENCHMARKS)})")
    root = QUICK_DIR if args.quick else HERE
    results = root / "results"
    if args.from_results:
        print(f"wrote {write_results(results, root / 'RESULTS.md')}")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    ran: dict[str, tuple[int, float]] = {}
    for name in args.names or list(BENCHMARKS):
        script, table_args, quick_args = BENCHMARKS[name]
        if args.quick and quick_args is None:
            print(f"== {name}: not in the quick run (minutes per model on the real LLM)")
            continue
        path = HERE / script
        if not path.exists():
            print(f"== {name}: {script} not present, skipped")
            continue
        command = [sys.executable, str(path), *table_args(results / f"{name}.md"), *(quick_args if args.quick and quick_args else [])]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        # a temporary CWD: peers such as onnxruntime.quantization drop *.data / sym_shape_infer_temp.onnx into it
        with temp_cwd(f"bench-{name}-") as cwd:
            code = subprocess.run(command, cwd=cwd).returncode
        ran[name] = (code, time.perf_counter() - start)
        print(f"== {name}: exit {code} in {ran[name][1]:.0f} s", flush=True)
    print(f"wrote {write_results(results, root / 'RESULTS.md', ran)}")
    return 1 if any(code for code, _ in ran.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
