"""What a budget search returns: the per-layer decisions, the configurations measured on the way, the
built model and its verdict. ``BudgetResult.to_dict`` is the JSON report; the tables and the plot are
``onnxpress.budget.report``'s (the methods below are shortcuts to it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.budget.spec import Budget


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

    # Shortcuts for the API (``result.plot(path)``, ``console.print(*result.renderables())``). The report
    # module is imported here, not at the top: it depends on this one (never the other way at import time)
    # and loads rich's tables and matplotlib only when a table or plot is asked for.
    def renderables(self) -> list[Any]:
        from onnxpress.budget.report import renderables

        return renderables(self)

    def table(self) -> Any:
        """The per-layer decisions as a rich Table."""
        from onnxpress.budget.report import layer_table

        return layer_table(self)

    def plot(self, path: str | os.PathLike) -> Path:
        from onnxpress.budget.report import plot

        return plot(self, Path(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
