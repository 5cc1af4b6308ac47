"""The greedy search's maths: pure functions on per-layer (bytes, error) tables.

Per layer the options are reduced to the lower convex hull of (bytes saved, error); all hull moves of all
layers, sorted by bytes saved per unit of error, form the *path*. A prefix of the path is a configuration;
``search_path`` finds the longest prefix that a probe accepts, freezing a layer whose move broke it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

TINY = 1e-15  # the smallest error a move's efficiency divides by


@dataclasses.dataclass(frozen=True)
class Move:
    """Layer ``layer`` goes from option ``src`` to option ``dst`` (indices into its option list)."""

    layer: int
    src: int
    dst: int
    saved: float  # bytes saved by the move
    cost: float  # error added by the move (additive proxy)

    @property
    def efficiency(self) -> float:
        return self.saved / max(self.cost, TINY)


def lower_hull(options: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the options on the lower convex hull of (bytes saved, error), from option 0 (the unchanged
    layer: nothing saved, no error) towards the most saving; options that save nothing are dropped.

    Along the hull the error added per byte saved grows, so taking hull points in order is the best
    (Lagrangian) way to spend error on this layer.
    """
    base_bytes = options[0][0]
    pts = sorted(
        ((base_bytes - b, max(e, 0.0), i) for i, (b, e) in enumerate(options) if i == 0 or b < base_bytes),
        key=lambda p: (p[0], p[1]),
    )
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        # a point with the same saving as the last one but more error is never better
        if hull and p[0] == hull[-1][0]:
            continue
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies above the segment hull[-2] -> p (collinear points stay: finer steps)
            if (y2 - y1) * (p[0] - x1) > (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return [i for _, _, i in hull]


def greedy_path(tables: Sequence[Sequence[tuple[float, float]]]) -> list[Move]:
    """All hull moves of all layers, most bytes saved per unit of error first.

    ``tables[l]`` lists layer l's options as (bytes, error); option 0 is the unchanged layer. Within a
    layer, hull moves have non-increasing efficiency, so the sorted list keeps each layer's moves in order.
    """
    moves: list[tuple[float, int, int, Move]] = []
    pending: dict[int, list[Move]] = {}  # each layer's moves in hull order
    for li, options in enumerate(tables):
        hull = lower_hull(options)
        for step, (a, b) in enumerate(zip(hull, hull[1:])):
            saved = options[a][0] - options[b][0]
            cost = max(options[b][1], 0.0) - max(options[a][1], 0.0)
            # inf - inf (a move between two rejected, infinite-error options) is NaN, and one NaN key leaves the
            # whole sort in an undefined order: such a move costs infinitely much
            move = Move(li, a, b, float(saved), math.inf if math.isnan(cost) else float(max(cost, 0.0)))
            moves.append((-move.efficiency, li, step, move))
            pending.setdefault(li, []).append(move)
    moves.sort(key=lambda t: (t[0], t[1], t[2]))
    # guard: a later move of a layer must never come before an earlier one (ties in efficiency)
    out: list[Move] = []
    cursor = {li: 0 for li in pending}
    for *_, m in moves:
        lst = pending[m.layer]
        out.append(lst[cursor[m.layer]])
        cursor[m.layer] += 1
    return out


def apply_moves(moves: Iterable[Move], config: dict[int, int] | None = None) -> dict[int, int]:
    """Layer -> option index after the moves (each move's source must be the layer's current option)."""
    config = dict(config or {})
    for m in moves:
        current = config.get(m.layer, 0)
        if current != m.src:
            raise ValueError(f"move {m} does not start from the layer's current option {current}")
        config[m.layer] = m.dst
    return config


def _margin(value: bool | float) -> float:
    return (1.0 if value else -1.0) if isinstance(value, (bool, np.bool_)) else float(value)


def longest_passing_prefix(moves: Sequence[Move], probe: Callable[[int], bool | float], size_tol: float = 0.0, size0: float = 0.0,
                           margin0: float | None = None) -> int:
    """Largest k such that the prefix of length k passes; prefix 0 is assumed to pass.

    ``probe(k)`` returns a bool, or a margin (>= 0: passes; how far from the budget). With margins the
    next prefix is interpolated on the moves' cumulative predicted error (regula falsi), with a bisection
    step whenever an interpolation did not halve the bracket; with bools it is a binary search. The search
    stops early once the bytes between the passing and the failing prefix are at most ``size_tol`` (bytes;
    with ``size0``, the bytes before any move: a fraction of the passing configuration's size).
    ``margin0``: prefix 0's margin when known (the first step then interpolates instead of bisecting).
    """
    return passing_bracket(moves, probe, size_tol, size0, margin0)[0]


def passing_bracket(moves: Sequence[Move], probe: Callable[[int], bool | float], size_tol: float = 0.0, size0: float = 0.0,
                    margin0: float | None = None) -> tuple[int, int]:
    """``longest_passing_prefix``'s search, returning its bracket (lo, hi): prefix lo passes, hi fails (hi = n + 1
    when every prefix passes); hi = lo + 1 when the move that broke the budget was found, larger when the search
    stopped at ``size_tol``."""
    n = len(moves)
    if n == 0:
        return 0, 1
    cost = np.concatenate([[0.0], np.cumsum([m.cost for m in moves])])
    saved = np.concatenate([[0.0], np.cumsum([m.saved for m in moves])])
    first = probe(n)
    interpolate = not isinstance(first, (bool, np.bool_))
    m_hi = _margin(first)
    if m_hi >= 0:
        return n, n + 1
    lo, hi = 0, n
    m_lo = margin0 if (interpolate and margin0 is not None and math.isfinite(margin0) and margin0 >= 0) else None
    bisect = m_lo is None
    while hi - lo > 1 and saved[hi] - saved[lo] > size_tol * (size0 - saved[lo] if size0 else 1.0):
        width = hi - lo
        if bisect or not interpolate or m_lo is None or m_lo == m_hi or not math.isfinite(m_hi):
            k = (lo + hi) // 2
        else:
            t = m_lo / (m_lo - m_hi)
            x = cost[lo] + t * (cost[hi] - cost[lo])
            k = int(np.searchsorted(cost, x, side="right")) - 1
            k = min(max(k, lo + 1), hi - 1)
        m = _margin(probe(k))
        if m >= 0:
            lo, m_lo = k, m
        else:
            hi, m_hi = k, m
        bisect = (hi - lo) > width / 2
    return lo, hi


def search_path(
    moves: Sequence[Move], probe: Callable[[dict[int, int]], bool | float], rounds: int = 4, size_tol: float = 0.0, size0: float = 0.0,
    margin0: float | None = None,
) -> tuple[dict[int, int], list[Move]]:
    """Accept the longest passing prefix of ``moves``; freeze the layer of the first move that failed and
    continue with the other layers' remaining moves, up to ``rounds`` rounds. ``probe(config)``: bool or
    margin (>= 0 passes); ``margin0``: the margin of the empty configuration, when known. A next round needs
    the failing move pinned down and saving more than the tolerance: when the search stopped at the size
    tolerance, or the move that broke the budget saves less, what another round could gain is below the
    tolerance too (the moves after it are less efficient). Returns (config, accepted moves)."""
    accepted: list[Move] = []
    config: dict[int, int] = {}
    remaining = list(moves)
    frozen: set[int] = set()
    for _ in range(max(rounds, 1)):
        remaining = [m for m in remaining if m.layer not in frozen]
        if not remaining:
            break
        base = dict(config)
        done_saved = sum(m.saved for m in accepted)
        tol_size = size0 - done_saved if size0 else 0.0
        k, hi = passing_bracket(remaining, lambda j: probe(apply_moves(remaining[:j], base)), size_tol, tol_size, margin0 if not accepted else None)
        config = apply_moves(remaining[:k], config)
        accepted.extend(remaining[:k])
        if k == len(remaining):
            break
        tolerance = size_tol * ((tol_size - sum(m.saved for m in remaining[:k])) if size0 else 1.0)
        if hi > k + 1 or remaining[k].saved <= tolerance:
            break
        # moves of the layer whose move failed cannot follow (they start from the option it would have left)
        frozen.add(remaining[k].layer)
        remaining = remaining[k + 1 :]
    return config, accepted
