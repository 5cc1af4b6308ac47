"""Helpers every benchmark needs: the machine description, median latency of an onnxruntime session,
peak RSS (of this process, or of one child process alone), and a temporary working directory for peer
tools that drop files in the CWD (onnxruntime.quantization writes ``*.data`` / ``augmented_model.onnx``).

A benchmark run as a script has ``benchmarks/`` on ``sys.path``: ``from common import machine``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> str:
    """One line: CPU model, cores, RAM, OS, and the versions that decide the numbers."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}"
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    VmHWM (/proc/self/status) belongs to this process's own address space. ru_maxrss does not: Linux carries the
    parent's peak across fork + exec into the child's, so every child of a benchmark that had loaded MiniLM
    reported the parent's ~1.2 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def build_peak_rss_mb(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """(fn(), MB the process's peak RSS rose above its RSS before the call) — the memory a tool run in-process
    needed. Linux resets the VmHWM peak when "5" is written to /proc/self/clear_refs; None where it cannot."""
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        before = None
    result = fn()
    peak = _status_kb("VmHWM")
    return result, (None if before is None or peak is None else max(0.0, (peak - before) * 1024 / 1e6))


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float  # from start to exit, interpreter start-up and imports included
    peak_rss_mb: float  # os.wait4: this child's, but Linux folds in the parent's peak at fork+exec: prefer what
    # the child reports of itself with peak_rss_mb()
    stdout: str
    stderr: str


def run_child(argv: Sequence[str], *, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> ChildRun:
    """Run one command; its wall time and its own peak RSS.

    ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the maximum over every child ever waited for, so a
    small tool measured after a big one would inherit the big one's peak; ``os.wait4`` gives this child's."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=cwd, env=None if env is None else dict(env))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, wall, usage.ru_maxrss * 1024 / 1e6, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


@contextlib.contextmanager
def temp_cwd(prefix: str = "onnxpress-bench-") -> Iterator[Path]:
    """chdir into a fresh temporary directory (removed afterwards), for tools that write into the CWD."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(previous)


def latency_session(path: str | os.PathLike, threads: int = 2) -> Any:
    """An onnxruntime CPU session for latency timing: ``threads`` intra-op threads that do not spin between runs.

    With ORT's default spin-waiting, the workers of the session that just ran keep the cores busy while the next
    session runs, which inflates and scrambles interleaved timings of several models (measured: the same MiniLM
    model 17.8 ms alone, 29 ms among ten spinning sessions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_latency_ms(session: Any, feed: Mapping[str, Any], runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``session.run(None, feed)`` over ``runs`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        session.run(None, dict(feed))
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def file_mb(path: str | os.PathLike) -> float:
    """MB on disk of a model file plus the external-data files beside it that it names."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location and location not in seen:
                seen.add(location)
                total += (path.parent / location).stat().st_size
    return total / 1e6


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; ``|`` in cells is escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
