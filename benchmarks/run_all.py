"""`make bench`: every benchmark in one run on this machine, then benchmarks/RESULTS.md from their tables.

Each benchmark script writes its own table to benchmarks/results/<name>.md (measured figures, the peer in
the same run); this script runs them in order and concatenates the tables under a machine description.
Run a subset with: python benchmarks/run_all.py qdq factorize
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, arguments); order: cheap first, so a partial run still yields tables
BENCHMARKS = {
    "tool_speed": ("tool_speed_bench.py", []),
    "qdq": ("qdq_bench.py", []),
    "factorize": ("factorize_bench.py", []),
    "prune": ("prune_bench.py", []),
    "budget": ("budget_bench.py", []),
    "mobile": ("mobile_bench.py", []),
    "scale": ("scale_bench.py", []),
}


def machine() -> str:
    import numpy
    import onnxruntime

    cpu = "unknown CPU"
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


def main(names: list[str]) -> int:
    selected = names or list(BENCHMARKS)
    failures = []
    for name in selected:
        script, extra = BENCHMARKS[name]
        path = HERE / script
        if not path.exists():
            print(f"== {name}: {script} not present, skipped")
            continue
        print(f"== {name}: {script}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path), *extra])
        print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode:
            failures.append(name)
    parts = [
        "# onnxpress benchmark results",
        "",
        f"Measured by `make bench` on {datetime.date.today().isoformat()}: {machine()}.",
        "Every table compares onnxpress with the peer tool measured in the same run on the same data; latency is",
        "the median of repeated onnxruntime runs after warm-up; ratios are the headline, absolute times depend on",
        "the machine.",
        "",
    ]
    for name in BENCHMARKS:
        table = HERE / "results" / f"{name}.md"
        if table.exists():
            parts += [table.read_text().strip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
