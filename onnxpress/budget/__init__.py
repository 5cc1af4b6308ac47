"""Accuracy budget: choose per layer the rank, bits (and later sparsity) that give the smallest model
that still meets a fidelity budget such as ``cos>=0.99`` or ``accuracy_drop<=1%``.

    result = onnxpress.budget.search("model.onnx", "cos>=0.99", calibration=feeds)
    result.pipeline        # ordinary pipeline text, re-runnable without search
    result.model           # the rewritten model, built by the real passes and verified
    result.plot("pareto.png"); console.print(*result.renderables())

Algorithm
---------
1. **Layers and candidates** (``layers``). The search knows the lossy passes only through their planners
   (``onnxpress.passes.planning``: ``Qdq.planner`` stores weights, ``Factorize.planner`` rewrites one weight
   into two); a new lossy pass joins by declaring one. Every MatMul/Gemm/Conv with a constant float weight and
   every embedding Gather is a layer. Its candidates are the choices the planners accept for it: int8 per
   channel, int4 block-wise (blocks of 32 to 512, where qdq takes int4 and a larger block stores fewer
   bytes; MatMul/Gemm up to 256, MatMulNBits' limit), for embedding tables the split of ``qdq(embedding_split)``
   (rows the calibration data indexes int4, all others 2-bit), and calibrated low-rank factorization
   at several ratios followed by int8/int4 of the factors (MatMul/Gemm). Each candidate's stored bytes are
   computed exactly from the layout the passes write.
2. **Statistics**: one ORT run over the calibration data captures every layer input's second moment and
   mean (the passes' calibrated factorization and GPTQ use exactly these).
3. **Sensitivity**: one ORT session of the model in which every layer weight is an overridable initializer
   (``simulate.Simulator``). For each (layer, candidate) the reconstructed weight (``U @ V``,
   ``dequant(quant(W))``, built with the passes' own maths) is fed for that layer alone; the output error
   against the unmodified outputs on the calibration data is ``d = ||y' - y||^2 / ||y||^2`` (mean over the
   float outputs). Results are cached on disk, keyed by model, calibration data and candidate grid.
   Only the plain quantizations are measured up front (``predict=True``): a factorization candidate's
   ``d`` is predicted as the layer's *gain* (measured ``d`` / the layer's own relative output error
   ``tr(D^T S D) / tr(W^T S W)`` of its quantizations, geometric mean) times its own error (the discarded
   output energy of the calibrated spectrum plus the quantization's local error); no model run, no
   reconstruction. On MiniLM's 360 factorization candidates prediction / measurement is 0.4-5 (median
   1.0, 80% within 0.7-1.9).
4. **Greedy path** (``paths``: pure functions). Errors of different layers are treated as additive in ``d``
   (independent perturbations add in squared norm; ``1 - cos ~ d / 2``). Per layer the candidates are
   reduced to the lower convex hull of (bytes saved, d); all hull segments of all layers are sorted by
   bytes saved per unit of ``d``. A prefix of this list is a configuration; longer prefixes are smaller
   and (predicted) less faithful.
5. **Search on the path** (``search.BudgetSearch``, one object whose methods are these stages): the budget metric of a configuration is measured, not predicted: for output
   metrics (``cos``, ``rel_l2``, ``max_abs``) by feeding all its reconstructions at once to the simulation
   session on the calibration (fit) data; for task metrics by the task's ``evaluate`` on that session with the
   reconstructions fed (``accepts_session``) or on a materialized copy of the model. An interpolating
   search finds the longest prefix that meets the budget; then the layer whose move broke it is frozen
   and the search continues on the remaining moves (``rounds`` times). Then the predicted candidates that
   the result uses, or whose hull move would be as efficient as the best rejected move (the price the
   budget sets) if the prediction were ``REFINE_SLACK`` times too high, are measured and the search runs
   again on the updated path (``refine_rounds`` times at most; configurations already checked are not
   checked again). Candidates far below that price stay predictions: they cannot enter the result.
6. **Build and verify** (``build``): the configuration becomes pipeline text (``factorize(ratio=..,calibrated=true,
   include=[..])`` per ratio, then ``qdq(mode=int4,...)`` per block size and ``qdq(mode=weight,...)``,
   each with an ``include`` or ``exclude`` list, whichever is shorter), which the real passes run; the
   result is verified on the evaluation (held-out) data with the budget metric, and measured on the fit
   data for comparison. If it fails (the real passes differ from the reconstruction by rounding, or by
   statistics taken on the partly rewritten model; the held-out data is not the fit data), a build with an
   fit-dependent option (a planner's ``heldout_check``: the embedding split) drops those options first; otherwise the target moves to the safe side
   (``Budget.aimed``: from the fit/held-out gaps of the builds so far) and steps 5-6 repeat (``backoff`` times); as a last resort the lossless model is
   returned and ``passed`` says so.

Modules (imports run one way): ``spec`` (budget text) <- ``layers`` (planners, candidates, bytes, reconstructions)
<- ``simulate`` (one ORT session) <- ``search`` (the stages) -> ``build`` (the real passes), ``paths``
(greedy maths), ``result`` -> ``report`` (tables, plot; ``result``'s methods reach it lazily). The package
names ``search`` and ``build`` are the functions; their modules are ``onnxpress.budget.search`` /
``onnxpress.budget.build`` for ``from ... import``.
"""


from onnxpress.budget.build import build
from onnxpress.budget.layers import FP32, Choice, Grid, Layer, Planners, find_layers
from onnxpress.budget.paths import Move, apply_moves, greedy_path, longest_passing_prefix, lower_hull, search_path
from onnxpress.budget.result import BudgetResult, LayerDecision, Point
from onnxpress.budget.search import REFINE_SLACK, BudgetSearch, SearchOptions, search
from onnxpress.budget.spec import OUTPUT_METRICS, Budget

__all__ = [
    "FP32", "OUTPUT_METRICS", "REFINE_SLACK", "Budget", "BudgetResult", "BudgetSearch", "Choice", "Grid", "Layer", "LayerDecision", "Move",
    "Planners", "Point", "SearchOptions", "apply_moves", "build", "find_layers", "greedy_path", "longest_passing_prefix", "lower_hull", "search",
    "search_path",
]
