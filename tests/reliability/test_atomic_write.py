"""Atomic output: a save that dies leaves the old output or none, never a partial or mismatched one.

A child process builds a model whose weights all equal its ``seed`` (so any mix of two saves is visible)
and calls ``onnxpress.save``; the parent kills it with SIGKILL
- at a deterministic point: when the save renames the data file or the model file into place
  (``os.replace`` is wrapped in the child to kill itself there), or
- in the middle of writing hundreds of MB (the parent polls the sizes of the files being written; slow).

Then the output folder must hold either the complete old output (the same bytes as before) or no output,
and a later save into the same folder must work.  SIGKILL cannot run any clean-up, so the temporary files
of the killed save stay behind: they are hidden (``.<name>.*.tmp``), never named like an output, and a later
run neither reads nor trips over them.  Ordinary failures (an exception, Ctrl-C) leave no temporary file.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxpress
from onnxpress.cli import run
from seeded_chain import seeded_chain

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import onnxpress

    out, n, layers, seed, external, kill_at, here = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6], sys.argv[7]
    sys.path.insert(0, here)
    from seeded_chain import seeded_chain

    model = seeded_chain(seed, n, layers)
    if kill_at != "none":
        target = os.path.abspath(out if kill_at == "model" else out + ".data")
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if os.path.abspath(dst) == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    print("saving", flush=True)
    onnxpress.save(model, out, external_data=external)
    print("saved", flush=True)
    """
)


def child(out: Path, n: int, layers: int, seed: int, external: bool, kill_at: str = "none") -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(out), str(n), str(layers), str(seed), "1" if external else "0", kill_at, str(Path(__file__).parent)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def save_in_child(out: Path, n: int, layers: int, seed: int, external: bool, kill_at: str = "none") -> int:
    proc = child(out, n, layers, seed, external, kill_at)
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err
    return proc.returncode


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def output_state(out: Path, layers: int) -> str:
    """'none', or 'seed=<s>' when out.onnx loads and weight i holds only s*1000+i for every i; else 'mixed'."""
    if not out.exists():
        return "none"
    model = onnxpress.load(out)
    seeds = set()
    for i in range(layers):
        array = model.graph.initializers[f"w{i}"].const_value.numpy()
        rows = np.concatenate([array[:: max(1, array.shape[0] // 7)].ravel(), array[-1]])  # rows spread over the tensor
        seeds.update(((np.unique(rows) - i) / 1000).tolist())
    return f"seed={int(seeds.pop())}" if len(seeds) == 1 else f"mixed seeds {sorted(seeds)[:4]}"


def leftovers(folder: Path, out: Path) -> list[str]:
    names = {out.name, out.name + ".data"}
    return sorted(p for p in os.listdir(folder) if p not in names)


def assert_leftovers_are_hidden_temporaries(folder: Path, out: Path) -> None:
    for name in leftovers(folder, out):
        assert name.startswith(f".{out.name}.") and name.endswith(".tmp"), name


def assert_later_run_works(folder: Path, out: Path, layers: int, seed: int) -> None:
    """A later save into the same folder is not confused by what a killed save left behind."""
    stale = {name: (folder / name).stat().st_mtime_ns for name in leftovers(folder, out)}
    assert save_in_child(out, 32, layers, seed, external=True) == 0
    assert output_state(out, layers) == f"seed={seed}"
    assert {name: (folder / name).stat().st_mtime_ns for name in stale} == stale  # untouched, not read
    optimized = folder / "optimized.onnx"
    assert run(["optimize", str(out), "-o", str(optimized)]) == 0
    assert output_state(optimized, layers) == f"seed={seed}"


# ---------------------------------------------------------------------------------------------- deterministic kills


@pytest.mark.slow  # four child processes killed mid-save; the single-file kill below stays in the fast tier
@pytest.mark.parametrize("kill_at", ["data", "model"])
@pytest.mark.parametrize("had_output", [True, False], ids=["old-output", "no-output"])
def test_kill_at_each_rename_leaves_old_output_or_none(tmp_path, kill_at, had_output):
    """External data: two files. The old .onnx must never be left beside the new .data (it would load and
    compute with the new weights), whatever rename the kill interrupts."""
    out = tmp_path / "out.onnx"
    layers = 3
    if had_output:
        assert save_in_child(out, 32, layers, seed=1, external=True) == 0
        assert output_state(out, layers) == "seed=1"
    old = (sha(out), sha(tmp_path / "out.onnx.data"))
    code = save_in_child(out, 32, layers, seed=2, external=True, kill_at=kill_at)
    assert code == -signal.SIGKILL
    state = output_state(out, layers)
    assert state in ("seed=1", "none"), f"after a kill at the {kill_at} rename the output is {state}"
    if state == "seed=1":
        assert (sha(out), sha(tmp_path / "out.onnx.data")) == old  # the old output, bit for bit
    assert_leftovers_are_hidden_temporaries(tmp_path, out)
    assert_later_run_works(tmp_path, out, layers, seed=3)


def test_kill_at_rename_of_single_file_keeps_old_output(tmp_path):
    out = tmp_path / "out.onnx"
    assert save_in_child(out, 32, 2, seed=1, external=False) == 0
    old = sha(out)
    assert save_in_child(out, 32, 2, seed=2, external=False, kill_at="model") == -signal.SIGKILL
    assert sha(out) == old and output_state(out, 2) == "seed=1"
    assert_leftovers_are_hidden_temporaries(tmp_path, out)
    assert_later_run_works(tmp_path, out, 2, seed=3)


# ---------------------------------------------------------------------------------------------- clean failures


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("external", [True, False], ids=["external", "single-file"])
def test_failure_while_writing_cleans_up_and_keeps_old_output(tmp_path, monkeypatch, error, external):
    out = tmp_path / "out.onnx"
    onnxpress.save(seeded_chain(1.0), out, external_data=external)
    old = {p.name: sha(p) for p in tmp_path.iterdir()}

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"partial")  # a partial file exists when the failure hits
        if external:
            (Path(path).parent / kwargs["external_data"]).write_bytes(b"partial data")
        raise error

    monkeypatch.setattr(ir, "save", failing_save)
    with pytest.raises(type(error)):
        onnxpress.save(seeded_chain(2.0), out, external_data=external)
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == old  # no temporary file, the old output intact
    assert output_state(out, 2) == "seed=1"


# ---------------------------------------------------------------------------------------------- real kills mid-write


def _kill_mid_write(out: Path, n: int, layers: int, external: bool) -> tuple[int, int]:
    """Start a save of ``layers`` n x n float weights, SIGKILL it once a file being written holds between 5%
    and 80% of the weights; returns (bytes seen in the largest file at the kill, total weight bytes)."""
    total = n * n * 4 * layers
    folder = out.parent
    before = {p: os.stat(folder / p).st_size for p in os.listdir(folder)}
    proc = child(out, n, layers, seed=2, external=external)
    seen = 0
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            sizes = []
            for dirpath, _, files in os.walk(folder):
                for name in files:
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, folder)
                    try:
                        size = os.stat(path).st_size
                    except FileNotFoundError:
                        continue
                    if before.get(rel) != size:
                        sizes.append(size)
            seen = max(sizes, default=0)
            if total * 0.05 < seen < total * 0.8:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the save finished before the kill (saw {seen} of {total} bytes)"
    return seen, total


@pytest.mark.slow
@pytest.mark.parametrize("external", [True, False], ids=["external", "single-file"])
@pytest.mark.parametrize("had_output", [True, False], ids=["old-output", "no-output"])
def test_sigkill_in_the_middle_of_a_large_save(tmp_path, capsys, external, had_output):
    """~400 MB of weights; the writer is killed while the file grows."""
    out = tmp_path / "out.onnx"
    n, layers = 5000, 4  # 4 x 100 MB
    if had_output:
        assert save_in_child(out, 64, layers, seed=1, external=external) == 0
    old = {p.name: sha(p) for p in tmp_path.iterdir()}
    seen, total = _kill_mid_write(out, n, layers, external)
    state = output_state(out, layers)
    assert state == ("seed=1" if had_output else "none"), state
    assert {name: sha(tmp_path / name) for name in old} == old
    assert_leftovers_are_hidden_temporaries(tmp_path, out)
    left = leftovers(tmp_path, out)
    with capsys.disabled():  # stderr: under xdist only fd 2 of a worker reaches the terminal
        sys.stderr.write(f"\nSIGKILL after {seen / 1e6:.0f} of {total / 1e6:.0f} MB ({'external data' if external else 'single file'}, "
                         f"{'old output' if had_output else 'no output'} before): output {state}, temporary files left by the kill: {left}\n")
    assert_later_run_works(tmp_path, out, layers, seed=3)
