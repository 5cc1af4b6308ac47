"""All onnxpress passes. ``ALL`` is the one explicit list the registry reads; names must be unique."""

from onnxpress.passes.cse import CommonSubexpressionElimination
from onnxpress.passes.dedup import DeduplicateInitializers
from onnxpress.passes.fold import FoldConstants
from onnxpress.passes.prune_unused import PruneUnused
from onnxpress.passes.simplify import Simplify

ALL = (
    Simplify,
    FoldConstants,
    DeduplicateInitializers,
    PruneUnused,
    CommonSubexpressionElimination,
)

# The default pipeline of `onnxpress optimize`: lossless, in an order where each pass feeds the next.
DEFAULT_PIPELINE = "simplify,fold,cse,dedup,prune-unused"
