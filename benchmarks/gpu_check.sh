#!/usr/bin/env bash
# CUDA check in one go: is CUDA usable here, does the model compute on CUDAExecutionProvider what it computes
# on the CPU provider, and how fast is it on each (median of >= 20 runs).
#
#   benchmarks/gpu_check.sh [MODEL.onnx [CANDIDATE.onnx]] [--dim NAME=VALUE ...] [--runs N] [--min-cosine C]
#                           [--atol A --rtol R] [--dry-run-on-cpu]
#
# MODEL: the reference, run on the CPU provider (default: a synthetic 1024-4096-1024 MLP, batch 64).
# CANDIDATE: the model validated and timed on CUDA (default: MODEL itself).
# Exit status: 0 when CUDA ran every check and the outputs match; 1 with one line naming what is missing
# (onnxruntime-gpu, a visible GPU, CUDA libraries) or what failed; 2 for bad arguments.
# --dry-run-on-cpu runs every step with the CPU provider in place of CUDA (tests the script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
exec "$PY" - "$@" <<'PYEOF'
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def fail(message: str, code: int = 1) -> None:
    sys.stderr.write(f"gpu_check: FAIL: {' '.join(message.split())}\n")
    sys.exit(code)


def synthetic_mlp(path: str) -> None:
    """x[batch,1024] -> MatMul 1024x4096 -> Add -> Relu -> MatMul 4096x1024 -> Add -> Softmax (seeded)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((1024, 4096)) * 0.03).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(4096) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((4096, 1024)) * 0.03).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(1024) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]), helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
        helper.make_node("Add", ["h4", "b2"], ["h5"]), helper.make_node("Softmax", ["h5"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "gpu_check_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def latency_ms(session, feed, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.sh", description="Validate and time a model on CUDA vs CPU.")
    ap.add_argument("model", nargs="?", help="reference .onnx (default: a synthetic MLP)")
    ap.add_argument("candidate", nargs="?", help=".onnx validated and timed on CUDA (default: MODEL)")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="symbolic dimension value (default batch=64)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per provider (>= 20)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-cosine", type=float, default=0.9999, help="pass on output cosine >= this (default)")
    ap.add_argument("--atol", type=float, help="elementwise check |a-b| <= atol + rtol*|b| instead of cosine")
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--dry-run-on-cpu", action="store_true", help="use the CPU provider in place of CUDA (tests the script)")
    args = ap.parse_args()
    if args.runs < 20:
        fail("--runs must be >= 20 (the median of fewer runs is noise)", 2)
    dims = {"batch": 64}
    for item in args.dim:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) <= 0:
            fail(f"--dim expects NAME=POSITIVE_INT, got '{item}'", 2)
        dims[name] = int(value)

    from onnxpress import runtime, targets
    from onnxpress.errors import OnnxpressError
    from onnxpress.io import load
    from onnxpress.validate import Tolerance, make_feeds, validate

    device = "cpu" if args.dry_run_on_cpu else "cuda"
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; providers: {', '.join(ort.get_available_providers())}")
    if device == "cuda":
        status = targets.cuda_status()
        if not status.ok:
            fail(status.problem)
        print(f"GPU: {gpu_name()}")
    else:
        print("DRY RUN: the CPU provider stands in for CUDA; no figure below is a GPU figure")

    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    try:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "mlp.onnx")
            synthetic_mlp(model)
            print("model: synthetic MLP 1024-4096-1024 (fp32, 8.4M parameters)")
        candidate = args.candidate or model
        for path in (model, candidate):
            if not os.path.isfile(path):
                fail(f"{path}: no such file", 2)
        feeds = make_feeds(load(model), None, dims, seed=0)
        tolerance = Tolerance(atol=args.atol, rtol=args.rtol) if args.atol is not None else Tolerance(min_cosine=args.min_cosine)

        # The CPU reference, then the candidate on CUDA. A CUDA session that silently fell back to the CPU
        # provider would make the whole check meaningless: refuse it.
        cpu_session = runtime.make_session(model, "cpu")
        reference_outputs = [runtime.run(cpu_session, f) for f in feeds]
        dev_session = runtime.make_session(candidate, device)
        if device == "cuda" and dev_session.get_providers()[0] != "CUDAExecutionProvider":
            fail(f"the CUDA session fell back to {dev_session.get_providers()}")
        assignment = targets.ep_assignment(candidate, device)
        on_device = sum(assignment.get(dev_session.get_providers()[0], {}).values())
        total = sum(sum(c.values()) for c in assignment.values())
        print(f"nodes on {dev_session.get_providers()[0]}: {on_device}/{total}")
        for ep, ops in assignment.items():
            if ep != dev_session.get_providers()[0]:
                print(f"  on {ep}: " + ", ".join(f"{op} x{n}" for op, n in ops.items()))
        report = validate(model, candidate, inputs=feeds, tolerance=tolerance, provider=device, reference_outputs=reference_outputs)

        cpu_candidate = cpu_session if candidate == model else runtime.make_session(candidate, "cpu")
        cpu_ms = latency_ms(cpu_candidate, feeds[0], args.runs, args.warmup)
        dev_ms = latency_ms(dev_session, feeds[0], args.runs, args.warmup)
    except OnnxpressError as exc:
        fail(str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    label = "CUDA" if device == "cuda" else "CPU standing in for CUDA"
    val = Table(title=f"Validation: {label} vs CPU reference ({tolerance.describe()}, inputs {dims})")
    for col in ("output", "shape", "max abs", "rel L2", "cosine", "verdict"):
        val.add_column(col)
    for o in report.outputs:
        val.add_row(o.name, str(list(o.shape)), f"{o.max_abs:.3g}", f"{o.rel_l2:.3g}", f"{o.cosine:.7f}", "ok" if o.within_tolerance else f"FAIL {o.note}")
    console.print(val)
    lat = Table(title=f"Latency of session.run, {args.runs} runs after {args.warmup} warm-up (ms)")
    for col in ("provider", "median", "p10", "p90", "min", "speedup vs CPU"):
        lat.add_column(col, justify="left" if col == "provider" else "right")
    cpu_med = statistics.median(cpu_ms)
    for name, ms in (("CPU", cpu_ms), (label, dev_ms)):
        q = np.percentile(ms, [10, 90])
        lat.add_row(name, f"{statistics.median(ms):.3f}", f"{q[0]:.3f}", f"{q[1]:.3f}", f"{min(ms):.3f}", f"{cpu_med / statistics.median(ms):.2f}x")
    console.print(lat)
    if not report.passed:
        fail(f"{label} outputs differ from the CPU reference: " + ", ".join(o.name for o in report.outputs if not o.within_tolerance))
    print(f"gpu_check: OK ({label})")
    return 0


sys.exit(main())
PYEOF
