"""The budget's layers and their candidates, asked of the lossy passes' planners (``onnxpress.passes.planning``).

A *layer* is one node with a constant float weight that the storage planner (qdq) can rewrite: MatMul,
Gemm, Conv, and Gather of an embedding table. A *choice* is what the search may do to it: a storage option
alone (``int8``, ``int4/B``, an embedding table's ``split/H/C``), or a structural option (``lowrank/R``:
factorize) whose products are then stored with a storage option. For every choice the planners give

- the bytes the rewritten weight takes in the saved model (the layout the passes write), and
- the *reconstruction*: the dense float weight the rewritten layer computes with (``U @ V``,
  ``dequant(quant(W))``), plus the output bias a calibrated factorization adds.

Feeding the reconstruction to the original graph reproduces the rewritten model's output up to float
rounding, which is what makes the sensitivity analysis cheap (``onnxpress.budget.simulate``). Nothing here
knows a pass's maths: a new lossy pass joins the search by giving its class a ``planner``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes.calib_stats import InputStats
from onnxpress.passes.planning import LayerView

# the storage options of the default grid ("int4/B": blocks of B); the planner offers a block size on a layer
# only where it stores fewer bytes than the smaller ones (K = 384 pads blocks of 256 to 512: more bytes, more error)
QUANTS = ("int8", "int4/32", "int4/128", "int4/256", "int4/512")
RATIOS = (0.5, 0.3, 0.2, 0.1, 0.05)  # calibrated factorization ratios of the default grid
FACTOR_QUANTS = ("int8", "int4/32")  # how the factors of a factorized layer are stored
# embedding tables: rows the calibration data indexes at int4/H, all others 2-bit/C ("split/H/C")
SPLITS = ("split/32/128", "split/64/128", "split/128/128")


# =====================================================================================================
# Planners
# =====================================================================================================
@dataclasses.dataclass
class Planners:
    """The planner instances of one search: one storage planner, and a structural one (or None)."""

    storage: Any
    structural: Any | None

    @classmethod
    def registered(cls) -> Planners:
        """One fresh instance of the planner of every registered pass that declares one."""
        from onnxpress import registry

        found = [p.planner() for p in registry.registry().values() if getattr(p, "planner", None) is not None]
        storage = [p for p in found if not p.structural]
        structural = [p for p in found if p.structural]
        if len(storage) != 1 or len(structural) > 1:
            raise RuntimeError(f"the budget search combines one storage and at most one structural planner, found "
                               f"{[type(p).__name__ for p in storage]} and {[type(p).__name__ for p in structural]}")
        return cls(storage[0], structural[0] if structural else None)


# =====================================================================================================
# Choices
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class Choice:
    """What is done to one layer: a structural option (None: none), then a storage option (None: float)."""

    structure: str | None = None
    storage: str | None = None

    @property
    def label(self) -> str:
        """``lowrank 0.3 + int4/32``: the text in reports and the sensitivity cache's key."""
        parts = []
        if self.structure is not None:
            parts.append(self.structure.replace("/", " ", 1))
        if self.storage is not None:
            parts.append(self.storage)
        return " + ".join(parts) or "fp32"

    @property
    def technique(self) -> str:
        """A coarse family for colours in the plot."""
        if self.structure is None:
            return self.storage or "fp32"
        family = self.structure.split("/")[0]
        return f"{family}+{self.storage.split('/')[0]}" if self.storage else family


FP32 = Choice()


@dataclasses.dataclass(frozen=True)
class Grid:
    """The candidates tried per layer (each applied alone in the sensitivity analysis)."""

    quants: tuple[str, ...] = QUANTS
    splits: tuple[str, ...] = SPLITS  # embedding tables only, where calibration data shows which rows are used
    ratios: tuple[float, ...] = RATIOS
    factor_quants: tuple[str, ...] = FACTOR_QUANTS
    factorize_float: bool = False  # also try factorization without quantizing the factors
    # a layer's smaller ratios are not tried once a ratio's error alone (d) exceeds this: such a layer is
    # already past what any useful budget allows, and each candidate costs a model run
    max_layer_error: float = 0.03

    def __post_init__(self) -> None:
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"factorization ratio {r} must be in (0, 1)")
        planners = Planners.registered()  # unknown option text fails here, with the valid forms
        for option in (*self.storage_options, *self.factor_quants):
            planners.storage.parse(option)
        if planners.structural is not None:
            for option in self.structural_options:
                planners.structural.parse(option)

    @property
    def storage_options(self) -> tuple[str, ...]:
        return (*self.quants, *self.splits)

    @property
    def structural_options(self) -> tuple[str, ...]:
        return tuple(f"lowrank/{r:g}" for r in self.ratios)


# =====================================================================================================
# Layers
# =====================================================================================================
@dataclasses.dataclass
class Layer(LayerView):
    """One rewritable node with the search's candidates for it."""

    choices: list[Choice] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # technique -> reason


def find_layers(model: ir.Model, grid: Grid, planners: Planners,
                calibration: Sequence[dict[str, np.ndarray]] | None = None) -> tuple[list[Layer], list[dict[str, Any]]]:
    """The layers of ``model`` with the choices of ``grid`` that the planners accept for each.

    The storage planner decides which nodes are layers (and which storage options apply; with
    ``calibration``, embedding tables also get split options); the structural planner adds its options
    where it can rewrite the node, each followed by every factor storage option the layer accepts.
    Returns (layers, report rows of the nodes no planner takes)."""
    storage = planners.storage.applicable(model, grid.storage_options, calibration)
    structural = None
    if planners.structural is not None and grid.ratios:
        structural = planners.structural.applicable(model, grid.structural_options, calibration)
    layers: list[Layer] = []
    for index, view in sorted(storage.layers.items()):
        layer = Layer(**{f.name: getattr(view, f.name) for f in dataclasses.fields(LayerView)})
        layer.choices = [Choice(None, q) for q in storage.options[index]]
        # the storage planner says "family: reason" for an option family it refuses on a layer it takes
        family, _, reason = storage.skipped.get(index, "").partition(": ")
        if reason:
            layer.skipped[family] = reason
        if structural is not None:
            _add_structural(layer, index, grid, structural, planners.structural.technique)
        layers.append(layer)
    return layers, list(storage.skipped_rows)


def _add_structural(layer: Layer, index: int, grid: Grid, structural: Any, technique: str) -> None:
    """The structural options of one layer, least compressing first, each with the factor storages the
    layer accepts (a storage family the planner refused on the layer is refused on its factors too)."""
    if index not in structural.options:
        if layer.op in ("MatMul", "Gemm"):
            layer.skipped[technique] = structural.skipped.get(index, "not accepted")
        return
    for option in reversed(structural.options[index]):
        if grid.factorize_float:
            layer.choices.append(Choice(option, None))
        for q in grid.factor_quants:
            if q.split("/")[0] not in layer.skipped:
                layer.choices.append(Choice(option, q))


# =====================================================================================================
# Bytes, reconstructions and errors of a choice, from the planners
# =====================================================================================================
def choice_bytes(planners: Planners, layer: Layer, choice: Choice) -> int:
    """Exact bytes of ``layer``'s weight(s) after ``choice`` in the saved model."""
    if choice == FP32:
        return layer.fp32_bytes
    if choice.structure is not None:
        then = (planners.storage, choice.storage) if choice.storage is not None else None
        return int(planners.structural.stored_bytes(layer, choice.structure, then=then))
    return int(planners.storage.stored_bytes(layer, choice.storage))


def reconstruct(planners: Planners, layer: Layer, choice: Choice, stats: InputStats | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight in the node's layout, output bias delta or None) of ``layer`` rewritten by ``choice``."""
    if choice == FP32:
        return layer.w, None
    if choice.structure is not None:
        then = (planners.storage, choice.storage) if choice.storage is not None else None
        return planners.structural.reconstruct(layer, choice.structure, stats, then=then)
    return planners.storage.reconstruct(layer, choice.storage, stats)


@dataclasses.dataclass
class Recon:
    """A choice's reconstruction as the search keeps it: ``stored`` is the storage planner's compact form where it
    has one (``reconstruct_compact``: qdq keeps the codes, a quarter of the float32 weight; SmolLM2's 450
    candidates as float32 copies grew the search by ~1.3 GB), else the float weight; ``delta`` the output-bias
    delta or None."""

    stored: Any
    delta: np.ndarray | None = None

    def weight(self) -> np.ndarray:
        """The dense float weight in the node's layout (dequantized on each call from a compact form)."""
        return self.stored.dense() if hasattr(self.stored, "dense") else self.stored

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes) + (0 if self.delta is None else int(self.delta.nbytes))


def reconstruct_kept(planners: Planners, layer: Layer, choice: Choice, stats: InputStats | None) -> Recon:
    """``reconstruct`` in the form the search keeps (``Recon``): compact where the storage planner offers it."""
    compact_of = getattr(planners.storage, "reconstruct_compact", None)
    if choice.structure is None and choice.storage is not None and compact_of is not None:
        compact = compact_of(layer, choice.storage, stats)
        if compact is not None:
            return Recon(compact)
    return Recon(*reconstruct(planners, layer, choice, stats))


def weight_energy(layer: Layer, stats: InputStats) -> float:
    """tr(W^T S W): the layer's output energy on its input's second moment ``S`` (``local_error``'s denominator)."""
    w = layer.matrix.astype(np.float64)
    return float(np.einsum("kn,kn->", w, np.asarray(stats.second_moment, np.float64) @ w))


def local_error(layer: Layer, weight: np.ndarray, stats: InputStats, energy: float | None = None) -> float:
    """The layer's own relative output error of a reconstruction, squared: tr(D^T S D) / tr(W^T S W), D = W' - W
    (``weight`` in the node's layout, S the input's second moment; ``energy``: the denominator, ``weight_energy``,
    when already known). Cheap (no model run): the sensitivity analysis scales it into a prediction of the
    model-output error."""
    energy = weight_energy(layer, stats) if energy is None else energy
    d = (weight.T if layer.trans_b else weight).astype(np.float64) - layer.matrix
    s = np.asarray(stats.second_moment, np.float64)
    return float(np.einsum("kn,kn->", d, s @ d)) / energy if energy > 0 else 0.0
