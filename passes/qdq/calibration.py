"""Calibration statistics of the activations a ``qdq`` plan needs: per-channel ranges, a row sample, and the
``X^T X`` GPTQ rounds against, from one onnxruntime pass over the calibration feeds."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes.calib_stats import GramSum
from onnxpress.passes.qdq.options import QdqOptions
from onnxpress.passes.qdq.targets import Target


@dataclasses.dataclass
class ActStats:
    """One activation over the calibration data: per-channel min/max, a random row sample, X^T X (GPTQ)."""

    chan_min: np.ndarray | None = None
    chan_max: np.ndarray | None = None
    sample: np.ndarray | None = None
    keys: np.ndarray | None = None
    xtx: GramSum | None = None  # X^T X as its upper triangle (``hessian`` gives the matrix)
    rows: int = 0

    @property
    def hessian(self) -> np.ndarray | None:
        """``X^T X`` over all calibration rows (a new symmetric matrix on each call), None without GPTQ."""
        return None if self.xtx is None else self.xtx.full()


def _channel_rows(array: np.ndarray, kind: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if kind == "conv" and a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def collect_stats(
    model: ir.Model, feeds, kinds: dict[str, str], rows: int, hessians: set[str], seed: int = 0, hessian_dtype: Any = np.float64
) -> dict[str, ActStats]:
    """One ORT pass over the calibration feeds: per-channel min/max, a row sample and X^T X (for GPTQ)."""
    from onnxpress import runtime

    rng = np.random.default_rng(seed)
    stats = {name: ActStats() for name in kinds}
    for out in runtime.capture(model, feeds, list(kinds)):
        for name, st in stats.items():
            x = _channel_rows(out[name], kinds[name])
            lo, hi = x.min(axis=0), x.max(axis=0)
            st.chan_min = lo if st.chan_min is None else np.minimum(st.chan_min, lo)
            st.chan_max = hi if st.chan_max is None else np.maximum(st.chan_max, hi)
            keys = rng.random(len(x))
            sample = x if st.sample is None else np.concatenate([st.sample, x])
            all_keys = keys if st.keys is None else np.concatenate([st.keys, keys])
            if len(sample) > rows:
                keep = np.argpartition(all_keys, rows)[:rows]
                sample, all_keys = sample[keep], all_keys[keep]
            st.sample, st.keys = sample, all_keys
            st.rows += len(x)
            if name in hessians:
                if st.xtx is None:
                    st.xtx = GramSum(x.shape[1], hessian_dtype)
                st.xtx.add(x)
        # Drop this batch's captured values now: the capture holds on to them while it runs the next batch
        # (SmolLM2-135M: 0.1 GB per 256-token batch, alive next to onnxruntime's own buffers)
        out.clear()
    return stats


def statistics_wanted(targets: list[Target], o: QdqOptions, feeds) -> tuple[dict[str, list[tuple[int, int]]], dict[str, ir.Value], dict[str, str], set[str]]:
    """Which activations the plan needs statistics of: each quantized activation and its consumers (target
    index, input index), how to sample it (conv channels or rows), and the MatMul inputs GPTQ needs a Hessian of."""
    by_index = {t.index: t for t in targets}
    consumers: dict[str, list[tuple[int, int]]] = {}
    act_values: dict[str, ir.Value] = {}
    for t in targets:
        for i in t.acts:
            v = t.node.inputs[i]
            consumers.setdefault(v.name, []).append((t.index, i))
            act_values[v.name] = v
    kinds = {name: ("conv" if any(by_index[c[0]].kind == "conv" for c in cs) else "rows") for name, cs in consumers.items()}
    hessians: set[str] = set()
    if o.weight_method == "gptq" and feeds:
        for t in targets:
            if t.kind in ("matmul", "gemm", "tied"):
                a = t.node.inputs[0]
                kinds.setdefault(a.name, "rows")
                hessians.add(a.name)
    if o.awq and o.mode == "int4" and feeds:  # AWQ searches its factors on each MatMul input's row sample
        for t in targets:
            if t.kind in ("matmul", "gemm"):
                kinds.setdefault(t.node.inputs[0].name, "rows")
    return consumers, act_values, kinds, hessians
