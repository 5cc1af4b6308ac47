"""Real models for judging rewrites: builders, evaluation data and task metrics (shipped as onnxpress.models)."""

if __name__ != "onnxpress.models":  # pragma: no cover - a second copy would break the registry and isinstance checks
    raise ImportError("import onnxpress.models, not 'models' from the repository root")

