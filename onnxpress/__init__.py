"""onnxpress: make trained models small and fast for ONNX Runtime, and prove they still compute the same."""

__version__ = "0.1.0"

from onnxpress.api import OptimizeReport, optimize  # noqa: E402
from onnxpress.io import load, save  # noqa: E402
from onnxpress.pass_infra import Pass, PassContext, PassStats  # noqa: E402
from onnxpress.pipeline import Pipeline  # noqa: E402
from onnxpress.validate import Tolerance, ValidationReport, validate  # noqa: E402

__all__ = [
    "OptimizeReport",
    "Pass",
    "PassContext",
    "PassStats",
    "Pipeline",
    "Tolerance",
    "ValidationReport",
    "__version__",
    "load",
    "optimize",
    "save",
    "validate",
]
