"""What the ``prune`` pass prunes where: calibration waves, each layer's keep-mask and new weights, each
block's kept units, re-fitted rows, bias shifts and predicted error, and the report rows.

Reads the graph only through :mod:`structure`'s ``Layer``/``Block``; the writing is :mod:`rewrite`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.passes import quant_math as qm
from onnxpress.passes.graph_utils import const_array
from onnxpress.passes.prune.maths import (
    global_keep_masks,
    keep_mask,
    keep_units,
    mean_shift,
    nm_mask,
    refit_columns,
    refit_rows,
    removal_error,
    sparsegpt,
    unit_scores,
    wanda_scores,
    zero_fraction,
)
from onnxpress.passes.prune.options import PruneOptions
from onnxpress.passes.prune.structure import Block, Layer, unit_rows

Stats = dict[str, Any]  # one captured value's statistics (see calibration.input_stats)


# -- unstructured and N:M ------------------------------------------------------------------------------
def depth_waves(layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped by depth: a layer's wave comes after the waves of every selected layer its input
    depends on, so each wave can be calibrated on the outputs of the model pruned so far."""
    index = {id(layer.node): i for i, layer in enumerate(layers)}
    memo: dict[int, frozenset[int]] = {}

    def upstream(value: ir.Value | None) -> frozenset[int]:
        """Selected layers that ``value`` depends on (iterative DFS over producers)."""
        if value is None:
            return frozenset()
        found: set[int] = set()
        stack, seen = [value], set()
        while stack:
            v = stack.pop()
            prod = v.producer()
            if prod is None or id(prod) in seen:
                continue
            seen.add(id(prod))
            if id(prod) in memo:
                found |= memo[id(prod)]
                continue
            if id(prod) in index:
                found.add(index[id(prod)])
            stack.extend(i for i in prod.inputs if i is not None)
        return frozenset(found)

    level: dict[int, int] = {}
    for i, layer in enumerate(layers):  # graph order: producers come first
        ups = upstream(layer.x)
        memo[id(layer.node)] = ups | {i}
        level[i] = 1 + max((level[u] for u in ups if u in level), default=-1)
    waves: dict[int, list[Layer]] = {}
    for i, layer in enumerate(layers):
        waves.setdefault(level[i], []).append(layer)
    return [waves[k] for k in sorted(waves)]


def channel_norms(layer: Layer, st: Stats) -> np.ndarray:
    """Sum of squares of each row k of the [K, N] weight's input (Conv: the channel's, for every kernel tap)."""
    sq = np.asarray(st["sq"], np.float64)
    if layer.kind == "Conv":
        taps = int(np.prod(layer.array.shape[2:]))
        return np.repeat(sq, taps)
    return sq


def layer_keep_masks(o: PruneOptions, layers: list[Layer], mats: list[np.ndarray], stats: dict[str, Stats]) -> list[np.ndarray]:
    """The keep-mask of every layer's [K, N] matrix ``mats``: scores |w| or Wanda's (calibrated), compared
    within each output, each layer or all layers together, or kept N:M."""
    scores = []
    for layer, mat in zip(layers, mats):
        st = stats.get(layer.x.name)
        scores.append(wanda_scores(mat, channel_norms(layer, st)) if st is not None else np.abs(mat))
    if o.method == "nm":
        return [nm_mask(s, o.n, o.m) for s in scores]
    if o.scope == "global":
        return global_keep_masks(scores, o.sparsity)
    return [keep_mask(s, o.sparsity, per_output=o.scope == "output") for s in scores]


def pruned_weight(o: PruneOptions, layer: Layer, mat: np.ndarray, mask: np.ndarray, st: Stats | None) -> np.ndarray:
    """The layer's new [K, N] matrix: ``mat`` masked, or (update) re-fitted on the mask or by SparseGPT."""
    if not (o.update and layer.kind != "Conv"):
        return np.where(mask, mat, 0.0)
    if o.solver == "refit":
        return np.where(mask, refit_columns(mat, st["gram"], mask & (mat != 0), o.damping), 0.0)
    # SparseGPT chooses the mask during the update, except for layer/global comparison groups
    fixed = mask if (o.method == "magnitude" and o.scope != "output") else None
    new, _ = sparsegpt(mat, st["gram"], o.sparsity, n=o.n if o.method == "nm" else 0, m=o.m, mask=fixed, damping=o.damping)
    return new


def layer_row(layer: Layer, before: np.ndarray, after: np.ndarray, st: Stats | None) -> dict[str, Any]:
    """The report row of a pruned layer: shape, sparsity before/after, relative weight and output errors."""
    k, n = before.shape
    diff = after - before
    norm = float(np.linalg.norm(before))
    row: dict[str, Any] = {
        "layer": layer.label, "op": layer.kind, "K": k, "N": n,
        "sparsity_before": round(zero_fraction(before), 6), "sparsity_after": round(zero_fraction(after), 6),
        "params": int(before.size), "nonzeros_after": int(np.count_nonzero(after)),
        "weight_error": round(float(np.linalg.norm(diff)) / norm, 6) if norm else 0.0,
    }
    if st is not None and "gram" in st:
        row["output_error"] = round(qm.relative_output_error(before, after, st["gram"]), 6)
    return row


# -- structured ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class BlockPlan:
    """What shrinking one block does: the units kept, the terminals' new rows and bias shifts, its report row."""

    keep: np.ndarray  # sorted indices of the kept units
    w2_new: list[np.ndarray] | None  # re-fitted rows of the (single) terminal's weight, or None: sliced
    shifts: list[np.ndarray] | None  # bias shift per terminal, or None
    row: dict[str, Any]


def plan_block(o: PruneOptions, b: Block, remove: int, st: Stats | None) -> BlockPlan:
    """Remove the ``remove`` least important units of ``b``; with statistics ``st`` (calibrated) the
    removed units' mean moves into the next bias, or (update, one MLP terminal) its rows are re-fitted."""
    out_rows = [unit_rows(t.op_type, w2, trans, "out") for t, (w2, trans) in zip(b.terminals, b.w2s)]
    keep = keep_units(_block_unit_scores(b, out_rows, st), remove)
    removed = np.setdiff1d(np.arange(b.units), keep)
    w2_new: list[np.ndarray] | None = None
    shifts: list[np.ndarray] | None = None
    row: dict[str, Any] = {
        "layer": b.label, "op": b.start.op_type, "next": ", ".join(t.name or t.op_type for t in b.terminals),
        "units_before": b.units, "units_after": int(len(keep)),
        "params_before": int(b.w1.size + sum(w.size for w, _ in b.w2s)),
    }
    if st is not None:
        if o.update and not b.conv and len(b.terminals) == 1:
            cov = st["gram"] - np.outer(st["mean"], st["mean"])
            refit, delta = refit_rows(out_rows[0], keep, cov, st["mean"], o.damping)
            w2_new, shifts = [refit], [delta]
        else:  # each next layer takes the removed units' mean contribution into its bias
            shifts = [terminal_mean_shift(t, rows, removed, st["mean"]) for t, rows in zip(b.terminals, out_rows)]
        row["output_error"] = round(removal_error(st, out_rows[0], keep, removed, None if w2_new is None else w2_new[0]), 6)
    row["params_after"] = int(len(keep) * (b.w1.size // b.units) + sum((w.size // b.units) * len(keep) for w, _ in b.w2s))
    return BlockPlan(keep, w2_new, shifts, row)


def _block_unit_scores(b: Block, out_rows: list[np.ndarray], st: Stats | None) -> np.ndarray:
    """Each unit's importance: ||W1 unit|| (through any BatchNorm scale) or its activation spread, times the
    norm of its rows in all terminals."""
    out_norms = np.sqrt(sum(np.sum(r.astype(np.float64) ** 2, axis=1) for r in out_rows))
    if st is not None:
        return unit_scores(None, out_norms, np.sqrt(st["var"]))
    in_norms = np.linalg.norm(unit_rows(b.start.op_type, b.w1, b.trans1, "in").astype(np.float64), axis=1)
    for node in b.region:
        if node.op_type == "BatchNormalization":
            scale, var = const_array(node.inputs[1]), const_array(node.inputs[4])
            eps = node.attributes.get_float("epsilon", 1e-5)
            in_norms = in_norms * np.abs(scale) / np.sqrt(var + eps)
    return unit_scores(in_norms, out_norms)


def terminal_mean_shift(t: ir.Node, rows: np.ndarray, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The bias shift of next layer ``t`` ([D], Conv: [C2]; at Conv borders with padding it is approximate)."""
    if t.op_type != "Conv":
        return mean_shift(rows, removed, mean)
    c2 = const_array(t.inputs[1]).shape[0]
    return mean_shift(rows.reshape(rows.shape[0], c2, -1).sum(axis=2), removed, mean)
