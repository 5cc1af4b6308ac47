"""The budget text: ``metric op value`` (``cos>=0.99``, ``accuracy_drop<=1%``), the output metrics a budget
can name, and where the search aims after a built model misses it (``Budget.aimed``)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from onnxpress.errors import UsageError
from onnxpress.metrics import KEYS as METRIC_KEYS

# output metrics a budget can name (per-sample statistics, ``onnxpress.metrics``): cos = mean per-sample cosine
OUTPUT_METRICS = {key: direction for key, (_, _, direction) in METRIC_KEYS.items()}

_BUDGET_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*$")


# a held-out mean meets a budget only when it clears it by this many standard errors (one-sided 95%)
CONFIDENCE_Z = 1.645


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

    def ok_with_confidence(self, measured: float, standard_error: float = 0.0) -> bool:
        """``ok`` for a mean over few samples: the mean must clear the budget by ``CONFIDENCE_Z`` standard errors
        (one-sided 95%), so a verdict on 8 held-out samples cannot rest on 8 easy ones."""
        shift = CONFIDENCE_Z * max(float(standard_error), 0.0) if math.isfinite(standard_error) else 0.0
        return self.ok(measured - shift if self.op == ">=" else measured + shift)

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

    def aimed(self, builds: Sequence[tuple[float, float]], margin: float = 1.2) -> Budget:
        """The fit-set target for the next search after builds that missed this budget: ``builds`` lists, for every
        build so far, (the value the search expected: simulated on the fit data, the built model's held-out value).

        The gap between the two is systematic (the passes fit the calibration data, and the built model computes
        slightly differently from the simulation), so the target is set from this budget, never moved from the
        last target (moving it compounded: SmolLM2's second back-off aimed at 0.1% for a 3% budget). Where the
        metric has an ideal value, the held-out distance to it is modelled as ``a + b * fit distance``: through the
        last two builds, or through the origin from the last one; the target is the fit distance whose held-out
        distance is this budget's divided by ``margin`` (a line that does not rise falls back to the largest
        held-out/fit ratio seen). Without an ideal value the target moves by 1.5x the largest gap."""
        pairs = [(e, m) for e, m in builds if math.isfinite(e) and math.isfinite(m)]
        ideal = self.ideal
        if ideal is not None and pairs:
            dist = [(abs(ideal - e), abs(ideal - m)) for e, m in pairs]
            ratios = [r / f for f, r in dist if f > 0 and r > f]
            wanted = abs(ideal - self.value) / margin
            fit = None
            if len(dist) >= 2 and dist[-1][0] != dist[-2][0]:
                (f1, r1), (f2, r2) = dist[-2], dist[-1]
                slope = (r2 - r1) / (f2 - f1)
                if slope > 0:
                    fit = (wanted - (r2 - slope * f2)) / slope
            if (fit is None or fit <= 0) and ratios:
                fit = wanted / max(ratios)
            if fit is not None and fit > 0:
                return dataclasses.replace(self, value=ideal - fit if self.op == ">=" else ideal + fit)
        gaps = [abs(m - e) for e, m in pairs if not math.isclose(m, e)] or [abs(self.value - m) for _, m in pairs] or [0.0]
        return self.tightened(1.5 * max(gaps) + 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"
