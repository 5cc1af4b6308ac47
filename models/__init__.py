"""Real models for judging rewrites: builders, evaluation data and task metrics (shipped as onnxpress.models).

``TASKS`` maps a task name to its module; each module offers ``build(...) -> Path`` (the cached fp32 ONNX
file), ``calibration_feeds(...)``, ``evaluation_feeds(...)`` and ``evaluate(model_or_path, reference=None)``
returning a dict of task metrics.  Importing this package imports no heavy library (torch, transformers
and scikit-learn are imported when a model is built or trained).
"""

if __name__ != "onnxpress.models":  # pragma: no cover - a second copy would break the registry and isinstance checks
    raise ImportError("import onnxpress.models, not 'models' from the repository root")

from typing import Any

from onnxpress.models import digits, lm, minilm

TASKS = {"minilm": minilm, "digits": digits, "lm": lm}

# builtin model name -> (task, kind)
BUILTIN_MODELS = {"minilm": ("minilm", None), "digits-mlp": ("digits", "mlp"), "digits-cnn": ("digits", "cnn"), "lm": ("lm", None)}

_EXPECTED_INPUTS = {"minilm": set(minilm.INPUTS), "digits": {digits.INPUT}, "lm": {lm.INPUT}}


def check_task_inputs(task: str, model_or_path: Any) -> None:
    """A UsageError when the model's inputs are not the ones the task feeds."""
    from onnxpress.errors import UsageError
    from onnxpress.models.common import session_for

    names = {i.name for i in session_for(model_or_path).get_inputs()}
    expected = _EXPECTED_INPUTS[task]
    if names != expected:
        raise UsageError(
            f"the model does not fit task '{task}': its inputs are {', '.join(sorted(names))}, "
            f"the task feeds {', '.join(sorted(expected))}"
        )


def evaluate_task(task: str, model_or_path: Any, *, kind: str | None = None, reference: Any = None) -> dict[str, float]:
    """Task metrics of any ONNX model (path, ir.Model or proto) against ``reference`` (default: the fp32 build)."""
    from onnxpress.errors import UsageError

    if task not in TASKS:
        raise UsageError(f"unknown task '{task}' (valid: {', '.join(TASKS)})")
    check_task_inputs(task, model_or_path)
    if task == "digits":
        return digits.evaluate(model_or_path, kind=kind, reference=reference)
    if kind is not None:
        raise UsageError(f"--kind applies to the digits task only, not '{task}'")
    return TASKS[task].evaluate(model_or_path, reference=reference)


__all__ = ["BUILTIN_MODELS", "TASKS", "check_task_inputs", "digits", "evaluate_task", "lm", "minilm"]
