"""Benchmark of the ``qdq`` pass against onnxruntime.quantization, both run here on the same calibration data.

    .venv/bin/python benchmarks/qdq_bench.py [--runs 20] [--skip-minilm] [--skip-digits] [--markdown PATH]

MiniLM (all-MiniLM-L6-v2, onnxpress.models.minilm): size, build time, CPU latency (onnxruntime, 2 threads,
batch 8 x seq 64 and batch 1 x seq 128, median of --runs runs after warm-up, models interleaved so machine
load hits all alike), cosine of the sentence embeddings against fp32 (mean and min) and nearest-neighbour
agreement (each evaluation sentence's nearest other sentence is the same as with fp32).
Digits (onnxpress.models.digits, MLP and CNN): top-1 accuracy and its drop against fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress import runtime
from onnxpress.api import model_bytes
from onnxpress.pass_infra import PassContext
from onnxpress.pipeline import Pipeline

OURS = {
    "onnxpress qdq static int8": "qdq(mode=static)",
    "onnxpress qdq weight int8": "qdq(mode=weight)",
    "onnxpress qdq int4 (MatMulNBits)": "qdq(mode=int4)",
}


# -- builders --------------------------------------------------------------------------------------
def ours(text: str, src: Path, feeds, out: Path) -> Path:
    model = ir.load(src)
    p = Pipeline.parse(text).passes[0]
    p.context = PassContext(calibration=feeds)
    p(model)
    ir.save(model, out)
    return out


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # pragma: no cover - some ORT versions call it
        pass


def peer_dynamic(src: Path, feeds, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def peer_static(src: Path, feeds, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    quantize_static(str(src), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return out


def peer_int4(src: Path, feeds, out: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=32, is_symmetric=False,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    q.process()
    onnx.save(q.model.model, str(out))
    return out


def build_all(src: Path, feeds, tmp: Path, with_int4: bool = True) -> dict[str, tuple[Path, float]]:
    jobs: dict[str, Callable[[], Path]] = {
        "fp32": lambda: src,
        "ORT quantize_dynamic per-channel": lambda: peer_dynamic(src, feeds, tmp / "dyn.onnx"),
        "ORT quantize_static QDQ per-channel MinMax": lambda: peer_static(src, feeds, tmp / "static.onnx"),
    }
    if with_int4:
        jobs["ORT MatMulNBits RTN b32 + Gather"] = lambda: peer_int4(src, feeds, tmp / "nbits.onnx")
    for label, text in OURS.items():
        if "int4" in label and not with_int4:
            continue
        jobs[label] = lambda text=text, label=label: ours(text, src, feeds, tmp / f"{abs(hash(label))}.onnx")
    built = {}
    for label, job in jobs.items():
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            path = job()
        built[label] = (path, time.perf_counter() - start)
        print(f"  built {label} in {built[label][1]:.1f} s", flush=True)
    return built


# -- measurements ----------------------------------------------------------------------------------
def size_mb(path: Path) -> float:
    return model_bytes(onnx.load(str(path), load_external_data=False)) / 1e6 if not _has_external(path) else _disk(path) / 1e6


def _has_external(path: Path) -> bool:
    return any(p.name != path.name and p.name.startswith(path.stem) for p in path.parent.iterdir())


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.stem))


def latencies(paths: dict[str, Path], shapes: list[tuple[int, int]], runs: int, make_feed) -> dict[str, list[float]]:
    """Median ms per model and shape; rounds interleave the models so background load is shared fairly."""
    sessions = {k: runtime.make_session(str(p), threads=2) for k, p in paths.items()}
    out: dict[str, list[float]] = {k: [] for k in paths}
    for shape in shapes:
        feed = make_feed(*shape)
        times: dict[str, list[float]] = {k: [] for k in paths}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        for _ in range(runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        for k in paths:
            out[k].append(float(np.median(times[k]) * 1000))
    return out


def embeddings(path: Path, feeds) -> np.ndarray:
    s = runtime.make_session(str(path))
    name = s.get_outputs()[0].name
    return np.concatenate([s.run([name], f)[0] for f in feeds]).reshape(sum(len(next(iter(f.values()))) for f in feeds), -1)


def compare_embeddings(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    b = out / np.linalg.norm(out, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    return float(cos.mean()), float(cos.min()), float((sa.argmax(1) == sb.argmax(1)).mean())


# -- suites ----------------------------------------------------------------------------------------
def minilm_suite(runs: int) -> tuple[list[dict[str, Any]], str]:
    from onnxpress.models import minilm

    src = Path(minilm.build())
    cal = minilm.calibration_feeds()
    ev = minilm.evaluation_feeds()
    rng = np.random.default_rng(0)
    names = [i.name for i in runtime.make_session(str(src)).get_inputs()]

    def make_feed(batch: int, seq: int) -> dict[str, np.ndarray]:
        feed = {}
        for n in names:
            if "mask" in n:
                feed[n] = np.ones((batch, seq), np.int64)
            elif "type" in n:
                feed[n] = np.zeros((batch, seq), np.int64)
            else:
                feed[n] = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
        return feed

    rows = []
    with tempfile.TemporaryDirectory(prefix="qdq-bench-") as tmp:
        built = build_all(src, cal, Path(tmp))
        lat = latencies({k: p for k, (p, _) in built.items()}, [(8, 64), (1, 128)], runs, make_feed)
        ref = embeddings(src, ev)
        fp32_mb = size_mb(src)
        for label, (path, seconds) in built.items():
            mean_cos, min_cos, nn = compare_embeddings(ref, embeddings(path, ev))
            mb = size_mb(path)
            metric = ""
            if hasattr(minilm, "evaluate"):
                with contextlib.suppress(Exception):
                    m = minilm.evaluate(str(path), reference=str(src))
                    metric = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float) and k not in ("mean_cosine", "min_cosine"))[:60]
            rows.append({
                "model": "MiniLM", "method": label, "MB": mb, "ratio": fp32_mb / mb, "build_s": seconds,
                "b8s64_ms": lat[label][0], "b1s128_ms": lat[label][1], "mean_cos": mean_cos, "min_cos": min_cos, "nn": nn, "metric": metric,
            })
    return rows, f"MiniLM: {len(cal)} calibration batches, {ref.shape[0]} evaluation sentences"


def digits_suite() -> list[dict[str, Any]]:
    from onnxpress.models import digits

    rows = []
    for kind in ("mlp", "cnn"):
        src = Path(digits.build(kind))
        cal = digits.calibration_feeds(kind)
        with tempfile.TemporaryDirectory(prefix="qdq-bench-") as tmp:
            built = build_all(src, cal, Path(tmp), with_int4=False)
            fp32_mb = size_mb(src)
            ref = np.concatenate(common_logits(src, digits.evaluation_feeds(kind)))
            for label, (path, seconds) in built.items():
                m = digits.evaluate(str(path), kind, reference=str(src))
                out = np.concatenate(common_logits(path, digits.evaluation_feeds(kind)))
                mean_cos, min_cos, _ = compare_embeddings(ref, out)
                rows.append({
                    "model": f"digits-{kind}", "method": label, "MB": size_mb(path), "ratio": fp32_mb / size_mb(path), "build_s": seconds,
                    "b8s64_ms": float("nan"), "b1s128_ms": float("nan"), "mean_cos": mean_cos, "min_cos": min_cos, "nn": float("nan"),
                    "metric": f"top-1 {m['accuracy'] * 100:.2f}% (drop {m['accuracy_drop'] * 100:+.2f} pt)",
                })
    return rows


def common_logits(path: Path, feeds) -> list[np.ndarray]:
    s = runtime.make_session(str(path))
    return [s.run(None, f)[0] for f in feeds]


# -- output ----------------------------------------------------------------------------------------
COLUMNS = ["model", "method", "MB", "ratio", "build s", "ms b8xs64", "ms b1xs128", "mean cos", "min cos", "NN", "task metric"]


def cells(r: dict[str, Any]) -> list[str]:
    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    return [
        r["model"], r["method"], f(r["MB"], ".2f"), f(r["ratio"], ".2f") + "x", f(r["build_s"], ".1f"), f(r["b8s64_ms"], ".1f"),
        f(r["b1s128_ms"], ".1f"), f(r["mean_cos"], ".5f"), f(r["min_cos"], ".4f"), f(r["nn"] * 100 if r["nn"] == r["nn"] else r["nn"], ".1f") + ("%" if r["nn"] == r["nn"] else ""), r["metric"],
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    notes = []
    if not args.skip_minilm:
        try:
            minilm_rows, note = minilm_suite(args.runs)
            rows += minilm_rows
            notes.append(note)
        except ImportError as exc:
            notes.append(f"MiniLM skipped: {exc}")
    if not args.skip_digits:
        rows += digits_suite()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"qdq vs onnxruntime.quantization ({machine()})")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("model", "method", "task metric") else "right")
    for r in rows:
        table.add_row(*cells(r))
    console = Console(width=220)
    console.print(table)
    for n in notes:
        console.print(n)
    if args.markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
        args.markdown.write_text(f"Machine: {machine()}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
