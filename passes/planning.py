"""The planning interface of lossy passes: what the budget search (``onnxpress.budget``) may ask a pass.

A lossy pass joins the budget search by naming a *planner* class as its class attribute ``planner``; the
search makes one instance per search (so an instance may cache per-layer work, e.g. a spectrum shared by
several options) and calls only the methods of :class:`Planner`. The search never imports a pass's maths or rewrite code: it asks
planners which layers they can rewrite and how (``options``: short strings the planner defines, e.g.
``int8``, ``int4/32``, ``split/32/128`` for qdq and ``lowrank/0.3`` for factorize), what each option stores
(exact bytes, the layout the pass writes), what the rewritten layer computes (a dense float
*reconstruction* that, fed to the original graph, reproduces the rewritten model up to float rounding), and
which pass instances realise a set of decisions.

Two kinds of planner:

- a **storage** planner (qdq) stores a weight in a new format. It also offers the matrix-level functions
  ``matrix_bytes`` and ``reconstruct_matrix`` so that a structural planner can store its products with it;
- a **structural** planner (factorize) replaces one weight by new weights (``U``, ``V``): its ``stored_bytes``
  and ``reconstruct`` take the storage planner and the storage option applied to those products
  (``then=``), and ``products`` names the nodes the storage pass must then select.

The interface is deliberately small; everything else (which option to pick where, how errors add up)
is the search's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from onnxpress.passes.calib_stats import InputStats

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class LayerView:
    """One rewritable node as planners see it. ``w`` is the weight as the node stores it (Gemm transB: N x K)."""

    index: int  # position in graph order
    name: str  # node name (pass options select layers by it)
    op: str  # MatMul, Gemm, Conv, Gather
    weight: str  # initializer name
    w: np.ndarray
    trans_b: bool = False  # Gemm transB=1: stored N x K
    x: str | None = None  # activation input name (MatMul/Gemm)
    has_bias: bool = False
    hot: np.ndarray | None = None  # Gather: the rows the calibration data indexes (split options)

    @property
    def matrix(self) -> np.ndarray:
        """MatMul layout [K, N] (input features x output features)."""
        return self.w.T if self.trans_b else self.w

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def fp32_bytes(self) -> int:
        return int(self.w.size * 4)


@dataclasses.dataclass
class Applicable:
    """What a planner can do on a model: the layers it may rewrite with their options, and why not elsewhere."""

    layers: dict[int, LayerView]  # node index -> view
    options: dict[int, list[str]]  # node index -> the options worth measuring there (cheapest-first)
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)  # node index -> reason it is not rewritten
    skipped_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # report rows of nodes without a view


@runtime_checkable
class Planner(Protocol):
    """The methods the budget search calls on a lossy pass's planner (see the module docstring)."""

    technique: str  # short family name for reports and plots ("quant", "lowrank")
    structural: bool  # True: rewrites a layer into new layers that a storage planner may then store

    def parse(self, option: str) -> Any:
        """The option text parsed (ValueError with the valid forms for text the planner does not know)."""

    def applicable(self, model: ir.Model, options: Sequence[str], calibration: Sequence[Feed] | None = None) -> Applicable:
        """The layers of ``model`` this pass would rewrite with each of ``options`` (invalid option text:
        ValueError), with the reason for every node it refuses."""

    def stored_bytes(self, layer: LayerView, option: str, then: tuple[Any, str] | None = None) -> int:
        """Exact bytes ``layer``'s rewritten weight(s) take in the saved model (structural: products stored by
        ``then = (storage planner, its option)``, or as float when None)."""

    def reconstruct(self, layer: LayerView, option: str, stats: InputStats | None,
                    then: tuple[Any, str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(dense float weight in the node's layout, output-bias delta or None) that the rewritten layer
        computes with. ``stats``: the layer input's calibration statistics (None: the pass's uncalibrated form)."""

    def predicted_error(self, layer: LayerView, option: str, stats: InputStats) -> float | None:
        """A cheap estimate of the layer's relative output error (squared) without reconstructing, or None."""

    def passes(self, model: ir.Model, option: str, names: Sequence[str]) -> list[Any]:
        """Pass instances (not yet run) that rewrite exactly the layers ``names`` (node names in ``model``) with
        ``option``. ``model`` is the working model the passes will run on (earlier decisions applied)."""

    def rewritten(self, done: Any) -> set[str]:
        """The node names a pass instance from :meth:`passes` rewrote (checked against the plan after it ran)."""

    # Optional (the search uses them when present):
    # - ``heldout_check(model, layer, option, feeds) -> dict | None``: for an option fitted to the calibration data
    #   beyond its statistics (qdq's embedding split keeps the rows it saw at 4 bits), how it holds on ``feeds``:
    #   a report row with ``misfit`` (the share of held-out uses the fit did not cover) and ``what`` (its text);
    #   None for options that do not depend on the data that way. The search drops such options when the
    #   held-out verdict fails with them in the build.
    # - ``describe(layer, option) -> dict``: extra report fields of a decision (factorize: the rank).


@runtime_checkable
class StoragePlanner(Planner, Protocol):
    """A planner that stores weights; its matrix functions let a structural planner store its products."""

    def matrix_bytes(self, shape: tuple[int, int], option: str) -> int:
        """Bytes of a MatMul-layout weight ``[K, N]`` stored with ``option``."""

    def reconstruct_matrix(self, w: np.ndarray, option: str, hessian: np.ndarray | None) -> np.ndarray:
        """dequant(quant(W)) of a MatMul-layout ``W [K, N]`` as the pass computes it (``hessian``: the input's
        ``X^T X / n`` where the pass uses calibration, e.g. GPTQ)."""


@runtime_checkable
class StructuralPlanner(Planner, Protocol):
    """A planner that replaces one weight by several."""

    def products(self, name: str) -> list[str]:
        """The node names that hold the products of rewriting node ``name`` (what a storage pass then selects)."""
