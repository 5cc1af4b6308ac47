"""Quantization maths for the ``qdq`` pass: pure numpy, no graphs.

Conventions: ``dequantize(q) = (q - zero_point) * scale``; weights are symmetric (zero point 0, integer range
``[-qmax, qmax]``); activations are affine (asymmetric) with the real zero exactly representable.
A MatMul weight ``W[K, N]`` is quantized per output channel (one scale per column) and, block-wise, in blocks
of ``block_size`` consecutive rows of K (the layout of ``MatMulNBits`` and of ``DequantizeLinear(block_size)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable

import numpy as np

QRANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
_TINY = 1e-12


# -- scale and zero point ------------------------------------------------------------------------
def affine_params(lo, hi, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point mapping ``[lo, hi]`` (widened to contain 0) onto ``[qmin, qmax]``.

    0.0 maps exactly to the zero point (so padding and ReLU zeros stay exact).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    scale = np.maximum((hi - lo) / (qmax - qmin), _TINY)
    zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale.astype(np.float32), zero_point.astype(np.int64)


def symmetric_scale(absmax, qmax: int) -> np.ndarray:
    """Scale of a symmetric quantizer (zero point 0) whose largest code ``qmax`` represents ``absmax``."""
    return np.maximum(np.asarray(absmax, dtype=np.float64) / qmax, _TINY).astype(np.float32)


def quantize(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Round-to-nearest-even like ONNX QuantizeLinear (float32 division); returns int64 codes."""
    codes = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))
    codes += np.asarray(zero_point, dtype=np.float32)
    return np.clip(codes, qmin, qmax, out=codes).astype(np.int64)


def dequantize(q: np.ndarray, scale, zero_point=0) -> np.ndarray:
    zero_point = np.asarray(zero_point, dtype=np.float32)
    if not zero_point.any():  # symmetric: one cast-and-multiply pass instead of three full-size temporaries
        return np.multiply(q, np.asarray(scale, dtype=np.float32), dtype=np.float32)
    return (np.asarray(q, dtype=np.float32) - zero_point) * np.asarray(scale, dtype=np.float32)


def fake_quant(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Quantize then dequantize (float32)."""
    codes = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))
    zp = np.asarray(zero_point, dtype=np.float32)
    codes += zp
    np.clip(codes, qmin, qmax, out=codes)
    codes -= zp
    return codes * np.asarray(scale, dtype=np.float32)


# -- weights -------------------------------------------------------------------------------------
# Work on weights in blocks of about this many elements: the temporaries of one block stay in cache, and a
# large tensor never gets a full-size float temporary (the old search made ~5 per grid point).
_BLOCK_ELEMENTS = 1 << 18
# Below this many values per channel (or in the whole tensor) the MSE clip search evaluates every grid point
# exactly; above it, a model of the error ranks the grid and only the best few are evaluated exactly.
_EXACT_SEARCH_VALUES = 512
_EXACT_SEARCH_TENSOR = 1 << 16
# How many of the model's best grid points are evaluated exactly (with three, the chosen scales matched the
# full search's error to 1e-5 on Gaussian, Laplace and Student-t weights).
_EXACT_CANDIDATES = 3


def _channel_matrix(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, bool]:
    """A 2-D view of ``w`` with one channel per row (``True``) or per column (``False``); a copy only when
    the channel axis is neither the first nor the last one."""
    if axis is None:
        return w.reshape(-1, 1), False
    axis = axis % w.ndim
    if axis == 0:
        return w.reshape(w.shape[0], -1), True
    if axis == w.ndim - 1:
        return w.reshape(-1, w.shape[-1]), False
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), True


def _blocks(m: np.ndarray, rows_are_channels: bool):
    """Blocks ``(values [n, c], channel slice)``: every block holds the channels of its slice as columns.

    Row-channel matrices are cut between channels (whole channels per block, transposed views); column-channel
    matrices are cut between rows (every channel in every block, partial values)."""
    step = max(1, _BLOCK_ELEMENTS // max(m.shape[1], 1))
    for i in range(0, m.shape[0], step):
        if rows_are_channels:
            yield m[i : i + step].T, slice(i, i + step)
        else:
            yield m[i : i + step], slice(None)


def _absmax(m: np.ndarray, rows_are_channels: bool) -> np.ndarray:
    out = np.zeros(m.shape[0] if rows_are_channels else m.shape[1], np.float32)
    for block, sl in _blocks(m, rows_are_channels):
        if block.size:
            np.maximum(out[sl], np.abs(block).max(axis=0), out=out[sl])
    return out


def _symmetric_codes(block: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(rint(block / scale), -qmax, qmax)`` in float32, in one fresh array (the codes of ``quantize``)."""
    d = block / scale
    np.rint(d, out=d)
    np.clip(d, -qmax, qmax, out=d)
    return d


def _squared_error(m: np.ndarray, rows_are_channels: bool, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Per channel: sum of ``(fake_quant(w) - w)^2`` with symmetric ``scale`` (float32 maths, float64 totals)."""
    err = np.zeros(scale.shape[0])
    for block, sl in _blocks(m, rows_are_channels):
        s = scale[sl]
        d = _symmetric_codes(block, s, qmax)
        d *= s
        d -= block
        d *= d
        # A float32 sum is exact enough over a few thousand terms and several times faster than a float64 one.
        err[sl] += d.sum(axis=0, dtype=np.float64 if d.shape[0] > 4096 else None)
    return err


def _modelled_clip_errors(m: np.ndarray, rows_are_channels: bool, absmax: np.ndarray, ratios: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Per (ratio, channel): the squared error of clipping at ``ratios * absmax``, exact for the clipped values
    and ``step^2 / 12`` for every value inside the range (uniform rounding error).

    ``ratios`` descend from 1 in equal steps; the values above the smallest ratio (the tail, a few percent) are
    binned between consecutive ratios with their count, sum and sum of squares, so that the clipped part of
    every candidate is a sum over the bins above it: one pass over the data for the whole grid.
    """
    grid, channels = scales.shape
    bins = grid - 1
    lowest = float(ratios[-1])
    width = (1.0 - lowest) / bins
    floor = (absmax * np.float32(lowest)).astype(np.float32)
    safe_absmax = np.maximum(absmax, np.float32(_TINY))
    indices, magnitudes = [], []
    # Contiguous row blocks of m, read flat (a 1-D nonzero is several times faster than a 2-D one).
    step = max(1, _BLOCK_ELEMENTS // max(m.shape[1], 1))
    for i in range(0, m.shape[0], step):
        block = m[i : i + step]
        limit = floor[i : i + step, None] if rows_are_channels else floor
        flat = np.flatnonzero(np.abs(block) > limit)
        if not flat.size:
            continue
        a = np.abs(block.reshape(-1)[flat])
        cols = (flat // m.shape[1] + i) if rows_are_channels else (flat % m.shape[1])
        # bin j holds |w| / absmax in [lowest + j * width, lowest + (j + 1) * width)
        j = ((a / safe_absmax[cols] - np.float32(lowest)) * np.float32(1.0 / width)).astype(np.int32)
        np.clip(j, 0, bins - 1, out=j)
        indices.append(cols.astype(np.int32) * np.int32(bins) + j)
        magnitudes.append(a)
    index = np.concatenate(indices) if indices else np.zeros(0, np.int32)
    a = np.concatenate(magnitudes).astype(np.float64) if magnitudes else np.zeros(0)
    sums = np.stack([np.bincount(index, weights, minlength=channels * bins) for weights in (None, a, a * a)])
    # suffix sums over the bins: above[k, j, c] = sum over bins >= j (ratio order ascending)
    above = np.cumsum(sums.reshape(3, channels, bins)[:, :, ::-1], axis=2)[:, :, ::-1].transpose(0, 2, 1)
    values = m.shape[1] if rows_are_channels else m.shape[0]
    errors = np.empty((grid, channels))
    for g, ratio in enumerate(ratios):
        step = scales[g].astype(np.float64)
        clip = qmax * step
        j = int(round((ratio - lowest) / width))  # the candidate clips the bins from j upwards
        if j >= bins:
            count = s1 = s2 = 0.0
        else:
            count, s1, s2 = above[0, j], above[1, j], above[2, j]
        errors[g] = (values - count) * step * step / 12.0 + np.maximum(s2 - 2.0 * clip * s1 + clip * clip * count, 0.0)
    return errors


def weight_scales(w: np.ndarray, axis: int | None, qmax: int = 127, clip: str = "none", grid: int = 20) -> np.ndarray:
    """Symmetric scales: one per slice along ``axis`` (None: per tensor).

    ``clip="mse"`` searches a clip ratio on a grid in [0.5, 1] per channel that minimises the squared weight
    error. Small tensors evaluate every grid point exactly. Large ones rank the grid with a model of the error
    (exact for clipped values, ``step^2/12`` inside the range) and evaluate exactly only the best three and
    absmax itself, so the result is never worse than absmax and within rounding noise of the full search at
    a fraction of its cost (a 2048x8192 matrix: ~0.5 s instead of ~5 s).
    """
    w = np.asarray(w, dtype=np.float32)
    m, rows_are_channels = _channel_matrix(w, axis)
    absmax = _absmax(m, rows_are_channels)
    plain = symmetric_scale(absmax, qmax)
    if clip == "none":
        return plain
    if clip != "mse":
        raise ValueError(f"unknown weight clip method '{clip}'")
    ratios = np.linspace(1.0, 0.5, grid)
    scales = np.stack([symmetric_scale(absmax * r, qmax) for r in ratios])  # [grid, channels]
    values = m.shape[1] if rows_are_channels else m.shape[0]
    if values < _EXACT_SEARCH_VALUES or w.size <= _EXACT_SEARCH_TENSOR or grid < 3:
        candidates = [np.full(len(absmax), g) for g in range(1, grid)]
    else:
        modelled = _modelled_clip_errors(m, rows_are_channels, absmax, ratios, scales, qmax)
        candidates = list(np.argsort(modelled, axis=0, kind="stable")[:_EXACT_CANDIDATES])
    channel = np.arange(len(absmax))
    best, best_err = plain, _squared_error(m, rows_are_channels, plain, qmax)
    for pick in candidates:
        if not np.any(pick):  # ratio 1 everywhere: already evaluated
            continue
        scale = scales[pick, channel]
        err = _squared_error(m, rows_are_channels, scale, qmax)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, scale, best)
    return best.astype(np.float32)


def per_axis_shape(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a 1-D per-axis parameter so it broadcasts against a tensor of rank ``ndim``."""
    if axis is None:
        return np.asarray(scale).reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(scale).reshape(shape)


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127, clip: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel (or per-tensor) int8 weight: (int8 codes, float32 scales).

    The codes are those of ``quantize`` (round half to even, float32 division), written block by block straight
    into int8: no int64 or full-size float temporaries.
    """
    w = np.asarray(w, dtype=np.float32)
    scale = weight_scales(w, axis, qmax, clip)
    q = np.empty(w.shape, np.int8)
    m, rows_are_channels = _channel_matrix(w, axis)
    qm, _ = _channel_matrix(q, axis)
    if not np.shares_memory(qm, q):  # channel axis in the middle: the view is a copy, quantize at once
        return quantize(w, per_axis_shape(scale, w.ndim, axis), 0, -qmax, qmax).astype(np.int8), scale
    for (block, sl), (codes, _) in zip(_blocks(m, rows_are_channels), _blocks(qm, rows_are_channels)):
        codes[...] = _symmetric_codes(block, scale[sl], qmax)
    return q, scale


def block_params(
    block: np.ndarray, qmin: int, qmax: int, symmetric: bool, clip: str = "mse", grid: int = 24, *, signed: bool = False,
    row_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of ``block`` (rows: the values of one block); MSE clip search optional.

    The search computes ``fake_quant`` by hand with the block's float32 copy made once and the temporaries
    reused (the same operations in the same order: the same codes and errors); without a search (one ratio)
    no error is needed: a column keeps its scale unless its values are not finite (scale 0, as before).

    ``signed`` (symmetric only): all ``qmax - qmin + 1`` levels around the middle code, with a signed scale that
    puts each column's largest-magnitude value on the lowest one (``signed_scale``; the plain symmetric grid
    leaves the lowest code unused). ``row_weights`` (one per row of ``block``, e.g. the Hessian diagonal of
    the layer input): the clip search minimises the weighted squared error instead of the plain one."""
    lo0, hi0 = block.min(axis=0), block.max(axis=0)
    ratios = np.linspace(1.0, 0.6, grid) if clip == "mse" else np.array([1.0])
    # Zero at the middle code (0 for signed codes, 2^(bits-1) for unsigned ones).
    mid = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    n = block.shape[1]
    if len(ratios) == 1:
        s, z = _ratio_params(lo0, hi0, ratios[0], qmin, qmax, symmetric, mid, n, signed)
        finite = np.isfinite(lo0) & np.isfinite(hi0) & np.isfinite(s)
        return np.where(finite, s, np.float32(0.0)), np.where(finite, z, 0)
    x32 = np.asarray(block, dtype=np.float32)
    fq = np.empty(block.shape, np.float32)
    diff = np.empty(block.shape, np.result_type(block.dtype, np.float32))
    best_err = np.full(n, np.inf)
    best_s = np.zeros(n, np.float32)
    best_z = np.zeros(n, np.int64)
    for r in ratios:
        s, z = _ratio_params(lo0, hi0, r, qmin, qmax, symmetric, mid, n, signed)
        zf = z.astype(np.float32)
        np.divide(x32, s, out=fq)  # fake_quant(block, s, z, qmin, qmax), step by step
        np.rint(fq, out=fq)
        fq += zf
        np.clip(fq, qmin, qmax, out=fq)
        fq -= zf
        fq *= s
        np.subtract(fq, block, out=diff)
        np.square(diff, out=diff)
        if row_weights is not None:
            diff *= row_weights[:, None]
        err = diff.sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z


def signed_scale(lo, hi, levels_below: int) -> np.ndarray:
    """Signed scale of a symmetric grid with ``levels_below`` levels below the middle code and one fewer above
    (int4: -8..7): the value of largest magnitude (``lo`` or ``hi``) lands on ``-levels_below``, so the grid's
    extra level goes to the side of the column's largest value (a negative scale when that value is positive).
    onnxruntime-genai's int4 builder does this; dequantization stays ``(q - zp) * scale``."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    big = np.where(np.abs(lo) >= np.abs(hi), lo, hi)
    s = -big / levels_below
    return np.where(np.abs(s) < _TINY, _TINY, s).astype(np.float32)


def _ratio_params(
    lo0: np.ndarray, hi0: np.ndarray, r, qmin: int, qmax: int, symmetric: bool, mid: int, n: int, signed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each column clipped to ``r`` times its range ``[lo0, hi0]``."""
    if symmetric and signed:
        return signed_scale(lo0 * r, hi0 * r, mid - qmin), np.full(n, mid, np.int64)
    if symmetric:
        return symmetric_scale(np.maximum(np.abs(lo0), np.abs(hi0)) * r, qmax - mid), np.full(n, mid, np.int64)
    return affine_params(lo0 * r, hi0 * r, qmin, qmax)


def _blockwise_rtn(
    work: np.ndarray, block_size: int, qmin: int, qmax: int, symmetric: bool, clip: str, signed: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_blockwise`` without a Hessian: each block's parameters from its own values, several blocks at
    a time (their columns side by side for ``block_params``); codes written straight into uint8."""
    k, n = work.shape
    kb = k // block_size
    blocks = work.reshape(kb, block_size, n)
    scales = np.zeros((kb, n), np.float32)
    zps = np.zeros((kb, n), np.int64)
    codes = np.empty((kb, block_size, n), np.uint8)
    step = max(1, (_BLOCK_ELEMENTS * 4) // max(1, block_size * n)) if clip == "none" else 1
    for b in range(0, kb, step):
        chunk = blocks[b : b + step]
        side = chunk.transpose(1, 0, 2).reshape(block_size, -1)  # [block, blocks * n]: one column per (block, channel)
        s, z = block_params(side, qmin, qmax, symmetric, clip, signed=signed)
        scales[b : b + step] = s.reshape(-1, n)
        zps[b : b + step] = z.reshape(-1, n)
        codes[b : b + step] = quantize(chunk, scales[b : b + step, None, :], zps[b : b + step, None, :], qmin, qmax)
    return codes.reshape(k, n), scales, zps


def quantize_blockwise(
    w: np.ndarray, block_size: int, bits: int = 4, symmetric: bool = False, clip: str = "mse", hessian: np.ndarray | HessianFactor | None = None,
    damp: float = 0.01, *, signed: bool = False, act_order: bool = False, refit: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-wise quantization of ``w[K, N]`` along K (unsigned codes, ``0..2^bits-1``).

    Returns (codes uint8 [K, N], scales float32 [K/block, N], zero points uint8 [K/block, N]); K is padded
    with zeros to a multiple of ``block_size`` internally (the extra rows are dropped from ``codes``).
    With ``hessian`` (``X^T X`` of the layer's input, [K, K]) the rows are quantized GPTQ-style: each row's
    rounding error is compensated on the rows not yet quantized.

    ``signed``: symmetric blocks on the full grid with signed scales (``block_params``). Given the Hessian
    itself (an array, or a ``HessianFactor``; not ``gptq_inverse``'s pair) the clip search weighs each row's
    error by the Hessian diagonal; ``act_order``: GPTQ rounds the rows in descending order of that diagonal,
    with every block's scale fixed up front from the weight ("static groups"); ``refit``: the block scales
    are then re-fitted to the codes GPTQ chose (``refit_block_scales``).
    """
    k, n = w.shape
    qmin, qmax = 0, 2**bits - 1
    kb = -(-k // block_size)
    pad = kb * block_size - k
    # one float64 working copy of the weight (GPTQ overwrites it; a 576 x 49152 lm_head: 226 MB)
    work = np.zeros((kb * block_size, n))
    work[:k] = w
    if hessian is None:
        codes, scales, zps = _blockwise_rtn(work, block_size, qmin, qmax, symmetric, clip, signed)
    else:
        if isinstance(hessian, (tuple, HessianFactor)) or not pad:
            h = hessian
        else:
            h = np.zeros((kb * block_size, kb * block_size))
            h[:k, :k] = hessian
        if isinstance(h, HessianFactor) or (not isinstance(h, tuple) and (act_order or refit)):
            factor = h if isinstance(h, HessianFactor) else hessian_factor(h, act_order, damp)
            codes, scales, zps = _gptq_with_hessian(work, factor, block_size, qmin, qmax, symmetric, clip, signed, refit, damp)
        else:
            codes, scales, zps = gptq(
                work, h, block_size, lambda blk: block_params(blk, qmin, qmax, symmetric, clip, signed=signed), qmin, qmax, damp, copy=False
            )
    return codes[:k].astype(np.uint8), scales, zps.astype(np.uint8)


def _gptq_with_hessian(
    work: np.ndarray, factor: HessianFactor, block_size: int, qmin: int, qmax: int, symmetric: bool, clip: str, signed: bool, refit: bool, damp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_blockwise``'s GPTQ when the Hessian itself is known: clip search weighted by its diagonal, act
    order with static groups when ``factor.order`` is set, least-squares scale refit after rounding."""
    importance = np.maximum(np.diag(factor.hessian), 0.0)
    # GPTQ in natural order overwrites ``work`` with its compensated rows; in act order it works on a permuted copy
    original = work.copy() if (refit and factor.order is None) else work
    if factor.order is None:
        params = lambda blk, weights: block_params(blk, qmin, qmax, symmetric, clip, signed=signed, row_weights=weights)  # noqa: E731
        codes, scales, zps = gptq(work, (factor.inverse, factor.dead), block_size, params, qmin, qmax, damp, copy=False, row_weights=importance)
    else:
        kb, n = work.shape[0] // block_size, work.shape[1]
        fixed = (np.zeros((kb, n), np.float32), np.zeros((kb, n), np.int64))
        for b in range(kb):
            rows = slice(b * block_size, (b + 1) * block_size)
            fixed[0][b], fixed[1][b] = block_params(work[rows], qmin, qmax, symmetric, clip, signed=signed, row_weights=importance[rows])
        codes, scales, zps = gptq(work, (factor.inverse, factor.dead), block_size, fixed, qmin, qmax, damp, order=factor.order)
    if refit:
        scales = refit_block_scales(original, codes, zps, scales, factor.hessian, block_size, damp)
    return codes, scales, zps


def quantize_rows_blockwise(
    w: np.ndarray, block_size: int, bits: int = 4, symmetric: bool = False, clip: str = "mse", *, signed: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-wise quantization of each row of a table ``w[V, D]`` along D (GatherBlockQuantized's layout).

    Returns (codes uint8 [V, D], scales float32 [V, D/block], zero points uint8 [V, D/block])."""
    codes, scales, zps = quantize_blockwise(np.asarray(w).T, block_size, bits, symmetric, clip, signed=signed)
    return codes.T.copy(), scales.T.copy(), zps.T.copy()


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, zps: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse of ``quantize_blockwise`` for ``[K, N]`` codes in blocks of ``block_size`` rows (float64).

    Broadcast per block in place: one float64 array of the weight's size (a 576 x 49152 lm_head: 226 MB; the
    repeated scale and zero-point arrays this replaced took three times that)."""
    k, n = codes.shape
    kb = scales.shape[0]
    out = np.zeros((kb * block_size, n))
    out[:k] = codes
    blocks = out.reshape(kb, block_size, n)
    blocks -= np.asarray(zps, np.float64)[:, None, :]
    blocks *= np.asarray(scales, np.float64)[:, None, :]
    return out[:k]


def dequantize_rows_blockwise(codes: np.ndarray, scales: np.ndarray, zps: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse of ``quantize_rows_blockwise``."""
    return dequantize_blockwise(codes.T, scales.T, zps.T, block_size).T


def quantize_split_rows(
    w: np.ndarray, hot: np.ndarray, hot_block: int, cold_block: int, symmetric: bool = False, clip: str = "mse", *, signed: bool = False
) -> dict[str, np.ndarray]:
    """A table ``w[V, D]`` with its ``hot`` rows (sorted ids) 4-bit in blocks of ``hot_block`` and all other
    rows 2-bit in blocks of ``cold_block`` (both along D). ``remap[row]`` is the row's position: hot rows
    first (in ``hot`` order), then the cold ones."""
    rows = w.shape[0]
    cold = np.setdiff1d(np.arange(rows), hot)
    hc, hs, hz = quantize_rows_blockwise(w[hot], hot_block, 4, symmetric, clip, signed=signed)
    cc, cs, cz = quantize_rows_blockwise(w[cold], cold_block, 2, symmetric, clip, signed=signed)
    remap = np.empty(rows, np.uint16 if rows <= 65536 else np.int32)
    remap[hot] = np.arange(hot.size)
    remap[cold] = hot.size + np.arange(cold.size)
    return {
        "hot_ids": np.asarray(hot), "cold_ids": cold, "remap": remap,
        "hot_codes": hc, "hot_scales": hs, "hot_zero_points": hz, "cold_codes": cc, "cold_scales": cs, "cold_zero_points": cz,
    }


def dequantize_split_rows(a: dict[str, np.ndarray], hot_block: int, cold_block: int) -> np.ndarray:
    """Inverse of ``quantize_split_rows``: the dense table."""
    d = (a["hot_codes"] if a["hot_codes"].size else a["cold_codes"]).shape[1]
    table = np.zeros((a["hot_ids"].size + a["cold_ids"].size, d))
    table[a["hot_ids"]] = dequantize_rows_blockwise(a["hot_codes"], a["hot_scales"], a["hot_zero_points"], hot_block)
    table[a["cold_ids"]] = dequantize_rows_blockwise(a["cold_codes"], a["cold_scales"], a["cold_zero_points"], cold_block)
    return table


def rows_blockwise_bytes(rows: int, dim: int, bits: int, block: int, symmetric: bool = False) -> int:
    """Stored bytes of a ``rows x dim`` table quantized by ``quantize_rows_blockwise`` as GatherBlockQuantized
    holds it: codes packed ``8 // bits`` per byte, float32 scales, zero points packed the same way (unless symmetric)."""
    blocks = -(-dim // block)
    per = 8 // bits
    return rows * (-(-dim // per)) + 4 * rows * blocks + (0 if symmetric else rows * (-(-blocks // per)))


def split_rows_bytes(rows: int, dim: int, hot: int, hot_block: int, cold_block: int, symmetric: bool = False) -> int:
    """Stored bytes of ``quantize_split_rows`` as GatherBlockQuantized writes it: both tables
    (``rows_blockwise_bytes``) and the remap (uint16 up to 65536 rows, else int32)."""
    return (
        rows_blockwise_bytes(hot, dim, 4, hot_block, symmetric)
        + rows_blockwise_bytes(rows - hot, dim, 2, cold_block, symmetric)
        + rows * (2 if rows <= 65536 else 4)
    )


def used_rows(index_batches, rows: int) -> np.ndarray:
    """Sorted distinct rows of a ``rows``-row table that the index arrays select (negative indices count from
    the end, as in Gather; out-of-range ones are ignored)."""
    seen = np.zeros(rows, bool)
    for ids in index_batches:
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = np.where(ids < 0, ids + rows, ids)
        seen[ids[(ids >= 0) & (ids < rows)]] = True
    return np.flatnonzero(seen)


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``
    (a third of the multiplications of a general inverse, as matrix products; numpy has no triangular inverse)."""
    n = lower.shape[0]
    if n <= 64:
        return np.tril(np.linalg.inv(lower))
    half = n // 2
    a, c = _lower_inverse(lower[:half, :half]), _lower_inverse(lower[half:, half:])
    out = np.zeros_like(lower)
    out[:half, :half] = a
    out[half:, half:] = c
    out[half:, :half] = -((c @ lower[half:, :half]) @ a)
    return out


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """The upper-triangular U with ``U^T U = inv(h)`` from one Cholesky factorization: with P the order-reversing
    permutation and ``P h P = L L^T``, ``U = P inv(L) P`` (about 2/3 n^3 operations; inv(h) then its Cholesky
    factor took 7/3 n^3: a third of a SmolLM2 GPTQ build went there)."""
    lower = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])


def gptq_inverse(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's upper Cholesky factor U of inv(H + damp) (inv(H) = U^T U) and the mask of dead inputs."""
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), _TINY)
    try:
        return _upper_cholesky_of_inverse(h), dead
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += 0.1 * float(np.mean(np.diag(h)))
        return _upper_cholesky_of_inverse(h), dead


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """A layer input's ``X^T X`` (``hessian``, float64, padded to whole blocks) with GPTQ's inverse factor of it
    taken in ``order`` (``inverse``, ``dead`` as ``gptq_inverse`` returns them for ``H[order][:, order]``; None:
    the natural order). Made once per layer input and shared by the layers that read it."""

    hessian: np.ndarray
    inverse: np.ndarray
    dead: np.ndarray
    order: np.ndarray | None


def hessian_factor(hessian: np.ndarray, act_order: bool = False, damp: float = 0.01) -> HessianFactor:
    """``HessianFactor`` of ``hessian``; ``act_order``: rows in descending order of the Hessian diagonal (GPTQ's
    act-order: the inputs with the most energy are rounded first, while the most rows are left to take their error)."""
    h = np.asarray(hessian, np.float64)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else None
    hinv, dead = gptq_inverse(h if order is None else h[np.ix_(order, order)], damp)
    return HessianFactor(h, hinv, dead, order)


def gptq(
    w: np.ndarray, hessian: np.ndarray | tuple[np.ndarray, np.ndarray], group: int,
    params: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray], qmin: int, qmax: int, damp: float = 0.01,
    copy: bool = True, *, order: np.ndarray | None = None, row_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) on ``w[K, N]`` (MatMul layout, rows = input features) with group scales.

    ``hessian`` is ``X^T X`` of the layer input (or ``gptq_inverse`` of it, to share across layers); each group's
    scale/zero point comes from ``params`` applied to the (already error-compensated) rows of the group, or
    ``params`` is the pair (scales [K/g, N], zero points [K/g, N]) fixed up front ("static groups").
    ``order``: the rows are rounded in this order (a permutation of K; needs fixed ``params``; a ``hessian``
    given as a factor must be ``gptq_inverse`` of ``H[order][:, order]``). ``row_weights`` [K]: ``params`` is
    called as ``params(rows, their row_weights)`` (e.g. a clip search weighted by the Hessian diagonal). Returns (codes [K,N], scales [K/g,N], zps [K/g,N]).
    """
    k, n = w.shape
    fixed = isinstance(params, tuple)
    if order is not None and not fixed:
        raise ValueError("gptq: a row order needs fixed (static) group parameters")
    if order is None:
        # copy=False: ``w`` is the caller's float64 scratch copy and is overwritten (no second weight-sized copy)
        w = w.astype(np.float64, copy=copy)
    else:
        w = np.asarray(w, np.float64)[order]
        if not isinstance(hessian, tuple):
            hessian = np.asarray(hessian)[np.ix_(order, order)]
    hinv, dead = hessian if isinstance(hessian, tuple) else gptq_inverse(hessian, damp)
    w[dead, :] = 0.0
    codes = np.zeros((k, n), np.int16)  # int8/int4 codes: a quarter of int64's memory
    groups = k // group
    if fixed:
        scales, zps = np.asarray(params[0], np.float32), np.asarray(params[1], np.int64)
    else:
        scales, zps = np.zeros((groups, n), np.float32), np.zeros((groups, n), np.int64)
    rows = np.arange(k) if order is None else np.asarray(order)
    lazy = 128 if group >= 128 else 128 // group * group
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        err_block = np.zeros((end - start, n))
        for i in range(start, end):
            g = rows[i] // group
            if not fixed and i % group == 0:
                rows_i = w[i : i + group]
                scales[g], zps[g] = params(rows_i) if row_weights is None else params(rows_i, row_weights[i : i + group])
            q = quantize(w[i], scales[g], zps[g], qmin, qmax)
            codes[rows[i]] = q
            deq = (q - zps[g]) * scales[g].astype(np.float64)
            err = (w[i] - deq) / hinv[i, i]
            w[i + 1 : end] -= np.outer(hinv[i, i + 1 : end], err)
            err_block[i - start] = err
        w[end:] -= hinv[start:end, end:].T @ err_block
    return codes, scales, zps


def refit_block_scales(
    w: np.ndarray, codes: np.ndarray, zps: np.ndarray, scales: np.ndarray, hessian: np.ndarray, block_size: int, damp: float = 0.01,
    columns: int = 2048,
) -> np.ndarray:
    """Least-squares block scales for fixed codes: per column, the scales ``s`` [K/block] minimising the layer's
    output error ``(w - Q s)^T H (w - Q s)``, where column b of ``Q`` [K, K/block] holds the centred codes
    ``codes - zp`` of block b (zero elsewhere): ``(Q^T H Q) s = Q^T H w``, one small system per column.

    Rounding (GPTQ) fixes the codes with scales chosen before it; the best scales for the codes it chose differ,
    and across blocks, since H couples them. ``H`` is damped as in GPTQ. A block whose codes are all at the zero
    point keeps its scale (it has no say in the error); so does a column whose system is not solvable.
    ``w`` [K, N] and ``hessian`` [K, K] are padded like ``codes`` (K a multiple of ``block_size``)."""
    k, n = codes.shape
    kb = k // block_size
    h = np.array(hessian, np.float64)
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), _TINY)
    out = np.array(scales, np.float32)
    for c0 in range(0, n, columns):  # column chunks: an lm_head's K x N float64 products are 226 MB each
        c1 = min(c0 + columns, n)
        m = c1 - c0
        q = codes[:, c0:c1].astype(np.float64)
        q -= np.repeat(np.asarray(zps[:, c0:c1], np.float64), block_size, axis=0)
        rhs = (q * (h @ np.asarray(w[:, c0:c1], np.float64))).reshape(kb, block_size, m).sum(axis=1).T  # [m, kb]
        gram = np.empty((m, kb, kb))
        for b in range(kb):
            rows = slice(b * block_size, (b + 1) * block_size)
            gram[:, :, b] = (q * (h[:, rows] @ q[rows])).reshape(kb, block_size, m).sum(axis=1).T
        idle = np.einsum("mbb->mb", gram) <= _TINY  # all codes at the zero point: a zero row and column
        old = out[:, c0:c1].T.astype(np.float64)
        gram[np.nonzero(idle)[0], np.nonzero(idle)[1], np.nonzero(idle)[1]] = 1.0
        rhs = np.where(idle, old, rhs)
        try:
            s = np.linalg.solve(gram, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        ok = np.isfinite(s).all(axis=1)
        out[:, c0:c1] = np.where(ok[:, None], s, old).T.astype(np.float32)
    return out


def gptq_per_channel(w: np.ndarray, hessian: np.ndarray, qmax: int = 127, per_channel: bool = True, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 ``w[K, N]`` with one scale per column (or per tensor), rounded by GPTQ. Returns (int8, scales)."""
    k = w.shape[0]

    def params(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = weight_scales(rows, 1 if per_channel else None, qmax, "mse")
        scale = np.broadcast_to(scale, (rows.shape[1],)).astype(np.float32)
        return scale, np.zeros(rows.shape[1], np.int64)

    codes, scales, _ = gptq(w, hessian, k, params, -qmax, qmax, damp)
    return codes.astype(np.int8), (scales[0] if per_channel else scales[0, :1].reshape(()))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes (2 or 4) along the last axis, ``8 // bits`` per byte, lowest bits first (padded
    with 0 to a whole byte): the layout of ORT's MatMulNBits and GatherBlockQuantized."""
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    per = 8 // bits
    codes = np.asarray(codes, dtype=np.uint8) & np.uint8((1 << bits) - 1)
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    groups = codes.reshape(*codes.shape[:-1], -1, per)
    packed = np.zeros(groups.shape[:-1], np.uint8)
    for i in range(per):
        packed |= groups[..., i] << np.uint8(bits * i)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: the first ``count`` codes along the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    out = np.stack([(packed >> np.uint8(bits * i)) & mask for i in range(8 // bits)], axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :count]


# -- activations ---------------------------------------------------------------------------------
def clipped_fraction(x: np.ndarray, lo: float, hi: float) -> float:
    x = np.asarray(x)
    return float(np.mean((x < lo) | (x > hi))) if x.size else 0.0


def percentile_range(x: np.ndarray, percentile: float) -> tuple[float, float]:
    """Clip range keeping ``percentile`` % of the values, cutting half of the rest from each tail."""
    cut = (100.0 - percentile) / 2.0
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64).ravel(), [cut, 100.0 - cut])
    return float(lo), float(hi)


def mse_range(x: np.ndarray, qmin: int, qmax: int, bins: int = 2048, grid: int = 40) -> tuple[float, float]:
    """Clip range ``[a*lo, b*hi]`` minimising the expected squared quantization error of ``x``.

    The error of a value inside the range is the uniform rounding error ``step^2/12``; outside, the squared
    distance to the clip bound. Searched on a histogram over a grid of (a, b) in (0, 1].
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi - lo <= _TINY:
        return lo, hi
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    ratios = np.linspace(1.0, 0.05, grid)
    los = lo * ratios if lo < 0 else np.array([0.0])
    his = hi * ratios if hi > 0 else np.array([0.0])
    a = los[:, None, None]
    b = his[None, :, None]
    step = np.maximum((b - a) / (qmax - qmin), _TINY)
    clipped = np.clip(centers, a, b)
    inside = (centers >= a) & (centers <= b)
    err = ((centers - clipped) ** 2 + inside * step**2 / 12.0) * counts
    total = err.sum(axis=2)
    i, j = np.unravel_index(np.argmin(total), total.shape)
    return float(los[i]), float(his[j])


def entropy_range(x: np.ndarray, bins: int = 2048, quantized_bins: int = 128) -> tuple[float, float]:
    """KL-divergence (TensorRT "entropy") threshold, computed by onnxruntime.quantization's collector."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    x = np.asarray(x, dtype=np.float32).ravel()
    collector = HistogramCollector("entropy", symmetric=False, num_bins=bins, num_quantized_bins=quantized_bins, percentile=99.999, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"x": [x]})
        lo, hi = collector.compute_collection_result()["x"][:2]
    return max(float(lo), float(x.min())), min(float(hi), float(x.max()))


def activation_range(x: np.ndarray, method: str, qmin: int, qmax: int, percentile: float = 99.999) -> tuple[float, float]:
    """Clip range of an activation sample by ``method``: minmax, percentile, entropy or mse."""
    x = np.asarray(x)
    if x.size == 0:
        return 0.0, 0.0
    if method == "minmax":
        return float(x.min()), float(x.max())
    if method == "percentile":
        return percentile_range(x, percentile)
    if method == "entropy":
        return entropy_range(x)
    if method == "mse":
        return mse_range(x, qmin, qmax)
    raise ValueError(f"unknown calibration method '{method}'")


# -- SmoothQuant -----------------------------------------------------------------------------------
def smooth_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per input-channel factors ``s = max|X_c|^alpha / max|W_c|^(1-alpha)`` (Xiao et al. 2022).

    ``X / s`` and ``diag(s) W`` give the same product; the activation's outlier channels shrink and the
    weights absorb them. Channels without signal keep factor 1.
    """
    a = np.maximum(np.asarray(act_absmax, dtype=np.float64), 1e-5)
    w = np.maximum(np.asarray(weight_absmax, dtype=np.float64), 1e-5)
    s = a**alpha / w ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return s.astype(np.float32)


# -- AWQ (activation-aware weight quantization) ---------------------------------------------------
AWQ_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def awq_factors(act_absmean: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per input-channel factors ``s = mean|X_c|^alpha``, normalised so that ``max(s) * min(s) = 1``
    (Lin et al. 2023). ``diag(s) W`` is quantized and ``X / s`` multiplies it: channels that carry large
    activations get finer relative steps, the ones that carry little get coarser ones."""
    a = np.maximum(np.asarray(act_absmean, np.float64), 1e-8) ** float(alpha)
    s = a / np.sqrt(a.max() * a.min())
    return np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)


def awq_search(
    x: np.ndarray, mats: list[np.ndarray], block_size: int, bits: int = 4, symmetric: bool = False, alphas=AWQ_ALPHAS,
    max_columns: int | None = None, seed: int = 0, signed: bool = False,
) -> tuple[np.ndarray | None, float, dict[float, float]]:
    """The AWQ factors for the weights ``mats`` (each ``[K, N]``) that all read the input sample ``x`` [rows, K].

    For each alpha the scaled weights are rounded to nearest in blocks of ``block_size`` along K (no clip
    search, as in AWQ) and the summed squared output error ``||(x / s) Q(diag(s) W) - x W||^2`` relative to
    ``||x W||^2`` is measured. Returns (factors of the best alpha, or None when alpha 0 — no scaling — is
    best; the best alpha; relative error per alpha).

    ``max_columns``: measure on that many output columns of each weight (seeded random choice). A column's
    blocks run along K, so its rounding does not depend on the other columns: the subset's error is an
    unbiased sample of the whole at a fraction of the cost. ``signed``: the grid of ``quantize_blockwise(signed=True)``."""
    x = np.asarray(x, np.float32)
    absmean = np.abs(x).mean(axis=0)
    rng = np.random.default_rng(seed)
    if max_columns is not None:
        mats = [w if w.shape[1] <= max_columns else w[:, np.sort(rng.choice(w.shape[1], max_columns, replace=False))] for w in mats]
    refs = [x @ np.asarray(w, np.float32) for w in mats]
    denom = sum(float(np.square(r, dtype=np.float64).sum()) for r in refs) or 1.0
    errors: dict[float, float] = {}
    best_alpha, best_err, best_s = 0.0, np.inf, None
    for alpha in alphas:
        s = awq_factors(absmean, alpha) if alpha > 0 else np.ones(x.shape[1], np.float32)
        xs = x / s
        err = 0.0
        for w, ref in zip(mats, refs):
            codes, scales, zps = quantize_blockwise(np.asarray(w, np.float64) * s[:, None], block_size, bits, symmetric, clip="none", signed=signed)
            wq = dequantize_blockwise(codes, scales, zps, block_size).astype(np.float32)
            err += float(np.square(xs @ wq - ref, dtype=np.float64).sum())
        errors[float(alpha)] = err / denom
        if err < best_err:
            best_alpha, best_err, best_s = float(alpha), err, s
    return (None if best_alpha == 0 else best_s), best_alpha, errors


# -- error measures --------------------------------------------------------------------------------
def relative_output_error(w: np.ndarray, w_new: np.ndarray, second_moment: np.ndarray, error_moment: np.ndarray | None = None) -> float:
    """Relative output error of replacing a layer's weight ``w`` (K x N) by ``w_new``:
    sqrt(E||x(W' - W)||^2 / E||xW||^2) for inputs x with second moment S = E[x^T x] (0 when E||xW||^2 is 0).
    ``error_moment`` replaces S in the numerator only: the covariance when a bias correction removes the
    error's mean part."""
    w = np.asarray(w, np.float64)
    d = np.asarray(w_new, np.float64) - w
    s = np.asarray(second_moment, np.float64)
    e = s if error_moment is None else np.asarray(error_moment, np.float64)
    num = float(np.sum(d * (e @ d)))
    den = float(np.sum(w * (s @ w)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` in float64, block by block (no full-size float64 copies)."""
    a = np.asarray(actual)
    b = np.asarray(expected)
    if a.shape != b.shape:  # broadcasting: small by assumption, the plain formula
        denom = float(np.linalg.norm(b.astype(np.float64)))
        return float(np.linalg.norm(a.astype(np.float64) - b)) / denom if denom else 0.0
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    for i in range(0, b.size, _BLOCK_ELEMENTS):
        # Plain ufuncs, not np.dot: a threaded BLAS call per block spins its threads on a busy machine.
        # The difference of two float32 blocks is computed in float32 (exact to 2^-24 of itself), sums in float64.
        eb = b[i : i + _BLOCK_ELEMENTS]
        d = np.subtract(a[i : i + _BLOCK_ELEMENTS], eb, dtype=np.result_type(a.dtype, eb.dtype, np.float32))
        num += float(np.square(d, out=d).sum(dtype=np.float64))
        den += float(np.square(eb, dtype=d.dtype).sum(dtype=np.float64))
    return float(np.sqrt(num) / np.sqrt(den)) if den else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))
