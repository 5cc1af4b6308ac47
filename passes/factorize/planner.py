"""How the budget search plans ``factorize``: the structural planner of ``onnxpress.passes.planning``.

One option family, ``lowrank/R``: calibrated factorization (``factorize(ratio=R, calibrated=true)``) keeping
the ratio R (0 < R < 1) of a layer's parameters, with the pass's defaults for everything else (centring with
a bias correction, damping, minimum size). Its products ``<name>/factorize_U`` (K x r) and
``<name>/factorize_V`` (r x N) are MatMul/Gemm weights a storage planner (qdq) may then store: ``then=``.

Everything here is computed with the pass's own functions (``maths``, ``targets.classify``), so the bytes
and reconstructions are those of the rewritten model, and the search never plans a rewrite the pass refuses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes.calib_stats import InputStats, damped
from onnxpress.passes.factorize.maths import (
    Spectrum,
    bias_correction,
    centered,
    direction_energies,
    factors,
    output_energy,
    rank_for_ratio,
    spectrum,
)
from onnxpress.passes.factorize.options import FactorizeOptions
from onnxpress.passes.factorize.pass_ import Factorize
from onnxpress.passes.factorize.targets import MARK, classify
from onnxpress.passes.graph_utils import existing_bias, node_label
from onnxpress.passes.planning import Applicable, Feed, LayerView

OPTION_PREFIX = "lowrank/"
# the planned passes run with factorize's defaults for everything but ratio and calibrated
FACTORIZE_MIN_SIZE = FactorizeOptions().min_size
FACTORIZE_DAMPING = FactorizeOptions().damping
FACTORIZE_CENTER = FactorizeOptions().center
_OPS = ("MatMul", "Gemm")


def parse_option(text: str) -> float:
    """The ratio R of ``lowrank/R`` (0 < R < 1); ValueError for any other text."""
    value = text[len(OPTION_PREFIX) :] if isinstance(text, str) and text.startswith(OPTION_PREFIX) else ""
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not 0.0 < ratio < 1.0:  # also NaN and an empty or malformed R
        raise ValueError(f"unknown factorize option '{text}' (valid: lowrank/R with 0 < R < 1, e.g. lowrank/0.3)")
    return ratio


def saves_parameters(k: int, n: int, ratio: float) -> bool:
    """Whether factorizing a K x N weight at ``ratio`` stores fewer parameters (else the pass skips it)."""
    return rank_for_ratio(k, n, ratio) * (k + n) < k * n


def substring_selectors(intended: Sequence[str], universe: Sequence[str], done: Iterable[str] = ()) -> list[tuple[list[str], list[str]]]:
    """(include, exclude) pairs for options that select by substring (``factorize``) such that each pair
    selects exactly its include names among ``universe`` minus ``done`` (names already handled), and the
    pairs together cover ``intended``. One pair unless a name is a substring of another one that must be
    excluded and that itself contains... (then the names are split across pairs)."""
    done = set(done)
    todo = list(intended)
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


@dataclasses.dataclass
class LayerSpectrum:
    """A layer's calibrated spectrum (shared by every ratio) and what truncating it costs."""

    spectrum: Spectrum  # of the centred, damped input moment: the one the pass truncates
    energies: np.ndarray  # output error energy of each direction on the undamped centred moment
    output_energy: float  # tr(W^T S W), S the (uncentred) input second moment


@dataclasses.dataclass
class Spectra:
    """Per-layer calibrated spectra, keyed by layer name: one search uses one set of statistics per layer."""

    cache: dict[str, LayerSpectrum] = dataclasses.field(default_factory=dict)

    def of(self, layer: LayerView, stats: InputStats) -> LayerSpectrum:
        found = self.cache.get(layer.name)
        if found is None:
            w = layer.matrix
            error_moment = centered(stats.second_moment, stats.mean) if FACTORIZE_CENTER else np.asarray(stats.second_moment, np.float64)
            sp = spectrum(w, damped(error_moment, FACTORIZE_DAMPING))
            found = LayerSpectrum(sp, direction_energies(w, sp.q, error_moment), output_energy(w, stats.second_moment))
            self.cache[layer.name] = found
        return found


class FactorizePlanner:
    """The budget's view of ``factorize`` (``onnxpress.passes.planning.StructuralPlanner``)."""

    technique = "lowrank"
    structural = True

    def __init__(self) -> None:
        self.spectra = Spectra()
        self._alpha: dict[str, float] = {}  # Gemm alpha by layer name (from applicable): it scales the bias correction

    # -- which layers, which options ----------------------------------------------------------------------
    def _refusal(self, node: ir.Node) -> str | None:
        """Why ``node`` (a standard MatMul/Gemm) is not planned, or None."""
        if not node.name:
            return "unnamed node (pipeline options select layers by name)"
        found = classify(node, FACTORIZE_MIN_SIZE)
        if isinstance(found, str):
            return found or f"no constant float weight of at least {FACTORIZE_MIN_SIZE} parameters"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA=1"
        if not node.inputs[1].is_initializer():
            return "weight behind a Transpose or Constant (the search overrides initializers)"
        return None

    def _view(self, node: ir.Node, index: int) -> LayerView:
        weight = node.inputs[1]
        trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        w = np.asarray(weight.const_value.numpy(), np.float32)
        layer = LayerView(index, node.name, node.op_type, weight.name, w, trans_b=trans_b, x=node.inputs[0].name)
        # factorize folds its bias correction into an existing bias, else it adds one (stored bytes)
        layer.has_bias = existing_bias(node, layer.matrix.shape[1]) is not None
        return layer

    def parse(self, option: str) -> float:
        return parse_option(option)

    def applicable(self, model: ir.Model, options: Sequence[str], calibration: Sequence[Feed] | None = None) -> Applicable:
        """The MatMul/Gemm layers ``factorize`` rewrites, with the options (cheapest first) that save
        parameters there, and the reason for every other MatMul/Gemm in ``skipped`` (``skipped_rows`` stays
        empty: every refusal names its node). ``calibration`` is not needed: statistics come with ``reconstruct``."""
        ratios = {text: parse_option(text) for text in options}
        by_cost = sorted(ratios, key=lambda text: ratios[text])
        out = Applicable(layers={}, options={})
        for index, node in enumerate(model.graph):
            if node.op_type not in _OPS or node.domain not in ("", "ai.onnx") or MARK in node.metadata_props:
                continue  # MARK: a product of an earlier factorization
            reason = self._refusal(node)
            if reason is None:
                layer = self._view(node, index)
                k, n = layer.matrix.shape
                useful = [text for text in by_cost if saves_parameters(k, n, ratios[text])]
                if useful:
                    out.layers[index], out.options[index] = layer, useful
                    if node.op_type == "Gemm":
                        self._alpha[node.name] = node.attributes.get_float("alpha", 1.0)
                    continue
                reason = f"{k}x{n} weight: no option of {list(options)} saves parameters"
            out.skipped[index] = reason
        return out

    # -- bytes, reconstruction, error ---------------------------------------------------------------------
    def stored_bytes(self, layer: LayerView, option: str, then: tuple[Any, str] | None = None) -> int:
        """U [K x r] and V [r x N] (float32, or stored by ``then``'s storage planner), plus the float bias the
        bias correction adds unless it folds into the layer's existing bias."""
        k, n = layer.matrix.shape
        r = rank_for_ratio(k, n, parse_option(option))
        if then is None:
            factor_bytes = 4 * (k * r + r * n)
        else:
            storage, storage_option = then
            factor_bytes = storage.matrix_bytes((k, r), storage_option) + storage.matrix_bytes((r, n), storage_option)
        bias = 0 if (layer.has_bias or not FACTORIZE_CENTER) else 4 * n
        return int(factor_bytes + bias)

    def reconstruct(self, layer: LayerView, option: str, stats: InputStats | None,
                    then: tuple[Any, str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(U @ V in the node's layout, output bias delta) as the rewritten layer computes them; with ``then``
        the factors as the storage pass stores them (U sees x: hessian S; V sees x U: U^T S U)."""
        ratio = parse_option(option)
        if stats is None:
            raise ValueError("lowrank/R is a calibrated factorization: it needs the layer input statistics")
        scale = self._output_scale_of(layer)
        w = layer.matrix
        k, n = w.shape
        u, v = factors(w, self.spectra.of(layer, stats).spectrum, rank_for_ratio(k, n, ratio))
        delta = None
        if FACTORIZE_CENTER:
            delta = (scale * bias_correction(w, u, v, stats.mean)).astype(np.float32).reshape(-1)
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        if then is not None:
            # the storage pass runs after factorize: U sees x (second moment S), V sees x U (U^T S U)
            storage, storage_option = then
            h = np.asarray(stats.second_moment, np.float64)
            hv = u32.astype(np.float64).T @ h @ u32.astype(np.float64)
            u32 = storage.reconstruct_matrix(u32, storage_option, h)
            v32 = storage.reconstruct_matrix(v32, storage_option, hv)
        out = np.asarray(np.asarray(u32, np.float64) @ np.asarray(v32, np.float64), np.float32)
        return (np.ascontiguousarray(out.T) if layer.trans_b else out), delta

    def _output_scale_of(self, layer: LayerView) -> float:
        """What a shift of ``layer``'s product is multiplied by in its output: a Gemm's alpha (1 for MatMul)."""
        if layer.op != "Gemm":
            return 1.0
        if layer.name not in self._alpha:
            raise ValueError(f"Gemm '{layer.name}' was not among this planner's applicable layers (its alpha is unknown)")
        return self._alpha[layer.name]

    def predicted_error(self, layer: LayerView, option: str, stats: InputStats) -> float | None:
        """The squared relative output error of the float factors with their bias correction,
        tr(D^T C D) / tr(W^T S W) (C the input covariance): exact, from the discarded directions' energies."""
        k, n = layer.matrix.shape
        ls = self.spectra.of(layer, stats)
        return float(np.sum(ls.energies[rank_for_ratio(k, n, parse_option(option)) :])) / max(ls.output_energy, 1e-30)

    # -- realising decisions ------------------------------------------------------------------------------
    def passes(self, model: ir.Model, option: str, names: Sequence[str]) -> list[Factorize]:
        """``factorize(ratio=R, calibrated=true, include=..., exclude=...)`` instances that, run in order on
        ``model``, rewrite exactly ``names`` (several when one name is a substring of another)."""
        ratio = parse_option(option)
        universe = [node_label(node, i) for i, node in enumerate(model.graph) if node.op_type in _OPS and MARK not in node.metadata_props]
        out: list[Factorize] = []
        for include, exclude in substring_selectors(list(names), universe):
            kwargs: dict[str, Any] = {"ratio": ratio, "calibrated": True, "include": tuple(include)}
            if exclude:
                kwargs["exclude"] = tuple(exclude)
            out.append(Factorize(**kwargs))
        return out

    def rewritten(self, done: Any) -> set[str]:
        """The layers a pass from :meth:`passes` factorized (from its report)."""
        return {row["layer"] for row in done.details if "skipped" not in row}

    def products(self, name: str) -> list[str]:
        return [f"{name}/factorize_U", f"{name}/factorize_V"]

    def describe(self, layer: LayerView, option: str) -> dict[str, Any]:
        """Report fields of ``option`` on ``layer``: the rank of its factors."""
        k, n = layer.matrix.shape
        return {"rank": rank_for_ratio(k, n, parse_option(option))}
