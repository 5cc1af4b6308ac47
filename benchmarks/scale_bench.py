"""Scale: synthetic transformer-shaped models of ~0.3 / 1 / 3 GB (external data, generated, not committed)
go through load -> lossless pipeline -> qdq(mode=weight) -> save -> validate, each in its own process.

Reports wall time and peak RSS per size (with the sampled peaks of its anonymous and file-mapped parts),
and RSS as a multiple of the model's bytes.
Run: python benchmarks/scale_bench.py [--sizes 0.3,1,3] [--out benchmarks/results/scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN = 2048


def build(path: Path, gigabytes: float) -> int:
    """Transformer-shaped blocks: MatMul d->4d, Relu, MatMul 4d->d, residual Add, LayerNormalization."""
    import onnx_ir as ir

    d = HIDDEN
    per_block = 2 * d * 4 * d * 4
    blocks = max(1, round(gigabytes * 1e9 / per_block))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", d]))
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], x
    scale_v = ir.Value(name="ln_scale", const_value=ir.tensor(np.ones(d, np.float32), name="ln_scale"))
    inits.append(scale_v)
    for i in range(blocks):
        w1 = ir.Value(name=f"b{i}.w1", const_value=ir.tensor(rng.standard_normal((d, 4 * d), dtype=np.float32) * np.float32(d**-0.5), name=f"b{i}.w1"))
        w2 = ir.Value(name=f"b{i}.w2", const_value=ir.tensor(rng.standard_normal((4 * d, d), dtype=np.float32) * np.float32((4 * d) ** -0.5), name=f"b{i}.w2"))
        inits += [w1, w2]
        h = ir.node("MatMul", [cur, w1], name=f"b{i}.mm1")
        a = ir.node("Relu", [h.outputs[0]], name=f"b{i}.relu")
        o = ir.node("MatMul", [a.outputs[0], w2], name=f"b{i}.mm2")
        r = ir.node("Add", [cur, o.outputs[0]], name=f"b{i}.res")
        ln = ir.node("LayerNormalization", [r.outputs[0], scale_v], attributes={"axis": -1}, name=f"b{i}.ln")
        nodes += [h, a, o, r, ln]
        cur = ln.outputs[0]
    cur.name = "y"
    graph = ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="scale")
    ir.save(ir.Model(graph, ir_version=10), path, external_data=path.name + ".data")
    return blocks * per_block


def _memory() -> dict[str, int]:
    """RssAnon (process memory) and RssFile (mapped file pages: the memory-mapped weights) in bytes."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def child(src: str, out: str, pipeline: str) -> None:
    """One measured run, in its own process so peak RSS belongs to it alone.

    Peak RSS is the high-water mark of its address space (VmHWM: anonymous memory plus mapped file pages); a thread
    samples the two parts every 20 ms to say which one the peak is made of."""
    import threading

    from onnxpress.cli import run

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _memory().items():
                peaks[key] = max(peaks[key], value)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    code = run(["optimize", src, "-o", out, "-p", pipeline, "--dim", "batch=2", "--report", out + ".json"])
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    # VmHWM, not ru_maxrss: Linux folds the parent's peak (it generated the model) into a child's ru_maxrss at exec
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import peak_rss_mb

    peak = peak_rss_mb() * 1e6
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak, "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0.3,1,3")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.md"))
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from onnxpress.registry import registry

    pipeline = "simplify,fold,cse,dedup,prune-unused" + (",qdq(mode=weight)" if "qdq" in registry() else "")
    rows = []
    for gb in (float(s) for s in args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="onnxpress-scale-"))
        try:
            src = tmp / "model.onnx"
            nbytes = build(src, gb)
            out = tmp / "out" / "model.onnx"
            out.parent.mkdir()
            proc = subprocess.run([sys.executable, __file__, "--child", str(src), str(out), pipeline], capture_output=True, text=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            out_bytes = sum(p.stat().st_size for p in out.parent.glob("model.onnx*") if not p.name.endswith(".json"))
            rows.append({"gb": gb, "model_bytes": nbytes, "out_bytes": out_bytes, **result})
            print(rows[-1], flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"# Scale (pipeline `{pipeline}`, validation on CPU, {os.cpu_count()} cores)",
        "",
        "Command: `python benchmarks/scale_bench.py --sizes " + args.sizes + "` (each size in its own process; "
        "synthetic blocks MatMul d->4d, Relu, MatMul 4d->d, Add, LayerNormalization with d = 2048, float32 "
        "external data). Peak RSS is the process's VmHWM; anon / file are the sampled peaks of RssAnon and RssFile "
        "(file = mapped pages of the weight files). Target: peak RSS <= 1.5x the model's bytes.",
        "",
        "| model | weights bytes | output bytes | exit | wall s | s per GB | peak RSS | peak anon | peak file | RSS / model bytes | <= 1.5x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["peak_rss"] / r["model_bytes"]
        lines.append(
            f"| {r['gb']} GB | {r['model_bytes']:,} | {r['out_bytes']:,} | {r['code']} | {r['seconds']:.1f} | "
            f"{r['seconds'] / (r['model_bytes'] / 1e9):.1f} | {r['peak_rss'] / 1e9:.2f} GB | {r.get('peak_anon', 0) / 1e9:.2f} GB | "
            f"{r.get('peak_file', 0) / 1e9:.2f} GB | {ratio:.2f}x | {'yes' if ratio <= 1.5 else 'no'} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
