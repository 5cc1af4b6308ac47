"""The sensitivity cache: each (layer, candidate)'s measured ``d`` on disk, keyed by the model, the
sensitivity feeds and the candidate grid, so a second search of the same model skips the measurements."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

CACHE_VERSION = 3  # 3: d measured with the run-time input quantization of the rewritten kernels


def digest(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], extra: str) -> str:
    """A short hash of the model, the feeds (names, dtypes, shapes, bytes) and ``extra`` (the grid)."""
    h = hashlib.sha256()
    h.update(ir.to_proto(model).SerializeToString(deterministic=True))
    for feed in feeds:
        for k in sorted(feed):
            h.update(k.encode())
            a = np.ascontiguousarray(feed[k])
            h.update(str((a.dtype, a.shape)).encode())
            h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:24]


def cache_file(cache: Any, key: str) -> Path | None:
    """``cache``: True (``onnxpress.io.cache_dir()``: ``$ONNXPRESS_CACHE``, a checkout's ``.cache/onnxpress``, else
    ``~/.cache/onnxpress``), a folder, or False/None (no cache)."""
    if cache is False or cache is None:
        return None
    if cache is True:
        from onnxpress.io import cache_dir

        root = cache_dir()
    else:
        root = Path(cache)
    return root / "budget" / f"{key}.json"


def load(path: Path | None) -> dict[str, float]:
    """The cached ``d`` per ``"layer|choice"``; empty when there is no cache or it cannot be read (a cache
    is only ever a shortcut: an unreadable one is measured again)."""
    if path is not None and path.exists():
        with contextlib.suppress(Exception):
            return json.loads(path.read_text())["d"]
    return {}


def save(path: Path | None, d: dict[str, float]) -> None:
    """Write the cache atomically (a temporary file moved into place); a cache that cannot be written is skipped."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "d": d}))
        os.replace(tmp, path)
