"""Activation statistics of the layers the ``prune`` pass scores with calibration data (``calibrated=true``).

One onnxruntime run over all calibration batches captures the input of every selected layer (unstructured)
or the hidden units of every block (structured) and reduces it to per-channel sums of squares, means and
variances, plus the second moment X^T X / n where an update or an output error needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes.calib_stats import Feed, check_calibration
from onnxpress.passes.prune.structure import Block, Layer


def padding_mask(feed: Feed) -> np.ndarray | None:
    """The boolean [batch, sequence] attention mask of a transformer feed (an input named like '*mask*' of
    rank 2 with 0/1 values), or None."""
    for name, array in feed.items():
        a = np.asarray(array)
        if "mask" in name.lower() and a.ndim == 2 and a.dtype.kind in "biuf" and np.all((a == 0) | (a == 1)):
            return a.astype(bool)
    return None


def input_stats(
    model: ir.Model, calibration: Sequence[Feed] | None, items: Sequence[Layer | Block], *, skip_padding: bool, update: bool
) -> dict[str, dict[str, Any]]:
    """Per captured value: sum of squares per channel (Wanda), and for MatMul/Gemm inputs the second
    moment X^T X / n (SparseGPT, output errors). One onnxruntime run over all calibration batches.

    Keys of each entry: ``sq``, ``sum``, ``count``, ``mean``, ``var`` and, where captured, ``gram``."""
    feeds = check_calibration(model, calibration, "prune(calibrated=true)")
    from onnxpress import runtime  # onnxruntime loads only when a pass needs it

    channel_axis, full = _capture_targets(items, update)
    stats: dict[str, dict[str, Any]] = {}
    for feed, values in zip(feeds, runtime.capture(model, feeds, sorted(channel_axis))):
        mask = padding_mask(feed) if skip_padding else None
        for name, axis in channel_axis.items():
            st = stats.setdefault(name, {"sq": 0.0, "sum": 0.0, "count": 0})
            _accumulate(st, _rows(np.asarray(values[name], np.float64), axis, mask), full[name])
    for st in stats.values():
        count = max(st["count"], 1)
        st["mean"] = st["sum"] / count
        st["var"] = np.maximum(st["sq"] / count - st["mean"] ** 2, 0.0)
        if "xtx" in st:
            st["gram"] = st.pop("xtx") / count
    return stats


def _capture_targets(items: Sequence[Layer | Block], update: bool) -> tuple[dict[str, int | None], dict[str, bool]]:
    """(channel axis per captured value name, whether its full second moment is needed). The channel axis
    is None for the last axis (rows flattened) and 1 for a Conv's channels."""
    channel_axis: dict[str, int | None] = {}
    full: dict[str, bool] = {}
    for item in items:
        if isinstance(item, Layer):
            channel_axis[item.x.name] = 1 if item.kind == "Conv" else None
            full[item.x.name] = item.kind != "Conv"
        else:
            channel_axis[item.act.name] = 1 if item.conv else None
            full[item.act.name] = not item.conv and update
    return channel_axis, full


def _rows(x: np.ndarray, axis: int | None, mask: np.ndarray | None) -> np.ndarray:
    """The captured value as [samples, channels]."""
    if axis is None and mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        return x[mask]  # the tokens the model attends to; padding rows do not count
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if axis == 1 else x.reshape(-1, x.shape[-1])


def _accumulate(st: dict[str, Any], rows: np.ndarray, full: bool) -> None:
    st["sq"] = st["sq"] + np.einsum("ij,ij->j", rows, rows)
    st["sum"] = st["sum"] + rows.sum(axis=0)
    st["count"] += rows.shape[0]
    if full:
        st["xtx"] = st.get("xtx", 0.0) + rows.T @ rows
