"""Accuracy budget: choose per layer the rank, bits (and later sparsity) that give the smallest model
that still meets a fidelity budget such as ``cos>=0.99`` or ``accuracy_drop<=1%``.

    result = onnxpress.budget.search("model.onnx", "cos>=0.99", calibration=feeds)
    result.pipeline        # ordinary pipeline text, re-runnable without search
    result.model           # the rewritten model, built by the real passes and verified
    result.plot("pareto.png"); console.print(*result.renderables())

Algorithm
---------
1. **Layers and candidates** (``budget_layers``). Every MatMul/Gemm/Conv with a constant float weight and
   every embedding Gather is a layer. Its candidates are the choices the passes accept for it: int8 per
   channel, int4 block-wise (blocks of 32 to 512, where qdq takes int4 and a larger block stores fewer
   bytes; MatMul/Gemm up to 256, MatMulNBits' limit), for embedding tables the split of ``qdq(embedding_split)``
   (rows the calibration data indexes int4, all others 2-bit), and calibrated low-rank factorization
   at several ratios followed by int8/int4 of the factors (MatMul/Gemm). Each candidate's stored bytes are
   computed exactly from the layout the passes write.
2. **Statistics**: one ORT run over the calibration data captures every layer input's second moment and
   mean (the passes' calibrated factorization and GPTQ use exactly these).
3. **Sensitivity**: one ORT session of the model in which every layer weight is an overridable initializer
   (``budget_eval.Simulator``). For each (layer, candidate) the reconstructed weight (``U @ V``,
   ``dequant(quant(W))``, built with the passes' own maths) is fed for that layer alone; the output error
   against the unmodified outputs on the calibration data is ``d = ||y' - y||^2 / ||y||^2`` (mean over the
   float outputs). Results are cached on disk, keyed by model, calibration data and candidate grid.
   Only the plain quantizations are measured up front (``predict=True``): a factorization candidate's
   ``d`` is predicted as the layer's *gain* (measured ``d`` / the layer's own relative output error
   ``tr(D^T S D) / tr(W^T S W)`` of its quantizations, geometric mean) times its own error (the discarded
   output energy of the calibrated spectrum plus the quantization's local error); no model run, no
   reconstruction. On MiniLM's 360 factorization candidates prediction / measurement is 0.4-5 (median
   1.0, 80% within 0.7-1.9).
4. **Greedy path** (pure functions below). Errors of different layers are treated as additive in ``d``
   (independent perturbations add in squared norm; ``1 - cos ~ d / 2``). Per layer the candidates are
   reduced to the lower convex hull of (bytes saved, d); all hull segments of all layers are sorted by
   bytes saved per unit of ``d``. A prefix of this list is a configuration; longer prefixes are smaller
   and (predicted) less faithful.
5. **Search on the path**: the budget metric of a configuration is measured, not predicted: for output
   metrics (``cos``, ``rel_l2``, ``max_abs``) by feeding all its reconstructions at once to the simulation
   session on the evaluation data; for task metrics by the task's ``evaluate`` on that session with the
   reconstructions fed (``accepts_session``) or on a materialized copy of the model. An interpolating
   search finds the longest prefix that meets the budget; then the layer whose move broke it is frozen
   and the search continues on the remaining moves (``rounds`` times). Then the predicted candidates that
   the result uses, or whose hull move would be as efficient as the best rejected move (the price the
   budget sets) if the prediction were ``REFINE_SLACK`` times too high, are measured and the search runs
   again on the updated path (``refine_rounds`` times at most; configurations already checked are not
   checked again). Candidates far below that price stay predictions: they cannot enter the result.
6. **Build and verify**: the configuration becomes pipeline text (``factorize(ratio=..,calibrated=true,
   include=[..])`` per ratio, then ``qdq(mode=int4,...)`` per block size and ``qdq(mode=weight,...)``,
   each with an ``include`` or ``exclude`` list, whichever is shorter), which the real passes run; the
   result is verified on the evaluation data with the budget metric. If it fails (the real passes differ from the reconstruction by rounding, or by statistics taken
   on the partly rewritten model), the target is tightened by 1.5x the observed gap and steps 5-6 repeat
   (``backoff`` times); as a last resort the lossless model is returned and ``passed`` says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.budget_layers import (
    FP32, Choice, Grid, Layer, Spectra, choice_bytes, collect_input_stats, find_layers, local_error, lowrank_tail, node_label, reconstruct,
)
from onnxpress.errors import UsageError

CACHE_VERSION = 2
from onnxpress.metrics import KEYS as _METRIC_KEYS  # noqa: E402

# output metrics a budget can name (per-sample statistics, ``onnxpress.metrics``): cos = mean per-sample cosine
OUTPUT_METRICS = {key: direction for key, (_, _, direction) in _METRIC_KEYS.items()}
_TINY = 1e-15
# a predicted candidate is measured when it would matter if its d were this many times smaller than
# predicted (on MiniLM, prediction / measurement is 0.4-5, 80% within 0.7-1.9)
REFINE_SLACK = 4.0


# =====================================================================================================
# Budget text
# =====================================================================================================
_BUDGET_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*$")


@dataclasses.dataclass(frozen=True)
class Budget:
    """``metric op value``: ``cos>=0.99`` (mean per-sample cosine), ``min_cos>=0.95``, ``p5_cos>=0.97``,
    ``rel_l2<=0.05``, ``max_abs<=0.1`` (model outputs against the original on the evaluation data, per sample:
    ``onnxpress.metrics.KEYS``) or a task metric returned by the task's ``evaluate`` (e.g.
    ``accuracy_drop<=1%``, ``ppl_increase<=10%``, ``mean_cos>=0.98``). ``%`` divides the value by 100."""

    metric: str
    op: str  # ">=" or "<="
    value: float
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Budget:
        match = _BUDGET_RE.match(text or "")
        if not match:
            raise UsageError(f"budget '{text}': expected METRIC>=VALUE or METRIC<=VALUE, e.g. 'cos>=0.99', 'rel_l2<=0.05', 'accuracy_drop<=1%'")
        metric, op, raw, percent = match.groups()
        value = float(raw) / (100.0 if percent else 1.0)
        if not math.isfinite(value):
            raise UsageError(f"budget '{text}': the value must be a finite number")
        expected = OUTPUT_METRICS.get(metric)
        if expected is not None and op != expected:
            raise UsageError(f"budget '{text}': {metric} is bounded {'below' if expected == '>=' else 'above'}: write {metric}{expected}VALUE")
        if metric.endswith("cos") and not -1.0 <= value < 1.0:
            raise UsageError(f"budget '{text}': cos must be below 1 (1 means no change at all) and at least -1")
        if expected == "<=" and value <= 0.0:
            raise UsageError(f"budget '{text}': {metric} must be > 0")
        return cls(metric, op, value, text.strip())

    @classmethod
    def coerce(cls, value: Budget | str) -> Budget:
        return value if isinstance(value, Budget) else cls.parse(value)

    @property
    def is_output_metric(self) -> bool:
        return self.metric in OUTPUT_METRICS

    def ok(self, measured: float) -> bool:
        if not math.isfinite(measured):
            return False
        return measured >= self.value if self.op == ">=" else measured <= self.value

    def margin(self, measured: float) -> float:
        """How far ``measured`` is inside the budget (negative: outside; -inf for NaN)."""
        if not math.isfinite(measured):
            return -math.inf
        return measured - self.value if self.op == ">=" else self.value - measured

    def tightened(self, gap: float) -> Budget:
        """The same budget moved ``gap`` (>= 0) towards the safe side."""
        value = self.value + gap if self.op == ">=" else self.value - gap
        return dataclasses.replace(self, value=value)

    @property
    def ideal(self) -> float | None:
        """The metric's value for an unchanged model, where it has one: 1 for cosines, 0 for errors and drops."""
        if self.metric.endswith("cos"):
            return 1.0
        return 0.0 if self.op == "<=" else None

    def backed_off(self, expected: float, measured: float) -> Budget:
        """The target for the next search after a build measured ``measured`` where the search expected
        ``expected`` (the fit-set / simulated value) and the budget failed. Where the metric has an ideal
        value, the distance to it is scaled by how much larger the real distance was (held-out errors that are
        k times the fit-set errors need a fit-set target k times closer to ideal, with 20% margin); otherwise
        the target moves by 1.5x the gap."""
        ideal = self.ideal
        if ideal is not None and math.isfinite(expected) and math.isfinite(measured):
            fit_distance = abs(ideal - expected)
            real_distance = abs(ideal - measured)
            if real_distance > fit_distance > 0:
                distance = abs(ideal - self.value) * fit_distance / real_distance / 1.2
                return dataclasses.replace(self, value=ideal - distance if self.op == ">=" else ideal + distance)
        gap = abs(measured - expected) if not math.isclose(measured, expected) else abs(self.value - measured)
        return self.tightened(1.5 * gap + 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


# =====================================================================================================
# Greedy search: pure functions on (bytes, error) tables
# =====================================================================================================
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
        return self.saved / max(self.cost, _TINY)


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
    for li, options in enumerate(tables):
        hull = lower_hull(options)
        for step, (a, b) in enumerate(zip(hull, hull[1:])):
            saved = options[a][0] - options[b][0]
            cost = max(options[b][1], 0.0) - max(options[a][1], 0.0)
            move = Move(li, a, b, float(saved), float(max(cost, 0.0)))
            moves.append((-move.efficiency, li, step, move))
    moves.sort(key=lambda t: (t[0], t[1], t[2]))
    # guard: a later move of a layer must never come before an earlier one (ties in efficiency)
    out: list[Move] = []
    pending: dict[int, list[Move]] = {}
    for *_, m in moves:
        pending.setdefault(m.layer, []).append(m)
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


def longest_passing_prefix(moves: Sequence[Move], probe: Callable[[int], bool | float], size_tol: float = 0.0, size0: float = 0.0) -> int:
    """Largest k such that the prefix of length k passes; prefix 0 is assumed to pass.

    ``probe(k)`` returns a bool, or a margin (>= 0: passes; how far from the budget). With margins the
    next prefix is interpolated on the moves' cumulative predicted error (regula falsi), with a bisection
    step whenever an interpolation did not halve the bracket; with bools it is a binary search. The search
    stops early once the bytes between the passing and the failing prefix are at most ``size_tol`` (bytes;
    with ``size0``, the bytes before any move: a fraction of the passing configuration's size).
    """
    n = len(moves)
    if n == 0:
        return 0
    cost = np.concatenate([[0.0], np.cumsum([m.cost for m in moves])])
    saved = np.concatenate([[0.0], np.cumsum([m.saved for m in moves])])
    first = probe(n)
    interpolate = not isinstance(first, (bool, np.bool_))
    m_hi = _margin(first)
    if m_hi >= 0:
        return n
    lo, hi, m_lo = 0, n, None
    bisect = True
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
    return lo


def search_path(
    moves: Sequence[Move], probe: Callable[[dict[int, int]], bool | float], rounds: int = 4, size_tol: float = 0.0, size0: float = 0.0
) -> tuple[dict[int, int], list[Move]]:
    """Accept the longest passing prefix of ``moves``; freeze the layer of the first move that failed and
    continue with the other layers' remaining moves, up to ``rounds`` rounds. ``probe(config)``: bool or
    margin (>= 0 passes). Returns (config, accepted moves)."""
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
        k = longest_passing_prefix(remaining, lambda j: probe(apply_moves(remaining[:j], base)), size_tol, size0 - done_saved if size0 else 0.0)
        config = apply_moves(remaining[:k], config)
        accepted.extend(remaining[:k])
        if k == len(remaining):
            break
        # moves of the layer whose move failed cannot follow (they start from the option it would have left)
        frozen.add(remaining[k].layer)
        remaining = remaining[k + 1 :]
    return config, accepted


# =====================================================================================================
# Results
# =====================================================================================================
@dataclasses.dataclass
class LayerDecision:
    name: str
    op: str
    shape: tuple[int, ...]
    choice: str
    bytes_before: int
    bytes_after: int
    error_alone: float  # d of this layer's choice applied alone (calibration data)
    rank: int | None = None


@dataclasses.dataclass
class Point:
    """A configuration measured on the way (the budget metric on the evaluation data, simulated)."""

    label: str
    bytes: int
    predicted_d: float
    value: float | None
    passed: bool | None
    kind: str  # path, baseline, chosen, built


@dataclasses.dataclass
class BudgetResult:
    budget: Budget
    pipeline: str
    model: Any  # ir.Model (or onnx.ModelProto if the pipeline ends in a proto-stage pass)
    bytes_before: int
    bytes_after: int
    predicted_bytes: int
    value: float  # the budget metric of the built model on the held-out (evaluation) data: the verdict
    passed: bool
    metrics: dict[str, float]
    layers: list[LayerDecision]
    candidates: list[dict[str, Any]]
    points: list[Point]
    attempts: list[dict[str, Any]]
    seconds: dict[str, float]
    notes: list[str]
    skipped: list[dict[str, Any]]
    evaluation: str  # what the budget was verified on
    fit_value: float = math.nan  # the same metric on the calibration data the search fitted to (for comparison only)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # rundata: sources, split indices

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d = {k: ([dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in v] if isinstance(v, list) else v) for k, v in d.items()}
        d["budget"] = {"text": self.budget.text or str(self.budget), "metric": self.budget.metric, "op": self.budget.op, "value": self.budget.value}
        d["ratio"] = self.ratio
        return json.loads(json.dumps(d, default=_jsonable))

    def renderables(self) -> list[Any]:
        from onnxpress.budget_report import renderables

        return renderables(self)

    def table(self) -> Any:
        """The per-layer decisions as a rich Table."""
        from onnxpress.budget_report import layer_table

        return layer_table(self)

    def plot(self, path: str | os.PathLike) -> Path:
        from onnxpress.budget_report import plot

        return plot(self, Path(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


# =====================================================================================================
# Progress
# =====================================================================================================
class _Reporter:
    """Stages with a total: a rich progress bar (``progress=True``), a callback ``(stage, done, total)``,
    an existing ``rich.progress.Progress``, or nothing."""

    def __init__(self, progress: Any) -> None:
        self.callback: Callable[[str, int, int], None] | None = None
        self.bar = None
        self._own = False
        if progress is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._own = True
        elif hasattr(progress, "add_task"):
            self.bar = progress
        elif callable(progress):
            self.callback = progress

    def __enter__(self) -> _Reporter:
        if self.bar is not None and self._own:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None and self._own:
            self.bar.__exit__(*exc)

    @contextlib.contextmanager
    def stage(self, name: str, total: int):
        done = [0]
        task = self.bar.add_task(name, total=total) if self.bar is not None else None

        def advance(n: int = 1, total_now: int | None = None) -> None:
            done[0] += n
            if task is not None:
                self.bar.update(task, advance=n, **({"total": total_now} if total_now is not None else {}))
            if self.callback is not None:
                self.callback(name, done[0], total_now if total_now is not None else total)

        if self.callback is not None:
            self.callback(name, 0, total)
        try:
            yield advance
        finally:
            if task is not None:
                t = self.bar.tasks[[x.id for x in self.bar.tasks].index(task)]
                self.bar.update(task, completed=t.total)


# =====================================================================================================
# The search
# =====================================================================================================
def _as_model(model: Any) -> tuple[ir.Model, Any]:
    """(working ir.Model copy, reference for evaluate/validate: a path string or a proto)."""
    from onnxpress.io import load

    if isinstance(model, (str, os.PathLike)):
        return load(model), os.fspath(model)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"cannot search a budget for {type(model).__name__}")
    return ir.serde.deserialize_model(proto), proto


def split_coverage(model: ir.Model, layer: Layer, feeds: Sequence[dict[str, np.ndarray]]) -> tuple[int, int]:
    """(index occurrences in rows the split stores in 2 bits, all index occurrences) of an embedding layer
    whose hot rows came from the calibration data, counted on ``feeds`` (the held-out data)."""
    from onnxpress import runtime

    node = list(model.graph)[layer.index]
    name = node.inputs[1].name
    graph_inputs = {v.name for v in model.graph.inputs}
    values = [f[name] for f in feeds] if name in graph_inputs else [c[name] for c in runtime.capture(model, list(feeds), [name])]
    hot = np.zeros(layer.w.shape[0], bool)
    hot[layer.hot] = True
    cold = total = 0
    for v in values:
        idx = np.asarray(v).ravel().astype(np.int64)
        idx = np.where(idx < 0, idx + hot.size, idx)
        total += idx.size
        cold += int((~hot[idx]).sum())
    return cold, total


def _digest(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], extra: str) -> str:
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


def _cache_file(cache: Any, digest: str) -> Path | None:
    if cache is False or cache is None:
        return None
    if cache is True:
        root = Path(os.environ["ONNXPRESS_CACHE"]) if os.environ.get("ONNXPRESS_CACHE") else Path.home() / ".cache" / "onnxpress"
    else:
        root = Path(cache)
    return root / "budget" / f"{digest}.json"


def _blas_threads(limit: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def search(
    model: Any,
    budget: Budget | str,
    calibration: Any = None,
    *,
    evaluation: Any = None,
    holdout: float | int | None = None,
    data: Any = None,
    task: Any = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    base: str | None = None,
    grid: Grid | None = None,
    jobs: int | None = 1,
    cache: bool | str | os.PathLike = True,
    sensitivity_batches: int = 1,
    rounds: int = 3,
    size_tol: float = 0.005,
    backoff: int = 3,
    baselines: bool = False,
    predict: bool = True,
    refine_rounds: int = 3,
    progress: Any = False,
) -> BudgetResult:
    """Find the smallest per-layer mix of factorization and quantization that meets ``budget``.

    ``model``: path, ir.Model or ModelProto (never modified). ``budget``: text or ``Budget``.
    ``calibration``: feeds (list of dicts) or a path (.npz / folder), used by the calibrated passes and
    for the sensitivity analysis (the first ``sensitivity_batches`` batches); default: the task's
    calibration feeds, else 4 generated batches. ``evaluation``: feeds the budget is verified on (default: a
    held-out part of the calibration data, ``holdout``: ``onnxpress.rundata``); ``data``: an already prepared
    ``rundata.RunData`` instead of both. ``task`` (``digits``, ``minilm``, ``lm``) or ``evaluate``
    (``model -> dict of metrics``) is needed for a task-metric budget; an ``evaluate`` with the attribute
    ``accepts_session = True`` is handed an ``InferenceSession`` look-alike during the search (no model is
    written per configuration) and the built model at the end. ``base``: pipeline text run
    first (default none; ``"default"``: onnxpress's lossless default pipeline, whose ``simplify`` turns
    MatMul+Add into Gemm, which ``qdq(mode=int4)`` does not cover). ``jobs``: threads for onnxruntime and
    for computing candidates (default 1; None: all cores). ``rounds``: how many times the search continues past a layer whose
    move broke the budget; ``size_tol``: the search on the path stops when the bytes it could still gain
    are below this fraction of the passing configuration's size. ``baselines``: also measure int8 / int4
    everywhere (for the report and plot; a few more checks). ``predict``: measure only the plain
    quantizations of every layer; predict the factorization candidates' errors from the layer's gain
    (measured d / its own output error) and measure, after a first search, only those the search uses or
    could use (``refine_rounds`` times at most); False measures every candidate. ``cache``: True (``$ONNXPRESS_CACHE`` or
    ``~/.cache/onnxpress``), a folder, or False. Returns a ``BudgetResult``.
    """
    from onnxpress.api import model_bytes
    from onnxpress.budget_eval import Simulator, output_metrics
    from onnxpress.pass_infra import PassContext
    from onnxpress.pipeline import Pipeline

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    budget = Budget.coerce(budget)
    grid = grid or Grid()
    jobs = max(1, os.cpu_count() or 1) if jobs is None else max(1, int(jobs))
    from onnxpress import rundata, tasks

    if not budget.is_output_metric and evaluate is None:
        if task is None:
            raise UsageError(f"budget on '{budget.metric}' is a task metric: give task= (CLI --task NAME or PKG.MOD:FUNCTION) or evaluate=; output budgets are {', '.join(OUTPUT_METRICS)}")
    working, reference = _as_model(model)
    bytes_before = model_bytes(reference if isinstance(reference, onnx.ModelProto) else working)
    resolved = tasks.resolve(task, reference) if evaluate is None else None

    # -- base (lossless) pipeline ------------------------------------------------------------------
    from onnxpress.passes import DEFAULT_PIPELINE

    # No lossless pipeline by default: onnxsim turns MatMul+Add into Gemm, which int4 does not cover.
    base_text = "" if base is None else (DEFAULT_PIPELINE if base == "default" else base)
    base_pipe = Pipeline.parse(base_text)
    # The search fits to the calibration data and decides on held-out data (``onnxpress.rundata``): with
    # calibration only, a seeded part of it is held out and never seen by the passes or the search.
    if data is None:
        data = rundata.prepare(working, calibration=calibration, evaluation=evaluation, holdout=holdout,
                               task=resolved.module if resolved is not None else None)
    elif calibration is not None or evaluation is not None:
        raise UsageError("give data= (a prepared rundata.RunData) or calibration=/evaluation=, not both")
    calib, eval_feeds, evaluation_label = data.calibration, data.evaluation, data.evaluation_source
    if calib is None:
        from onnxpress.data import generate_inputs

        calib = [generate_inputs(working, seed=i) for i in range(4)]
        notes.append("no calibration data given: fitted on 4 generated input batches (pass calibration= for real data)")
    if eval_feeds is None:
        from onnxpress.data import generate_inputs

        eval_feeds = [generate_inputs(working, seed=100 + i) for i in range(4)]
        evaluation_label = "generated random inputs (no real data given: the last resort), other seeds than the fit inputs"
    if len(base_pipe):
        result = base_pipe.run(working, context=PassContext(calibration=calib))
        working = result.model
    # task metrics: the search compares configurations on the fit data where the task takes data (user tasks)
    evaluate_fit = evaluate_verdict = evaluate
    if resolved is not None:
        evaluate_fit = resolved.evaluator(calib if resolved.uses_data else None)
        evaluate_verdict = resolved.evaluator(eval_feeds if resolved.uses_data else None)
        if not resolved.uses_data:
            notes.append(f"task {resolved.name} scores every configuration on its own evaluation set (the passes fit only the calibration data)")
    evaluate = evaluate_fit
    if not budget.is_output_metric:
        evaluation_label = (f"task {resolved.name if resolved else 'evaluate()'} on " + (evaluation_label if resolved is not None and resolved.uses_data else "its own evaluation set"))
    sens_feeds = calib[: max(1, sensitivity_batches)]

    with _Reporter(progress) as rep:
        # -- layers, statistics ------------------------------------------------------------------------
        t0 = time.perf_counter()
        layers, skipped = find_layers(working, grid, calib)
        if not layers:
            raise UsageError("the model has no MatMul/Gemm/Conv/Gather weights the lossy passes can rewrite")
        matmul_inputs = [layer.x for layer in layers if layer.x is not None]
        with rep.stage("input statistics", 1) as advance:
            stats = collect_input_stats(working, calib, matmul_inputs)
            advance()
        seconds["statistics"] = time.perf_counter() - t0

        # -- sensitivity -----------------------------------------------------------------------------
        t0 = time.perf_counter()
        with_bias = [layer for layer in layers if any(c.ratio is not None for c in layer.choices)]
        sim = Simulator(working, layers, with_bias, threads=jobs)
        checked: dict[tuple[tuple[int, int], ...], float] = {}

        def task_model(over: dict[str, np.ndarray]) -> Any:
            # an evaluate() marked ``accepts_session`` scores the simulation session with the overrides fed;
            # any other gets a standalone model with the reconstructions written in
            return sim.session_with(over) if getattr(evaluate, "accepts_session", False) else sim.materialize(over)

        if not budget.is_output_metric:
            # fail fast on a metric the task does not report, or a budget the original model misses itself
            original_value = _task_value(evaluate, task_model({}), budget.metric)
            if not budget.ok(original_value):
                raise UsageError(f"the original model does not meet the budget itself: {budget.metric} = {original_value:.6g} (budget {budget})")
            checked[()] = original_value
        hot_sizes = {layer.name: int(layer.hot.size) for layer in layers if layer.hot is not None}
        digest = _digest(working, sens_feeds, json.dumps([CACHE_VERSION, dataclasses.asdict(grid), hot_sizes]))
        cache_path = _cache_file(cache, digest)
        cached: dict[str, float] = {}
        if cache_path is not None and cache_path.exists():
            with contextlib.suppress(Exception):
                cached = json.loads(cache_path.read_text())["d"]
        spectra = Spectra()
        recon_memo: dict[tuple[int, Choice], tuple[np.ndarray, np.ndarray | None]] = {}

        def recon(li: int, choice: Choice) -> tuple[np.ndarray, np.ndarray | None]:
            key = (li, choice)
            if key not in recon_memo:
                layer = layers[li]
                recon_memo[key] = reconstruct(layer, choice, stats.get(layer.x) if layer.x else None, spectra)
            return recon_memo[key]

        tables: list[list[tuple[float, float]]] = []
        options: list[list[Choice]] = []
        candidates: list[dict[str, Any]] = []
        predicted: set[tuple[int, Choice]] = set()  # (layer, choice) whose d is predicted, not measured yet
        local_errors: dict[tuple[int, Choice], float] = {}

        def measure_alone(li: int, c: Choice) -> float:
            layer = layers[li]
            w, delta = recon(li, c)
            d = sim.error(sens_feeds, sim.override(layer, w, delta)).d
            cached[f"{layer.name}|{c.label}"] = d
            if layer.x is not None and c.ratio is None:
                local_errors[(li, c)] = local_error(layer, w, stats[layer.x])
            return d

        def layer_gain(li: int, measured: Sequence[Choice], table: Sequence[tuple[float, float]]) -> float | None:
            """How much of a layer's own relative output error reaches the model output (d / local error),
            from its measured quantizations (geometric mean); None when it cannot be estimated."""
            layer = layers[li]
            if layer.x is None:
                return None
            ratios = []
            for i, c in enumerate(measured, start=1):
                if (li, c) not in local_errors and c.ratio is None:
                    local_errors[(li, c)] = local_error(layer, recon(li, c)[0], stats[layer.x])
                e = local_errors.get((li, c), 0.0)
                if e > 0 and table[i][1] > 0:
                    ratios.append(math.log(table[i][1] / e))
            return math.exp(sum(ratios) / len(ratios)) if ratios else None

        def predict_d(li: int, c: Choice, gain: float) -> float:
            """Predicted d of a factorization candidate: gain x (discarded output energy + the local error of
            quantizing the whole weight the same way, a stand-in for quantizing the factors)."""
            layer = layers[li]
            e_quant = local_errors.get((li, Choice(None, c.quant)), 0.0) if c.quant is not None else 0.0
            return gain * (lowrank_tail(layer, stats[layer.x], spectra, c.ratio) + e_quant)
        total = sum(len(layer.choices) for layer in layers)
        sim.references(sens_feeds)
        with rep.stage("sensitivity (layer x candidate)", total) as advance, _blas_threads(1):
            import concurrent.futures

            pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs) if jobs > 1 else None
            try:
                for li, layer in enumerate(layers):
                    table = [(float(layer.fp32_bytes), 0.0)]
                    tried: list[Choice] = []
                    # groups of candidates: the plain quantizations (measured), then one group per ratio
                    # (largest first); a ratio whose error alone passes max_layer_error ends the layer's search
                    groups = [[c for c in layer.choices if c.ratio is None]]
                    for r in sorted({c.ratio for c in layer.choices if c.ratio is not None}, reverse=True):
                        groups.append([c for c in layer.choices if c.ratio == r])
                    gain = None
                    for gi, group in enumerate(groups):
                        if gi == 1 and predict:
                            gain = layer_gain(li, tried, table)
                        todo = [c for c in group if f"{layer.name}|{c.label}" not in cached and gain is None]
                        # candidates are computed on the pool while onnxruntime measures the ones ready
                        futures = {c: pool.submit(recon, li, c) for c in todo} if pool is not None and len(todo) > 1 else {}
                        group_best = float("inf")
                        for c in group:
                            key = f"{layer.name}|{c.label}"
                            if key in cached:
                                d = float(cached[key])
                            elif gain is not None:
                                d = predict_d(li, c, gain)
                                predicted.add((li, c))
                            else:
                                if c in futures:
                                    futures[c].result()
                                d = measure_alone(li, c)
                            nbytes = choice_bytes(layer, c)
                            table.append((float(nbytes), d))
                            tried.append(c)
                            group_best = min(group_best, d)
                            candidates.append({"layer": layer.name, "op": layer.op, "choice": c.label, "technique": c.technique, "bytes_before": layer.fp32_bytes, "bytes": nbytes, "d": d, "measured": (li, c) not in predicted})
                            advance()
                        if gi > 0 and group_best > grid.max_layer_error:
                            skipped_count = sum(len(g) for g in groups[gi + 1 :])
                            if skipped_count:
                                advance(skipped_count)
                            break
                    opts = [FP32, *tried]
                    tables.append(table)
                    options.append(opts)
                    # keep the reconstructions on this layer's hull (the search) and the plain quantizations
                    # (the uniform baselines); drop the others
                    keep = {opts[i] for i in lower_hull(table)}
                    for c in tried:
                        if c not in keep and c.ratio is not None:
                            recon_memo.pop((li, c), None)
            finally:
                if pool is not None:
                    pool.shutdown()
        if cache_path is not None:
            with contextlib.suppress(OSError):
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "d": cached}))
                os.replace(tmp, cache_path)
        seconds["sensitivity"] = time.perf_counter() - t0

        # -- greedy path and its search --------------------------------------------------------------------
        t0 = time.perf_counter()
        path = greedy_path(tables)
        base_weight_bytes = sum(t[0][0] for t in tables)
        working_bytes = model_bytes(working)
        points: list[Point] = []

        def config_bytes(config: dict[int, int]) -> int:
            return int(working_bytes - base_weight_bytes + sum(tables[li][config.get(li, 0)][0] for li in range(len(layers))))

        def config_d(config: dict[int, int]) -> float:
            return float(sum(tables[li][o][1] for li, o in config.items()))

        def overrides(config: dict[int, int]) -> dict[str, np.ndarray]:
            out: dict[str, np.ndarray] = {}
            for li, o in config.items():
                if o == 0:
                    continue
                w, delta = recon(li, options[li][o])
                out.update(sim.override(layers[li], w, delta))
            return out

        def measure(config: dict[int, int]) -> float:
            key = tuple(sorted((li, o) for li, o in config.items() if o))
            if key not in checked:
                over = overrides(config)
                if budget.is_output_metric:
                    value = sim.error(calib, over).metrics()[budget.metric]
                else:
                    value = _task_value(evaluate, task_model(over), budget.metric)
                checked[key] = value
            return checked[key]

        def relevant_predictions(config: dict[int, int], accepted: Sequence[Move]) -> list[tuple[int, Choice]]:
            """Predicted candidates the chosen configuration uses, or whose hull move, with the prediction
            REFINE_SLACK times too pessimistic, is as efficient as the best move the search had to reject
            (the price the budget sets): only these can change the result once measured."""
            taken = set(accepted)
            price = max((m.efficiency for m in path if m not in taken), default=0.0)
            out: list[tuple[int, Choice]] = []
            for li, table in enumerate(tables):
                # optimistic: every prediction REFINE_SLACK times too high (on the hull and efficient enough?)
                hopeful = [(nbytes, d / REFINE_SLACK if (li, options[li][o]) in predicted else d) for o, (nbytes, d) in enumerate(table)]
                hull = lower_hull(hopeful)
                on_hull = [b for b in hull[1:] if (li, options[li][b]) in predicted]
                relevant = any(
                    config.get(li, 0) == b or (hopeful[a][0] - hopeful[b][0]) / max(hopeful[b][1] - hopeful[a][1], _TINY) >= price
                    for a, b in zip(hull, hull[1:])
                    if (li, options[li][b]) in predicted
                )
                # a layer with one relevant prediction gets all its hull predictions measured at once: its
                # neighbours on the hull tend to become relevant next, and each round costs a search
                if relevant:
                    out.extend((li, options[li][b]) for b in on_hull)
                o = config.get(li, 0)
                if o and (li, options[li][o]) in predicted and (li, options[li][o]) not in out:
                    out.append((li, options[li][o]))
            return out

        target = budget
        tick: list[Callable[..., None]] = [lambda *a, **k: None]  # the progress of the stage searching now

        def search_stage(name: str) -> Any:
            return rep.stage(name, 2 * int(math.log2(len(path) + 1) + 1) * max(rounds, 1))

        with search_stage("search (verified configurations)") as advance:
            tick[0] = advance

            def probe(config: dict[int, int]) -> float:
                value = measure(config)
                ok = target.ok(value)
                points.append(Point(f"{sum(1 for o in config.values() if o)} layers rewritten", config_bytes(config), config_d(config), value, ok, "path"))
                tick[0]()
                return target.margin(value)

            def run_search() -> tuple[dict[int, int], list[Move]]:
                return search_path(path, probe, rounds, size_tol=size_tol, size0=float(working_bytes))

            config, accepted = run_search()
        seconds["search"] = time.perf_counter() - t0

        # -- refine: measure the predicted candidates the search uses or could use, then search again -------
        t0 = time.perf_counter()
        for _ in range(refine_rounds if predicted else 0):
            todo = relevant_predictions(config, accepted)
            if not todo:
                break
            with rep.stage("sensitivity (predicted candidates the search may use)", len(todo)) as advance, _blas_threads(1):
                for li, c in todo:
                    o = options[li].index(c)
                    d = measure_alone(li, c)
                    tables[li][o] = (tables[li][o][0], d)
                    predicted.discard((li, c))
                    for row in candidates:
                        if row["layer"] == layers[li].name and row["choice"] == c.label:
                            row.update(d=d, measured=True)
                    advance()
            path = greedy_path(tables)
            with search_stage("search again (measured candidates)") as advance:
                tick[0] = advance
                config, accepted = run_search()
        seconds["refine"] = time.perf_counter() - t0

        if baselines:
            t0 = time.perf_counter()
            with rep.stage("uniform baselines", 3) as advance:
                for quant in ("int8", "int4/32", "int4/128"):
                    cfg: dict[int, int] = {}
                    for li, opts in enumerate(options):
                        pick = Choice(None, quant) if Choice(None, quant) in opts else (Choice(None, "int8") if Choice(None, "int8") in opts else None)
                        if pick is not None:
                            cfg[li] = opts.index(pick)
                    value = measure(cfg)
                    points.append(Point(f"all {quant}" + (" (int8 where int4 does not apply)" if quant != "int8" else ""), config_bytes(cfg), config_d(cfg), value, budget.ok(value), "baseline"))
                    advance()
            seconds["baselines"] = time.perf_counter() - t0

        # -- build with the real passes, verify, back off ----------------------------------------------------
        t0 = time.perf_counter()
        reference_outputs = fit_reference = None
        if budget.is_output_metric:
            from onnxpress import runtime

            ref_session = runtime.make_session(reference, threads=jobs)
            reference_outputs = [_float_outputs(runtime.run(ref_session, f)) for f in eval_feeds]
            fit_reference = [_float_outputs(runtime.run(ref_session, f)) for f in calib]
            del ref_session
        attempts: list[dict[str, Any]] = []
        final = None
        splits_banned = False
        with rep.stage("build and verify", backoff + 1) as advance:
            for attempt in range(backoff + 3):  # + 1: a held-out failure with an embedding split first drops the split
                last_resort = attempt == backoff + 2
                if last_resort:
                    config = {}
                    notes.append("no configuration met the budget when built with the real passes: returned the lossless model")
                decisions = {layers[li].name: options[li][o] for li, o in config.items() if o}
                built_model, lossy_passes = build(working, layers, decisions, calib)
                text = ",".join(p for p in [base_text.strip(), str(Pipeline(lossy_passes))] if p)
                if budget.is_output_metric:
                    metrics = output_metrics(built_model, eval_feeds, reference_outputs, threads=jobs).metrics()
                    fit_metrics = output_metrics(built_model, calib, fit_reference, threads=jobs).metrics()
                else:
                    metrics = dict(evaluate_verdict(built_model))
                    fit_metrics = dict(evaluate_fit(built_model)) if evaluate_fit is not evaluate_verdict else dict(metrics)
                value = float(metrics[budget.metric])
                fit_value = float(fit_metrics[budget.metric])
                ok = budget.ok(value)
                simulated = measure(config)
                split_rows = []
                for li, o in config.items():
                    if o and options[li][o].quant is not None and options[li][o].quant.startswith("split/") and layers[li].hot is not None:
                        cold, total = split_coverage(working, layers[li], eval_feeds)
                        split_rows.append({"layer": layers[li].name, "held_out_cold_occurrences": cold, "held_out_occurrences": total})
                attempts.append({"pipeline": text, "bytes": model_bytes(built_model), "value": value, "fit_value": fit_value,
                                 "simulated": simulated, "passed": ok, "target": target.value, "embedding_split": split_rows})
                advance()
                final = (built_model, text, metrics, value, ok, dict(config), fit_value)
                if ok or last_resort:
                    break
                if budget.ok(fit_value):
                    notes.append(f"attempt {attempt + 1}: {budget.metric} {fit_value:.6g} on the calibration data but {value:.6g} on held-out data: "
                                 "the calibration set looks too small or unrepresentative; backing off")
                if split_rows and not splits_banned:
                    # the embedding split is the sharpest overfit: rows the calibration data never indexed are
                    # 2-bit; when the held-out verdict fails with a split in the build, drop splits first
                    splits_banned = True
                    cold_share = sum(r["held_out_cold_occurrences"] for r in split_rows) / max(1, sum(r["held_out_occurrences"] for r in split_rows))
                    notes.append(f"embedding split rejected by the held-out check ({cold_share:.1%} of held-out token occurrences fall in 2-bit rows)")
                    for li, opts in enumerate(options):
                        for oi, c in enumerate(opts):
                            if c.quant is not None and c.quant.startswith("split/"):
                                tables[li][oi] = (tables[li][oi][0], math.inf)
                    path = greedy_path(tables)
                    with search_stage("search again (no embedding split)") as search_advance:
                        tick[0] = search_advance
                        config, accepted = run_search()
                    continue
                target = target.backed_off(simulated, value)
                if not np.isfinite(target.value):
                    config = {}
                    continue
                with search_stage(f"search again (target tightened to {target.value:.6g})") as search_advance:
                    tick[0] = search_advance
                    config, accepted = run_search()
        seconds["build"] = time.perf_counter() - t0
        assert final is not None
        built_model, text, metrics, value, ok, config, fit_value = final

    _stamp(built_model, text)
    layer_rows = []
    for li, layer in enumerate(layers):
        o = config.get(li, 0)
        c = options[li][o]
        rank = None
        if c.ratio is not None:
            from onnxpress.passes.factorize import rank_for_ratio

            k, n = layer.matrix.shape
            rank = rank_for_ratio(k, n, c.ratio)
        layer_rows.append(LayerDecision(layer.name, layer.op, layer.shape, c.label, layer.fp32_bytes, int(tables[li][o][0]), float(tables[li][o][1]), rank))
    points.append(Point("chosen (built with the passes)", model_bytes(built_model), config_d(config), value, ok, "built"))
    seconds["total"] = time.perf_counter() - t_start
    for layer in layers:
        for tech, reason in layer.skipped.items():
            skipped.append({"layer": layer.name, "op": layer.op, "skipped": f"{tech}: {reason}"})
    return BudgetResult(
        budget=budget, pipeline=text, model=built_model, bytes_before=bytes_before, bytes_after=model_bytes(built_model),
        predicted_bytes=config_bytes(config), value=value, fit_value=fit_value, passed=ok, metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        layers=layer_rows, candidates=candidates, points=points, attempts=attempts, seconds=seconds, notes=notes, skipped=skipped,
        evaluation=evaluation_label, data=data.to_dict(),
    )


def _float_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _task_value(evaluate: Callable[[Any], dict[str, float]], model: Any, metric: str) -> float:
    metrics = evaluate(model)
    if metric not in metrics:
        raise UsageError(f"the task's evaluate() has no metric '{metric}' (it reports: {', '.join(sorted(metrics))})")
    return float(metrics[metric])


def _stamp(model: Any, pipeline: str) -> None:
    from onnxpress.api import _stamp_metadata

    _stamp_metadata(model, pipeline)


# =====================================================================================================
# Building the chosen configuration with the real passes
# =====================================================================================================
def substring_selectors(intended: Sequence[str], universe: Sequence[str], done: Iterable[str] = ()) -> list[tuple[list[str], list[str]]]:
    """(include, exclude) pairs for options that select by substring (``factorize``) such that each pair
    selects exactly its include names among ``universe`` minus ``done`` (names already handled), and the
    pairs together cover ``intended``. One pair unless a name is a substring of another one that must be
    excluded and that itself contains... (then the names are split across pairs)."""
    done = set(done)
    todo = [n for n in intended]
    out: list[tuple[list[str], list[str]]] = []
    while todo:
        group = list(todo)
        while True:
            selected = {u for u in universe if u not in done and any(g in u for g in group)}
            exclude = sorted(selected - set(group))
            blocked = [g for g in group if any(e in g for e in exclude)]
            if not blocked:
                break
            group = [g for g in group if g not in blocked]
            if not group:
                group = [todo[0]]  # alone, a name is never inside an excluded (longer) name
                exclude = sorted(u for u in universe if u not in done and group[0] in u and u != group[0])
                break
        out.append((group, exclude))
        done |= set(group)
        todo = [t for t in todo if t not in group]
    return out


def _compress_names(names: Sequence[str], targets: Sequence[tuple[str, str]]) -> list[str]:
    """Replace the names of every target of an op type by the op type (qdq's include/exclude take both)."""
    chosen = set(names)
    by_op: dict[str, list[str]] = {}
    for name, op in targets:
        by_op.setdefault(op, []).append(name)
    out: list[str] = []
    covered: set[str] = set()
    for op, members in by_op.items():
        if all(n in chosen for n in members):
            out.append(op)
            covered |= set(members)
    out.extend(n for n in names if n not in covered)
    return out


def _selection(wanted: Sequence[str], excluded: Sequence[str], targets: Sequence[tuple[str, str]], has_include: bool = True) -> dict[str, tuple[str, ...]]:
    """qdq's ``include=`` or ``exclude=`` option, whichever is shorter as text, selecting exactly ``wanted``
    among ``targets`` (name, op type); op types stand for all their targets."""
    by_exclude = tuple(_compress_names(excluded, targets))
    if not has_include:
        return {"exclude": by_exclude}
    by_include = tuple(_compress_names(wanted, targets))
    return {"include": by_include} if len(",".join(by_include)) < len(",".join(by_exclude)) else {"exclude": by_exclude}


def build(model: ir.Model, layers: Sequence[Layer], decisions: dict[str, Choice], calibration: Sequence[dict[str, np.ndarray]]) -> tuple[ir.Model, list[Any]]:
    """Run the passes that realise ``decisions`` (layer name -> choice) on a copy of ``model``.

    Returns the rewritten model and the pass objects (their text is the pipeline). Raises RuntimeError if
    a pass rewrote other layers than planned (the plan and the passes disagree: a bug)."""
    from onnxpress.pass_infra import PassContext
    from onnxpress.passes import qdq as qdq_pass
    from onnxpress.passes.factorize import Factorize
    from onnxpress.passes.qdq import Qdq

    work = ir.from_proto(ir.to_proto(model))
    context = PassContext(calibration=list(calibration))
    passes: list[Any] = []
    by_name = {layer.name: layer for layer in layers}

    def run(p: Any) -> None:
        p.context = context
        p(work)
        passes.append(p)

    # 1. factorize, one pass per ratio (largest first)
    universe = [node_label(n, i) for i, n in enumerate(work.graph) if n.op_type in ("MatMul", "Gemm")]
    done: set[str] = set()
    for ratio in sorted({c.ratio for c in decisions.values() if c.ratio is not None}, reverse=True):
        names = [n for n, c in decisions.items() if c.ratio == ratio]
        for include, exclude in substring_selectors(names, universe, done):
            kwargs: dict[str, Any] = {"ratio": ratio, "calibrated": True, "include": tuple(include)}
            if exclude:
                kwargs["exclude"] = tuple(exclude)
            p = Factorize(**kwargs)
            run(p)
            rewritten = {row["layer"] for row in p.details if "skipped" not in row}
            if rewritten != set(include):
                raise RuntimeError(f"factorize rewrote {sorted(rewritten)}, planned {sorted(include)}")
            done |= set(include)

    # 2. quantize: int4 passes per block size, then int8; factorized layers are quantized as U and V
    def current_names(name: str, choice: Choice) -> list[str]:
        return [f"{name}/factorize_U", f"{name}/factorize_V"] if choice.ratio is not None else [name]

    quants = sorted({c.quant for c in decisions.values() if c.quant is not None}, key=lambda q: (q == "int8", q))
    for quant in quants:
        wanted = [x for n, c in decisions.items() if c.quant == quant for x in current_names(n, c)]
        defaults = qdq_pass.QdqOptions()
        if quant == "int8":
            mode_opts: dict[str, Any] = {"mode": "weight"}
        elif quant.startswith("split/"):
            hot_block, cold_block = (int(x) for x in quant.split("/")[1:])
            mode_opts = {"mode": "int4", "embedding_split": True}
            if hot_block != defaults.embedding_block_size:
                mode_opts["embedding_block_size"] = hot_block
            if cold_block != defaults.embedding_cold_block_size:
                mode_opts["embedding_cold_block_size"] = cold_block
        else:
            block = int(quant.split("/")[1])
            mode_opts = {"mode": "int4"}
            if block != qdq_pass.QdqOptions().block_size:
                mode_opts["block_size"] = block
            if any(by_name[n].op == "Gather" for n, c in decisions.items() if c.quant == quant) and block != qdq_pass.QdqOptions().embedding_block_size:
                mode_opts["embedding_block_size"] = block
        targets, _ = qdq_pass.find_targets(work, qdq_pass.QdqOptions(**{k: v for k, v in mode_opts.items()}))
        target_names = [(t.node.name, t.node.op_type) for t in targets]
        missing = set(wanted) - {n for n, _ in target_names}
        if missing:
            raise RuntimeError(f"qdq({mode_opts}) would not quantize {sorted(missing)}")
        unnamed = [t.label for t in targets if not t.node.name]
        if unnamed:
            raise RuntimeError(f"qdq cannot exclude unnamed nodes {unnamed}")
        excluded = [n for n, _ in target_names if n not in set(wanted)]
        if excluded:
            mode_opts.update(_selection(wanted, excluded, target_names, has_include="include" in {f.name for f in dataclasses.fields(qdq_pass.QdqOptions)}))
        p = Qdq(**mode_opts)
        run(p)
        quantized = {row["layer"] for row in p.details if "skipped" not in row and "bytes_after" in row}
        if quantized != set(wanted):
            raise RuntimeError(f"qdq quantized {sorted(quantized)}, planned {sorted(wanted)}")
    return work, passes
