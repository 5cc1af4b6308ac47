"""The ``factorize`` pass: low-rank factorization of MatMul/Gemm (and, on request, Conv) weights.

It selects the layers (``targets``), measures the calibration statistics of calibrated mode, picks ranks
and factors (``maths``) with layers in parallel, and rewrites the graph (``rewrite``).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.pass_infra import Pass
from onnxpress.passes import quant_math as qm
from onnxpress.passes.calib_stats import blas_threads, check_calibration, damped, input_stats
from onnxpress.passes.factorize.maths import (
    Spectrum,
    allocate_global,
    bias_correction,
    centered,
    conv_factors,
    conv_matrix,
    factors,
    output_error,
    rank_for_energy,
    rank_for_error,
    rank_for_ratio,
    spectrum,
    weight_errors,
)
from onnxpress.passes.factorize.options import FactorizeOptions
from onnxpress.passes.factorize.rewrite import rewrite_conv, rewrite_linear
from onnxpress.passes.factorize.targets import MARK, Group, Target, classify, classify_conv, group_targets
from onnxpress.passes.graph_utils import node_label


def _factorized_group(g: Group, w: np.ndarray, sp: Spectrum, rank: int | None, second_moment: np.ndarray | None, mean: np.ndarray | None) -> tuple[dict[str, Any], Any, Any, Any]:
    """The report row, factors (float32) and bias correction (or None) of one group; a skip row and Nones."""
    k, n = w.shape
    base = {"layer": g.label, "op": g.op, "K": k, "N": n}
    if rank is None or min(rank, len(sp.s)) * (k + n) >= k * n:
        reason = "the chosen rank saves no parameters" if rank is not None else "kept dense by the global allocation"
        return {**base, "rank": rank, "skipped": reason}, None, None, None
    u, v = factors(w, sp, rank)
    spec, fro = weight_errors(w, u, v)
    row: dict[str, Any] = {
        **base, "rank": int(u.shape[1]), "params_before": k * n, "params_after": int(u.size + v.size),
        "spectral_error": round(spec, 6), "frobenius_error": round(fro, 6),
    }
    delta = None
    if second_moment is not None:
        if mean is not None:
            delta = bias_correction(w, u, v, mean)
            row["output_error"] = round(qm.relative_output_error(w, u @ v, second_moment, centered(second_moment, mean)), 6)
        else:
            row["output_error"] = round(output_error(w, u, v, second_moment), 6)
    return row, u.astype(np.float32), v.astype(np.float32), None if delta is None else delta.astype(np.float32).reshape(-1)


def _parallel(fn, count: int) -> list:
    """[fn(0), ..., fn(count-1)] on a thread pool: numpy's LAPACK/BLAS calls release the GIL."""
    workers = min(count, os.cpu_count() or 1)
    if workers <= 1:
        return [fn(i) for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


class Factorize(Pass):
    """``factorize``: low-rank factorization of MatMul/Gemm weights, W (K x N) -> U (K x r) @ V (r x N).

    Rewrites ``MatMul(x, W)`` into ``MatMul(MatMul(x, U), V)`` and ``Gemm(A, B, C)`` into
    ``Gemm(Gemm(A, U), V, C)`` (transA, transB, alpha and beta kept; the bias stays on the second product).
    With ``share=true`` layers that read the same input (attention Q, K, V) are factorized together and
    share one U: ``x -> MatMul(x, U) -> MatMul(., V_q), MatMul(., V_k), MatMul(., V_v)``.
    Applies to a 2-D float weight held in an initializer or a Constant, also behind a Transpose, of at least
    ``min_size`` parameters, not shared with other nodes, where the chosen rank saves parameters
    (r * (K + N) < K * N). Weights behind DequantizeLinear are skipped: run ``factorize`` before ``qdq``,
    which then quantizes U and V. Both products carry the node metadata ``onnxpress.factorize`` so a
    second run leaves them alone.

    The rank comes from exactly one budget: ``rank``, ``ratio`` (of each layer's parameters, or of all
    layers with ``allocation=global``), ``energy`` or ``error``. ``calibrated=true`` uses the layer's
    input second moment from the calibration data (one run over it), so the truncation minimises the
    output error, and ``energy``/``error`` measure the output. Lossy: each layer (group) reports K, N, r,
    parameters before/after, the relative spectral and Frobenius weight error and (calibrated) the
    relative output error on the calibration data. Full rank is exact up to float rounding.
    """

    name = "factorize"
    Options = FactorizeOptions
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = self._convs(model) if self.options.conv else False
        return ir.passes.PassResult(model, self._linear(model) or modified)

    def _linear(self, model: ir.Model) -> bool:
        o = self.options
        targets = self._targets(model)
        if not targets:
            return False
        groups = group_targets(targets, o.share)
        # layers run in parallel, one BLAS thread each (no oversubscription; measured on 2 cores beside other
        # work: 2 threads per call took 40-50 s for MiniLM, one thread per call and layers in parallel 2-9 s)
        with blas_threads(1):
            moments = self._moments(model, groups) if o.calibrated else {}
            stats = [moments.get(g.key) for g in groups]
            means = [s[1] if (s is not None and o.center) else None for s in stats]
            seconds = [None if s is None else (centered(*s) if o.center else s[0]) for s in stats]
            full = [None if s is None else s[0] for s in stats]
            weights = [g.w for g in groups]

            def spec(i: int) -> Spectrum:
                return spectrum(weights[i], damped(seconds[i], o.damping) if seconds[i] is not None else None)

            spectra = _parallel(spec, len(groups))
            ranks = self._ranks(weights, spectra)
            rows = _parallel(lambda i: _factorized_group(groups[i], weights[i], spectra[i], ranks[i], full[i], means[i]), len(groups))
        modified = False
        for g, (row, u, v, delta) in zip(groups, rows):
            self.details.append(row)
            if u is not None:
                rewrite_linear(model.graph, g, u, v, delta)
                modified = True
        return modified

    # -- Conv: plain SVD of the filter matrix ------------------------------------------------------------
    def _convs(self, model: ir.Model) -> bool:
        o = self.options
        modified = False
        for node, label in self._selected(model, ("Conv",)):
            found = classify_conv(node, o.min_size)
            if isinstance(found, str):
                if found:
                    self.details.append({"layer": label, "op": "Conv", "skipped": found})
                continue
            w = found
            mat = conv_matrix(w.astype(np.float64))
            sp = spectrum(mat)
            rank = self._ranks([mat], [sp])[0] if o.allocation == "layer" else rank_for_ratio(*mat.shape, o.ratio)
            k, n = mat.shape
            row: dict[str, Any] = {"layer": label, "op": "Conv", "K": k, "N": n, "rank": rank}
            if self.options.calibrated:
                row["note"] = "Conv: plain SVD (no calibrated statistics for Conv)"
            if rank is None or rank * (k + n) >= k * n:
                self.details.append({**row, "skipped": "the chosen rank saves no parameters"})
                continue
            u, v = factors(mat, sp, rank)
            spec, fro = weight_errors(mat, u, v)
            row.update({"params_before": k * n, "params_after": int(u.size + v.size), "spectral_error": round(spec, 6), "frobenius_error": round(fro, 6)})
            self.details.append(row)
            rewrite_conv(model.graph, node, label, *conv_factors(w, u.astype(np.float32), v.astype(np.float32)))
            modified = True
        return modified

    # -- what to factorize -----------------------------------------------------------------------------
    def _selected(self, model: ir.Model, ops: tuple[str, ...]) -> list[tuple[ir.Node, str]]:
        """(node, label) of the standard-domain ``ops`` nodes not yet factorized that include/exclude select;
        excluded ones get a report row. A list: callers rewrite the graph while they walk it."""
        o = self.options
        out: list[tuple[ir.Node, str]] = []
        for index, node in enumerate(model.graph):
            if node.op_type not in ops or node.domain not in ("", "ai.onnx") or MARK in node.metadata_props:
                continue  # MARK: already factorized
            label = node_label(node, index)
            if o.include and not any(sub in label for sub in o.include):
                continue
            if any(sub in label for sub in o.exclude):
                self.details.append({"layer": label, "op": node.op_type, "skipped": "excluded by option"})
                continue
            out.append((node, label))
        return out

    def _targets(self, model: ir.Model) -> list[Target]:
        o = self.options
        out: list[Target] = []
        for node, label in self._selected(model, ("MatMul", "Gemm")):
            found = classify(node, o.min_size)
            if isinstance(found, str):
                if found:
                    self.details.append({"layer": label, "op": node.op_type, "skipped": found})
                continue
            w, x, trans_x = found
            out.append(Target(node, label, w, node.inputs[1], x, trans_x))
        return out

    def _moments(self, model: ir.Model, groups: list[Group]) -> dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]]:
        """Second moment S = X^T X / n and mean of every layer input, from one run over the calibration data."""
        feeds = check_calibration(model, self.context.calibration, "factorize(calibrated=true)")
        return {key: (st.second_moment, st.mean) for key, st in input_stats(model, feeds, [g.key for g in groups]).items()}

    def _ranks(self, weights: list[np.ndarray], spectra: list[Spectrum]) -> list[int | None]:
        o = self.options
        if o.ratio is not None and o.allocation == "global":
            return allocate_global([(w.shape[0], w.shape[1], sp.s) for w, sp in zip(weights, spectra)], o.ratio)
        ranks: list[int | None] = []
        for w, sp in zip(weights, spectra):
            k, n = w.shape
            if o.rank is not None:
                r = min(o.rank, len(sp.s))
            elif o.ratio is not None:
                r = rank_for_ratio(k, n, o.ratio)
            elif o.energy is not None:
                r = rank_for_energy(sp.s, o.energy)
            else:
                r = rank_for_error(sp.s, float(o.error))
            ranks.append(r)
        return ranks
