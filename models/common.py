"""Shared machinery of the real-model builders: cached builds, seeding, running.

The cache folder is onnxpress's (``onnxpress.io.cache_dir``: ``$ONNXPRESS_CACHE`` when set; otherwise
``<repo>/.cache/onnxpress`` when onnxpress runs from a source checkout (git-ignored), else
``~/.cache/onnxpress``).  Every cached file is written with ``onnxpress.io.atomic_write`` (a temporary file in
the same folder, renamed into place), and a build holds an exclusive file lock, so two processes
(pytest-xdist workers) building the same model do the work once and never see a partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.io import atomic_write, cache_dir

DATA_DIR = Path(__file__).resolve().parent / "data"
Feed = dict[str, np.ndarray]


def read_lines(name: str) -> list[str]:
    """Non-empty, non-comment lines of a data file shipped in ``onnxpress.models`` (``data/<name>``)."""
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (POSIX flock; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: builds may race, writes stay atomic
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def save_onnx(model: Any, path: Path) -> Path:
    """Save an ir.Model as one self-contained .onnx file, atomically."""
    from onnxpress import io

    return io.save(model, path, external_data=False)


def save_json(data: dict, path: Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float)))


def save_npy(array: np.ndarray, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return atomic_write(path, write)


def cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``; when missing, build it under the lock (``build`` must write it atomically)."""
    if path.exists():
        return path
    with file_lock(path):
        if not path.exists():  # another process may have built it while we waited for the lock
            build(path)
    if not path.exists():
        raise RuntimeError(f"the builder did not write {path}")
    return path


def build_info(path: Path) -> dict:
    """The JSON written beside a built model (``<name>.json``): sizes, scores, build time, versions."""
    meta = path.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def parameter_count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --- running ONNX models -------------------------------------------------------------------------------


def session_for(model_or_path: Any):
    """An onnxruntime CPU session for an ir.Model, an onnx.ModelProto, or a path."""
    from onnxpress import runtime

    if isinstance(model_or_path, (str, os.PathLike)):
        return runtime.make_session(os.fspath(model_or_path))
    return runtime.make_session(model_or_path)


def run_feeds(model_or_path: Any, feeds: Iterable[Feed], output: str | None = None) -> list[np.ndarray]:
    """Run every feed and return the chosen output (default: the first) of each."""
    from onnxpress import runtime

    session = model_or_path if hasattr(model_or_path, "get_outputs") else session_for(model_or_path)
    name = output or session.get_outputs()[0].name
    return [runtime.run(session, feed, [name])[name] for feed in feeds]


def batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[Feed]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def file_digest(path: Path) -> str:
    """A short identity of a file for cache keys (size and mtime in ns; cheap, changes on rebuild)."""
    st = path.stat()
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"
