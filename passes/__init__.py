"""All onnxpress passes. ``ALL`` is the one explicit list the registry reads; names must be unique."""

if __name__ != "onnxpress.passes":  # pragma: no cover - a second copy would break the registry and isinstance checks
    raise ImportError("import onnxpress.passes, not 'passes' from the repository root")


from onnxpress.passes.cse import CommonSubexpressionElimination
from onnxpress.passes.dedup import DeduplicateInitializers
from onnxpress.passes.factorize import Factorize
from onnxpress.passes.fold import FoldConstants
from onnxpress.passes.fuse_gelu import FuseGelu
from onnxpress.passes.fuse_qdq_bias import FuseQdqBias
from onnxpress.passes.lift_constants import LiftConstants
from onnxpress.passes.prune_unused import PruneUnused
from onnxpress.passes.prune import Prune
from onnxpress.passes.qdq import Qdq
from onnxpress.passes.simplify import Simplify
from onnxpress.passes.sparse import Sparsify
from onnxpress.passes.strip_metadata import StripMetadata
from onnxpress.passes.upgrade_opset import UpgradeOpset

ALL = (
    StripMetadata,
    Simplify,
    FoldConstants,
    DeduplicateInitializers,
    PruneUnused,
    CommonSubexpressionElimination,
    FuseGelu,
    Qdq,
    FuseQdqBias,
    Factorize,
    Prune,
    Sparsify,
    UpgradeOpset,
    LiftConstants,
)

# The default pipeline of `onnxpress optimize`: lossless, in an order where each pass feeds the next.
DEFAULT_PIPELINE = "strip-metadata,simplify,fold,cse,dedup,prune-unused"
