"""The ``factorize`` pass: low-rank factorization of MatMul/Gemm weights, W (K x N) -> U (K x r) @ V (r x N).

Plain mode truncates the SVD of W, which minimises the weight error ||W - UV||. Calibrated mode
(``calibrated=true``, the SVD-LLM / ASVD family) uses the second moment of the layer's input,
S = X^T X / n = L L^T, and truncates the SVD of L^T W: this minimises the output error ||X W - X U V|| on
the calibration inputs, which is what the model feels.

Modules (imports run one way, top to bottom):

- ``maths``: pure numpy (ranks, spectra, factors, error measures, bias correction, global allocation);
- ``options``: ``FactorizeOptions``;
- ``targets``: which nodes are rewritten and why not (``classify``, ``classify_conv``, groups);
- ``rewrite``: the graph surgery;
- ``pass_``: the ``Factorize`` pass;
- ``planner``: ``FactorizePlanner``, what the budget search may ask about ``lowrank/R`` (``passes.planning``).
"""

from onnxpress.passes.factorize.maths import (
    Spectrum,
    allocate_global,
    bias_correction,
    breakeven_rank,
    centered,
    conv_factors,
    conv_matrix,
    direction_energies,
    factorize_matrix,
    factors,
    output_energy,
    output_error,
    rank_for_energy,
    rank_for_error,
    rank_for_ratio,
    spectrum,
    tail_error,
    weight_errors,
)
from onnxpress.passes.factorize.options import FactorizeOptions
from onnxpress.passes.factorize.pass_ import Factorize
from onnxpress.passes.factorize.planner import FactorizePlanner
from onnxpress.passes.factorize.targets import MARK, classify, classify_conv

# The planner makes Factorize instances (planner imports pass_), so the pass is told its planner here, where
# both classes exist; the budget finds it as ``Factorize.planner`` and makes one instance per search.
Factorize.planner = FactorizePlanner

__all__ = [
    "MARK", "Factorize", "FactorizeOptions", "FactorizePlanner", "Spectrum", "allocate_global", "bias_correction",
    "breakeven_rank", "centered", "classify", "classify_conv", "conv_factors", "conv_matrix", "direction_energies",
    "factorize_matrix", "factors", "output_energy", "output_error", "rank_for_energy", "rank_for_error",
    "rank_for_ratio", "spectrum", "tail_error", "weight_errors",
]
