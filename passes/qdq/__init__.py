"""The ``qdq`` pass: int8 / int4 quantization in QDQ form (QuantizeLinear/DequantizeLinear) for ONNX Runtime.

The maths (scales, zero points, clip searches, SmoothQuant factors, GPTQ) lives in ``quant_math`` as pure
numpy functions; this package picks what to quantize and rewrites the graph. Its modules import one way:

- ``options``: ``QdqOptions`` and shared constants;
- ``cpu``: the 8-bit weight type the running CPU wants (``weight_type=auto``);
- ``targets``: which nodes are quantized and why others are not (``find_targets``), tied tables, indexed rows;
- ``calibration``: activation statistics from one onnxruntime pass (``collect_stats``);
- ``plan``: scales, SmoothQuant/AWQ factors, quantized weights, bias correction, layer errors (``make_plan``);
- ``rewrite``: the graph surgery that realises a plan (``apply_plan``);
- ``pass_``: the ``Qdq`` pass class;
- ``planner``: ``QdqPlanner``, what the budget search may ask of ``qdq`` (``onnxpress.passes.planning``).

The planner makes ``Qdq`` instances, so it imports ``pass_``; the package joins the two (``Qdq.planner``).
"""

from onnxpress.passes.qdq.calibration import collect_stats
from onnxpress.passes.qdq.cpu import cpu_has_int8_dot, resolved_weight_type
from onnxpress.passes.qdq.options import SMOOTH_ALPHAS, QdqOptions
from onnxpress.passes.qdq.pass_ import Qdq
from onnxpress.passes.qdq.plan import AWQ_SEARCH_COLUMNS, AWQ_SEARCH_ROWS, Plan, awq_plan, make_plan
from onnxpress.passes.qdq.planner import QdqPlanner
from onnxpress.passes.qdq.rewrite import apply_plan
from onnxpress.passes.qdq.targets import Target, Tied, find_targets, indexed_rows, tied_target, tied_uses

Qdq.planner = QdqPlanner

__all__ = [
    "AWQ_SEARCH_COLUMNS", "AWQ_SEARCH_ROWS", "SMOOTH_ALPHAS", "Plan", "Qdq", "QdqOptions", "QdqPlanner", "Target", "Tied",
    "apply_plan", "awq_plan", "collect_stats", "cpu_has_int8_dot", "find_targets", "indexed_rows", "make_plan",
    "resolved_weight_type", "tied_target", "tied_uses",
]
