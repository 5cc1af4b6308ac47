"""Validation: run the original and the rewritten model in onnxruntime on the same inputs and compare.

Per output: max abs error, relative L2 error, cosine similarity, and whether every element satisfies
``|a - b| <= atol + rtol * |b|`` (polygraphy's semantics, b = reference).  A lossy pipeline is judged by a
cosine floor instead (``min_cosine``), because its elementwise error is by design above float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress import data as data_mod
from onnxpress import metrics as metrics_mod
from onnxpress import runtime
from onnxpress.errors import ValidationError
from onnxpress.io import initializer_bytes

LOSSLESS_TOLERANCE = (1e-4, 1e-3)  # atol, rtol: float rounding of reordered arithmetic
# From this many weight bytes on, validation runs onnxruntime in low-memory mode (see ``validate``).
LOW_MEMORY_BYTES = 512 * 1024 * 1024
# ... and a candidate holding more than this in memory is offloaded to a temporary file first.
OFFLOAD_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float = LOSSLESS_TOLERANCE[0]
    rtol: float = LOSSLESS_TOLERANCE[1]
    min_cosine: float | None = None  # when set, a float output passes on mean per-sample cosine >= min_cosine

    def describe(self) -> str:
        if self.min_cosine is not None:
            return f"mean per-sample cosine >= {self.min_cosine}"
        return f"|a-b| <= {self.atol} + {self.rtol}*|b|"


@dataclasses.dataclass
class OutputComparison:
    """One output over all evaluation samples (see ``onnxpress.metrics``: a sample is one batch row).

    ``cosine`` and ``rel_l2`` are the means over samples, ``max_abs`` the worst; the tails are alongside.
    A cosine tolerance judges the mean per-sample cosine; an elementwise tolerance every element."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    rel_l2: float
    cosine: float
    within_tolerance: bool
    note: str = ""
    samples: int = 1
    cosine_min: float | None = None
    cosine_p5: float | None = None
    rel_l2_max: float | None = None
    rel_l2_p95: float | None = None
    max_abs_mean: float | None = None

    def summary(self) -> dict[str, float]:
        """The budget/verdict keys of ``onnxpress.metrics.KEYS`` for this output."""
        return {
            "cos": self.cosine, "min_cos": _or(self.cosine_min, self.cosine), "p5_cos": _or(self.cosine_p5, self.cosine),
            "rel_l2": self.rel_l2, "max_rel_l2": _or(self.rel_l2_max, self.rel_l2), "p95_rel_l2": _or(self.rel_l2_p95, self.rel_l2),
            "max_abs": self.max_abs, "mean_max_abs": _or(self.max_abs_mean, self.max_abs), "p95_max_abs": self.max_abs,
        }


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclasses.dataclass
class ValidationReport:
    provider: str
    tolerance: Tolerance
    outputs: list[OutputComparison]
    inputs: dict[str, list[int]]
    samples: int = 1  # evaluation samples (batch rows) compared
    feeds: int = 1  # onnxruntime runs
    data: str = ""  # what the verdict was computed on, in words (held-out calibration part, user data, generated)
    generated: bool = False  # random generated inputs: the last resort

    @property
    def passed(self) -> bool:
        return all(o.within_tolerance for o in self.outputs)

    @property
    def min_cosine(self) -> float:
        """The worst per-sample cosine of any output."""
        values = [_or(o.cosine_min, o.cosine) for o in self.outputs if np.isfinite(_or(o.cosine_min, o.cosine))]
        return min(values) if values else float("nan")

    @property
    def mean_cosine(self) -> float:
        """The worst output's mean per-sample cosine."""
        values = [o.cosine for o in self.outputs if np.isfinite(o.cosine)]
        return min(values) if values else float("nan")

    def metrics(self) -> dict[str, float]:
        """The worst value over float outputs of every key in ``onnxpress.metrics.KEYS``."""
        return metrics_mod.worst(o.summary() for o in self.outputs if o.dtype.startswith("float") or o.dtype == "bfloat16")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        d["metrics"] = self.metrics()
        return d


def compare_arrays(name: str, actual: Any, expected: Any, tol: Tolerance) -> OutputComparison:
    """Compare one output as one sample. NaNs must sit in the same places; integer and bool outputs must be equal."""
    if not isinstance(expected, np.ndarray) or not isinstance(actual, np.ndarray):
        same = _nested_equal(actual, expected, tol)
        return OutputComparison(name, (), type(expected).__name__, 0.0 if same else float("inf"), 0.0 if same else 1.0, 1.0 if same else 0.0, same, "non-tensor output")
    if actual.shape != expected.shape:
        return OutputComparison(name, tuple(expected.shape), str(expected.dtype), float("inf"), float("inf"), float("nan"), False, f"shape {actual.shape} != reference {expected.shape}")
    if expected.dtype.kind in "OUS":
        same = bool(np.array_equal(actual, expected))
        return OutputComparison(name, tuple(expected.shape), str(expected.dtype), 0.0 if same else float("inf"), 0.0, 1.0, same)
    if expected.dtype.kind in "biu":
        a = actual.astype(np.float64)
        b = expected.astype(np.float64)
        diff = np.abs(a - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        return OutputComparison(name, tuple(expected.shape), str(expected.dtype), max_abs, _rel_l2(a, b), _cosine(a, b), max_abs == 0.0)
    a = np.asarray(actual, dtype=np.float64) if actual.dtype.kind != "c" else np.asarray(actual)
    b = np.asarray(expected, dtype=np.float64) if expected.dtype.kind != "c" else np.asarray(expected)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return OutputComparison(name, tuple(b.shape), str(expected.dtype), float("inf"), float("inf"), float("nan"), False, "NaNs differ")
    finite = ~nan_b
    a_f, b_f = a[finite], b[finite]
    inf_mismatch = bool(np.any((np.isinf(a_f) | np.isinf(b_f)) & (a_f != b_f)))
    both_inf = np.isinf(a_f) & np.isinf(b_f) & (a_f == b_f)
    a_f, b_f = a_f[~both_inf], b_f[~both_inf]
    diff = np.abs(a_f - b_f)
    max_abs = float(diff.max()) if diff.size else 0.0
    cosine = _cosine(a_f, b_f)
    if tol.min_cosine is not None:
        ok = (cosine >= tol.min_cosine) if np.isfinite(cosine) else max_abs <= tol.atol
    else:
        ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(b_f)))
    return OutputComparison(name, tuple(b.shape), str(expected.dtype), max_abs, _rel_l2(a_f, b_f), cosine, bool(ok and not inf_mismatch),
                            "infinities differ" if inf_mismatch else "")


_HARD = Tolerance(atol=float("inf"), rtol=0.0)  # only shape, NaN and infinity placement fail under this


def compare_samples(name: str, pairs: list[tuple[Any, Any]], tol: Tolerance) -> OutputComparison:
    """One output over samples ``(actual, expected)``: per-sample metrics summarised (mean, worst, 5% tail).

    Elementwise tolerance: every sample must pass. Cosine tolerance: no sample may differ in shape, NaN or
    infinity placement, and the mean per-sample cosine must reach the floor."""
    rows = [compare_arrays(name, a, e, tol) for a, e in pairs]
    if len(rows) == 1:
        return rows[0]
    first = rows[0]
    # the statistics over samples are onnxpress.metrics' (cosines of samples whose cosine is undefined left out)
    per = metrics_mod.SampleMetrics(
        cos=[r.cosine for r in rows if np.isfinite(r.cosine)], rel_l2=[r.rel_l2 for r in rows], max_abs=[r.max_abs for r in rows]
    )
    mean_cos, max_abs = per.statistic("cos", "mean"), per.statistic("max_abs", "max")
    note = next((r.note for r in rows if r.note), "")
    if tol.min_cosine is None:
        ok = all(r.within_tolerance for r in rows)
    else:
        hard_ok = all(compare_arrays(name, a, e, _HARD).within_tolerance for a, e in pairs) if not all(r.within_tolerance for r in rows) else True
        ok = hard_ok and ((mean_cos >= tol.min_cosine) if np.isfinite(mean_cos) else max_abs <= tol.atol)
    shape = (len(rows), *first.shape)
    return OutputComparison(
        name, shape, first.dtype, max_abs, per.statistic("rel_l2", "mean"), mean_cos, bool(ok), note, samples=len(rows),
        cosine_min=per.statistic("cos", "min"), cosine_p5=per.statistic("cos", "p5"),
        rel_l2_max=per.statistic("rel_l2", "max"), rel_l2_p95=per.statistic("rel_l2", "p95"), max_abs_mean=per.statistic("max_abs", "mean"),
    )


def compare_runs(
    outputs: list[dict[str, Any]], references: list[dict[str, Any]], feeds: list[dict[str, Any]], tol: Tolerance
) -> list[OutputComparison]:
    """Every output of the reference over every feed, split into samples (``onnxpress.metrics``)."""
    names = list(references[0])
    comparisons = []
    for name in names:
        pairs: list[tuple[Any, Any]] = []
        for out, ref, feed in zip(outputs, references, feeds):
            actual, expected = out[name], ref[name]
            batch = metrics_mod.feed_batch(feed)
            if isinstance(actual, np.ndarray) and isinstance(expected, np.ndarray) and actual.shape == expected.shape:
                pairs.extend(zip(metrics_mod.sample_slices(actual, batch), metrics_mod.sample_slices(expected, batch)))
            else:
                pairs.append((actual, expected))
        comparisons.append(compare_samples(name, pairs, tol))
    return comparisons


def _nested_equal(a: Any, b: Any, tol: Tolerance) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return compare_arrays("", a, b, tol).within_tolerance
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y, tol) for x, y in zip(a, b))
    return a is None and b is None


_rel_l2 = metrics_mod.relative_l2
_cosine = metrics_mod.cosine


def make_feeds(model: ir.Model, inputs: Any = None, dims: dict[str, int] | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Validation feeds: user-supplied (path, dict, or list of dicts) or generated from the signature."""
    if inputs is None:
        return [data_mod.generate_inputs(model, dims, seed)]
    if isinstance(inputs, dict):
        data_mod.check_feeds(inputs, model, where="inputs")
        return [inputs]
    if isinstance(inputs, list):
        return inputs
    return [data_mod.load_feeds(inputs, model)]


def _weight_bytes(model: Any) -> int:
    """Initializer bytes of an ir.Model (external ones included); 0 for anything else (paths are loaded as IR)."""
    return initializer_bytes(model) if isinstance(model, ir.Model) else 0


def _as_ir(model: Any) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from onnxpress.io import load

        return load(model)
    return ir.serde.deserialize_model(model)  # onnx.ModelProto


def validate(
    reference: Any,
    candidate: Any,
    *,
    inputs: Any = None,
    dims: dict[str, int] | None = None,
    tolerance: Tolerance | None = None,
    provider: str = "cpu",
    seed: int = 0,
    reference_outputs: list[dict[str, Any]] | None = None,
    data: str = "",
) -> ValidationReport:
    """Run both models on the same inputs in onnxruntime and compare every output.

    Models of ``LOW_MEMORY_BYTES`` or more run in ORT's low-memory mode (``runtime.session_options``): no graph
    optimizations, so the check is of the model's own arithmetic. A large in-memory ``ir.Model`` candidate is
    offloaded first: its initializers become lazy external tensors in a temporary folder that lives as long
    as the model (same values; save it with ``onnxpress.save``, which copies them file to file).
    """
    tolerance = tolerance or Tolerance()
    ref_ir = _as_ir(reference)
    feeds = make_feeds(ref_ir, inputs, dims, seed)
    # A large model is validated in low-memory mode: ORT computes from its memory map of the weights, and a
    # large in-memory candidate is first written to a temporary file (its tensors become lazy references to
    # it), so that neither Python nor a second ORT copy holds the weights while a session runs.
    low_memory = max(_weight_bytes(ref_ir), _weight_bytes(candidate)) >= LOW_MEMORY_BYTES
    if low_memory and isinstance(candidate, ir.Model) and runtime.in_memory_bytes(candidate) >= OFFLOAD_BYTES:
        candidate = runtime.offload_weights(candidate)
    del ref_ir
    if reference_outputs is None:
        # One session at a time: for a large model two live sessions would hold the weights twice.
        ref_session = runtime.make_session(reference, provider, low_memory=low_memory)
        output_names = [o.name for o in ref_session.get_outputs()]
        reference_outputs = [runtime.run(ref_session, f, output_names) for f in feeds]
        del ref_session
    cand_session = runtime.make_session(candidate, provider, low_memory=low_memory)
    output_names = list(reference_outputs[0])
    cand_names = {o.name for o in cand_session.get_outputs()}
    missing = [n for n in output_names if n not in cand_names]
    if missing:
        raise ValidationError(f"the rewritten model lacks outputs {', '.join(missing)}")
    actual = [runtime.run(cand_session, feed, output_names) for feed in feeds]
    if not data:
        data = "generated random inputs (no real data given)" if inputs is None else "the given inputs"
    comparisons = compare_runs(actual, reference_outputs, feeds, tolerance)
    shapes = {k: list(np.shape(v)) for k, v in feeds[0].items()}
    return ValidationReport(provider, tolerance, comparisons, shapes, samples=max(c.samples for c in comparisons) if comparisons else 0,
                            feeds=len(feeds), data=data, generated=inputs is None)
