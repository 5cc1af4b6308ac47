"""Run onnxpress's lossless pipeline over the ONNX backend node test data shipped inside the onnx package.

For each model: onnxruntime runs the original on the test inputs; if it cannot, or if it disagrees with the
expected outputs, the model is skipped with that reason (onnxpress cannot prove anything there).  Otherwise
the model is optimized with the given pipeline and the result must give the expected outputs with the same
tolerance (the ONNX backend test's rtol=1e-3, atol=1e-7, widened to the original's own error).
Usable as a script: ``python tests/reliability/node_suite.py [--limit N] [--pipeline TEXT]``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import os
import sys
from pathlib import Path

import numpy as np


def _cache_root() -> Path:
    return Path(os.environ.get("ONNXPRESS_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "onnxpress"))


def _write_value(value, name: str, path: Path) -> None:
    from onnx import numpy_helper

    import onnx

    if isinstance(value, onnx.TensorProto):
        proto = value
    elif isinstance(value, list):
        proto = numpy_helper.from_list(value, name)
    elif value is None or isinstance(value, dict):
        proto = numpy_helper.from_optional(value, name)
    else:
        proto = numpy_helper.from_array(np.asarray(value), name)
    path.write_bytes(proto.SerializeToString())


def materialize_node_tests(root: Path | None = None) -> Path:
    """The onnx wheel ships the node tests as generators (onnx.backend.test.case.node), not as files:
    write them once as model.onnx + test_data_set_0/{input,output}_*.pb, the layout of the ONNX test data."""
    import warnings

    root = root or _cache_root() / "node-tests"
    marker = root / ".complete"
    if marker.exists():
        return root
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for case in cases:
        folder = tmp / case.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(case.model.SerializeToString())
        try:
            for i, (inputs, outputs) in enumerate(case.data_sets):
                ds = folder / f"test_data_set_{i}"
                ds.mkdir(exist_ok=True)
                for j, value in enumerate(inputs):
                    _write_value(value, case.model.graph.input[j].name if j < len(case.model.graph.input) else "", ds / f"input_{j}.pb")
                for j, value in enumerate(outputs):
                    _write_value(value, case.model.graph.output[j].name if j < len(case.model.graph.output) else "", ds / f"output_{j}.pb")
        except Exception as exc:  # test data onnx itself cannot serialize
            (folder / "skip.txt").write_text(f"test data not serializable: {type(exc).__name__}")
    (tmp / ".complete").write_text("ok")
    if root.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return root
    os.replace(tmp, root)
    return root


def node_test_dirs() -> list[Path]:
    """Every model of the ONNX backend test data: the generated node tests plus the suites the wheel ships."""
    import onnx

    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data"
    dirs = [p.parent for p in shipped.glob("*/*/model.onnx")]
    dirs += [p.parent for p in materialize_node_tests().glob("*/model.onnx")]
    return sorted(dirs)


def _close(actual, expected, rtol, atol) -> bool:
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(_close(a, e, rtol, atol) for a, e in zip(actual, expected))
    if expected is None:
        return actual is None
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return False
    if expected.dtype.kind in "OUS":
        return bool(np.array_equal(actual, expected))
    if expected.dtype.kind in "biu":
        return bool(np.array_equal(actual, expected))
    return bool(np.allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True))


def check_one(folder: str, pipeline: str) -> tuple[str, str, str]:
    """Returns (name, status, reason): status is 'matched', 'skipped' or 'failed'."""
    import onnxruntime as ort

    import onnxpress
    from onnxpress import runtime
    from onnxpress.data import load_pb_folder
    from onnxpress.errors import OnnxpressError

    name = Path(folder).name
    path = Path(folder) / "model.onnx"
    try:
        model = onnxpress.load(path)
    except OnnxpressError as exc:
        return name, "skipped", f"load: {exc}"
    if (Path(folder) / "skip.txt").exists():
        return name, "skipped", (Path(folder) / "skip.txt").read_text()
    data_sets = sorted(glob.glob(os.path.join(folder, "test_data_set_*")))
    if not data_sets:
        return name, "skipped", "no test data"
    in_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    out_names = [v.name for v in model.graph.outputs]
    try:
        so = runtime.session_options()
        ref = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return name, "skipped", f"onnxruntime cannot load the original: {' '.join(str(exc).split())[:120]}"
    cases = []
    for ds in data_sets:
        feeds = load_pb_folder(ds, "input", in_names)
        expected = load_pb_folder(ds, "output", out_names)
        if any(not isinstance(v, np.ndarray) for v in feeds.values()):
            return name, "skipped", "non-tensor inputs (sequence/optional)"
        try:
            got = dict(zip(out_names, ref.run(out_names, feeds)))
        except Exception as exc:
            return name, "skipped", f"onnxruntime cannot run the original: {' '.join(str(exc).split())[:120]}"
        if not all(_close(got[k], expected[k], 1e-3, 1e-7) for k in out_names if k in expected):
            return name, "skipped", "onnxruntime's own result differs from the expected outputs"
        cases.append((feeds, expected))
    try:
        out, report = onnxpress.optimize(path, pipeline, validate_result=False)
    except OnnxpressError as exc:  # a clear refusal, e.g. a pass that cannot handle the model
        return name, "skipped", f"onnxpress: {exc}"
    except Exception as exc:
        return name, "failed", f"crash: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    try:  # from here on, anything that goes wrong means the rewrite broke the model
        session = runtime.make_session(out)
        for feeds, expected in cases:
            got = dict(zip(out_names, session.run(out_names, feeds)))
            for k in out_names:
                if k in expected and not _close(got[k], expected[k], 1e-3, 1e-5):
                    return name, "failed", f"output {k} differs after {pipeline}"
    except Exception as exc:
        return name, "failed", f"rewritten model does not run: {' '.join(str(exc).split())[:200]}"
    return name, "matched", ""


def run_suite(pipeline: str, limit: int | None = None, workers: int = 2, stride: int = 1):
    dirs = node_test_dirs()[::stride]
    if limit:
        dirs = dirs[:limit]
    results = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(check_one, str(d), pipeline): d for d in dirs}
        for fut in concurrent.futures.as_completed(futures):
            try:
                results.append(fut.result())
            except Exception as exc:  # worker died (native crash)
                results.append((futures[fut].name, "failed", f"worker died: {exc}"))
    return sorted(results)


def summarize(results) -> dict[str, int]:
    return dict(collections.Counter(status for _, status, _ in results))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args()
    from onnxpress.api import default_pipeline

    res = run_suite(args.pipeline or default_pipeline(), args.limit, stride=args.stride)
    reasons = collections.Counter(r.split(":")[0] for _, s, r in res if s == "skipped")
    for name, status, reason in res:
        if status == "failed":
            print(f"FAILED {name}: {reason}")
    print(summarize(res))
    print(reasons.most_common(10))
    sys.exit(1 if any(s == "failed" for _, s, _ in res) else 0)
