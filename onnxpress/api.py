"""The Python API: ``optimize`` runs a pipeline and ends in a validation; everything stays in memory."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from onnxpress import __version__, sparse_storage
from onnxpress.errors import UsageError
from onnxpress.io import load, model_bytes, release_external_tensors  # noqa: F401 - model_bytes: part of the API
from onnxpress.pass_infra import Pass, PassContext, PassStats
from onnxpress.pipeline import Pipeline, stamp_metadata  # noqa: F401 - stamp_metadata: part of the API
from onnxpress.validate import Tolerance, ValidationReport, validate

# Lossy pipelines are judged on output cosine similarity unless the caller sets a tolerance.
LOSSY_MIN_COSINE = 0.99


def default_pipeline() -> str:
    from onnxpress.passes import DEFAULT_PIPELINE

    return DEFAULT_PIPELINE


@dataclasses.dataclass
class OptimizeReport:
    pipeline: str
    bytes_before: int
    bytes_after: int
    seconds: float
    passes: list[PassStats]
    validation: ValidationReport | None
    version: str = __version__
    # --bisect: (pass text, validation after it) for every pass run, and the first pass that broke tolerance
    bisect: list[tuple[str, ValidationReport]] = dataclasses.field(default_factory=list)
    first_failing_pass: str | None = None
    data: dict[str, Any] | None = None  # rundata: calibration/evaluation sources and the hold-out split
    target: str = "cpu"
    budget: Any = None  # BudgetResult of a --budget run (its verdict is on held-out data)
    task_metrics: dict[str, float] | None = None  # the task's metrics of the result on the evaluation data
    # --accept (or the task's default for a lossy pipeline): conditions on task_metrics, each with its value
    acceptance: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    validation_decides: bool = True  # False: acceptance replaced the default output floor (the comparison is reported only)
    mobile: Any = None  # targets.MobileReport (--target mobile)
    written: list[str] = dataclasses.field(default_factory=list)  # files written (output, .ort, ...)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    @property
    def passed(self) -> bool:
        """The validation (if run), the budget (if any) and the mobile check (if any) all passed."""
        ok = self.validation is None or not self.validation_decides or self.validation.passed
        ok = ok and all(a["passed"] for a in self.acceptance)
        if self.budget is not None:
            ok = ok and bool(self.budget.passed)
        if self.mobile is not None:
            ok = ok and bool(self.mobile.passed)
        return ok and self.first_failing_pass is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnxpress_version": self.version,
            "pipeline": self.pipeline,
            "target": self.target,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "seconds": self.seconds,
            "passed": self.passed,
            "data": self.data,
            "passes": [p.to_dict() for p in self.passes],
            "validation": self.validation.to_dict() if self.validation else None,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "task_metrics": self.task_metrics,
            "acceptance": self.acceptance or None,
            "validation_decides": self.validation_decides,
            "mobile": self.mobile.to_dict() if self.mobile is not None else None,
            "bisect": [{"after": text, **r.to_dict()} for text, r in self.bisect] or None,
            "first_failing_pass": self.first_failing_pass,
            "written": self.written,
            "notes": self.notes,
        }


def _noop(*_: Any) -> None:
    return None


def optimize(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    pipeline: Pipeline | str | list[Pass] | None = None,
    *,
    budget: Any = None,
    task: Any = None,
    accept: str | Sequence[str] | None = None,
    calibration: Any = None,
    evaluation: Any = None,
    inputs: Any = None,
    holdout: float | int | None = None,
    dims: dict[str, int] | None = None,
    tolerance: Tolerance | None = None,
    provider: str = "cpu",
    target: str = "cpu",
    validate_result: bool = True,
    verify_each: bool = False,
    bisect: bool = False,
    output: str | os.PathLike | None = None,
    external_data: bool | None = None,
    keep_failed: bool = False,
    force: bool = False,
    jobs: int | None = 1,
    budget_options: dict[str, Any] | None = None,
    progress: Any = False,
    on_pass_start: Callable[[Pass], None] | None = None,
    on_pass_end: Callable[[Pass], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[ir.Model, OptimizeReport]:
    """The one orchestrator: load -> target preparation -> pipeline or budget search -> validation on
    evaluation data -> target artefacts -> atomic save -> report. The CLI only parses and prints.

    ``pipeline``: text, Pipeline or passes (default: the lossless pipeline); or ``budget`` (``"cos>=0.98"``,
    a ``budget.Budget``): the smallest per-layer mix that meets it, verified on held-out data.
    Data (``onnxpress.rundata``): ``calibration`` is what lossy passes and the search fit to; ``evaluation``
    (alias ``inputs``) what the verdict is computed on. With calibration only, ``holdout`` (default 25%,
    at least 8 samples; a fraction or a count) of it is held out for the verdict. Paths, lists of feeds, or
    dicts of arrays with a leading sample axis. No data at all: generated inputs (``dims``), said so.
    ``task``: a built-in task name, ``"pkg.mod:function"`` or a callable ``fn(session_factory, data)``
    (``onnxpress.tasks``): a budget can name its metrics; a pipeline run reports them. ``accept``: conditions
    on the task's held-out metrics (``"ppl_increase_rel<=5%"``) that decide a pipeline run's verdict in place of
    the default output floor (an explicit ``tolerance`` still applies too); the llm task brings a default.
    ``target``: ``cpu``/``cuda``/``mobile`` (pass defaults, the validating provider; mobile writes
    ``OUT.ort`` and friends and needs ``output``). ``output``: write the result atomically when it passed
    (or ``keep_failed``). ``bisect=True`` validates after every pass and stops at the first that breaks the
    tolerance. The input is never modified. Returns the model and an ``OptimizeReport``.
    """
    from onnxpress import io, rundata, tasks, targets

    start = time.perf_counter()
    stage = on_stage or _noop
    if inputs is not None and evaluation is not None:
        raise UsageError("give evaluation data once: evaluation= or inputs= (the same thing), not both")
    evaluation = evaluation if evaluation is not None else inputs
    _check_combination(pipeline, budget, bisect, verify_each, validate_result)
    tgt = targets.get_target(target)
    if tgt.name == "cuda":
        targets.check_cuda()
        provider = "cuda"
    if tgt.name == "mobile" and output is None:
        raise UsageError("target mobile writes OUT.ort and its configuration beside the output: give an output path")
    folder_output = _folder_output(model, output, tgt.name)
    if output is not None and folder_output is None:
        io.check_writable_output(output, (model,) if isinstance(model, (str, os.PathLike)) else (), force=force)

    stage("loading")
    working, reference, bytes_before = _load_working_copy(model)
    task_obj = tasks.resolve(task, reference, calibration=calibration, evaluation=evaluation)
    if task_obj is not None and task_obj.owns_data:  # the task read the user's data itself (llm: text, token ids)
        if holdout is not None:
            raise UsageError(f"--holdout splits .npz calibration samples; task {task_obj.name} evaluates on --eval-data or its own held-out text")
        calibration = evaluation = None
    conditions = _acceptance_conditions(accept, task_obj, budget)
    data = rundata.prepare(working, calibration=calibration, evaluation=evaluation, holdout=holdout,
                           task=task_obj.module if task_obj is not None else None)
    if budget is not None:
        stage("budget search")
        out, report = _run_budget(working, reference, budget, data, task_obj, jobs, progress, budget_options or {}, bytes_before)
        if tgt.name != "cpu":
            report.notes.append(f"target {tgt.name}: its pass defaults do not apply to the budget's weight-only passes; its runtime checks do")
        if tolerance is not None:  # an explicit tolerance is checked too; the budget decides otherwise
            stage("validating in onnxruntime")
            report.validation = validate(reference, out, inputs=data.evaluation, dims=dims, tolerance=tolerance, provider=provider, data=data.describe())
    else:
        pipe = targets.apply_target(Pipeline.coerce(pipeline, default_pipeline()), tgt)
        if not conditions and task_obj is not None and task_obj.default_accept and not pipe.lossless and tolerance is None and validate_result:
            conditions = [task_obj.default_accept]
        explicit_tolerance = tolerance is not None
        tolerance = tolerance or (Tolerance() if pipe.lossless else Tolerance(min_cosine=LOSSY_MIN_COSINE))
        validate_kwargs = dict(inputs=data.evaluation, dims=dims, provider=provider, data=data.describe())
        context = PassContext(calibration=data.calibration)
        if bisect:
            out, report = _bisect(pipe, working, reference, context, bytes_before, start, tolerance, validate_kwargs, verify_each, on_pass_start, on_pass_end)
        else:
            result = pipe.run(working, context=context, verify_each=verify_each, on_pass_start=on_pass_start, on_pass_end=_releasing(working, on_pass_end))
            out = result.model
            stamp_metadata(out, str(pipe))
            report = OptimizeReport(str(pipe), bytes_before, model_bytes(out), 0.0, result.stats, None)
            if validate_result:
                stage("validating in onnxruntime")
                report.validation = validate(reference, out, tolerance=tolerance, **validate_kwargs)
        if task_obj is not None:
            stage(f"task metrics ({task_obj.name})")
            report.task_metrics = task_obj.evaluate(out, data.evaluation if task_obj.uses_data else None)
            _judge_acceptance(report, conditions, explicit_tolerance, data)
    report.data, report.target = data.to_dict(), tgt.name
    _finish(out, report, reference, data, dims, output, external_data, keep_failed, force, stage, folder_output)
    report.seconds = time.perf_counter() - start
    return out, report


def _acceptance_conditions(accept: Any, task: Any, budget: Any) -> list[str]:
    """``accept`` as a list of condition texts, checked for form now (their metrics are checked once measured)."""
    from onnxpress.budget.spec import Budget

    texts = [accept] if isinstance(accept, str) else list(accept or ())
    if not texts:
        return []
    if budget is not None:
        raise UsageError("--accept judges a -p pipeline's result; a --budget is its own acceptance condition")
    if task is None:
        raise UsageError("--accept judges task metrics: name the task with --task")
    for text in texts:
        Budget.parse(text)
    return texts


def _judge_acceptance(report: OptimizeReport, conditions: Sequence[str], explicit_tolerance: bool, data: Any) -> None:
    """Each condition on the task's metrics of the evaluation data; they replace the default output floor."""
    from onnxpress.budget.spec import Budget

    metrics = report.task_metrics or {}
    for text in conditions:
        condition = Budget.parse(text)
        if condition.metric not in metrics:
            raise UsageError(f"--accept '{text}': the task reports no '{condition.metric}' (it reports {', '.join(sorted(metrics))})")
        value = float(metrics[condition.metric])
        report.acceptance.append({"condition": condition.text, "value": value, "passed": condition.ok(value), "on": data.evaluation_source})
    if report.acceptance and not explicit_tolerance:
        report.validation_decides = False


def _check_combination(pipeline: Any, budget: Any, bisect: bool, verify_each: bool, validate_result: bool) -> None:
    """Flags that cannot apply together: one line each."""
    if budget is None:
        return
    if pipeline is not None:
        raise UsageError("give a pipeline or a budget, not both (the budget search writes its own pipeline)")
    for flag, name in ((bisect, "--bisect"), (verify_each, "--verify-each")):
        if flag:
            raise UsageError(f"{name} applies to -p pipelines, not to --budget (the search verifies its build itself)")
    if not validate_result:
        raise UsageError("--no-validate cannot apply to --budget: the budget is decided by its held-out verification")


def _load_working_copy(model: Any) -> tuple[ir.Model, Any, int]:
    """(working copy, reference for validation: a path or a proto, bytes before). The input is never modified:
    a path is loaded lazily, an in-memory model is copied."""
    if isinstance(model, (str, os.PathLike)):
        working = load(model)
        return working, os.fspath(model), model_bytes(working)
    from onnxpress import runtime

    if isinstance(model, ir.Model):
        # the caller's model is the reference (never rewritten); the copy keeps where external weights live
        return runtime.copy_model(model), model, model_bytes(model)
    return ir.serde.deserialize_model(model), model, model_bytes(model)


def _run_budget(working: ir.Model, reference: Any, budget: Any, data: Any, task: Any, jobs: int | None, progress: Any,
                options: dict[str, Any], bytes_before: int):
    """The budget search on the run's data (fit on calibration, verdict on evaluation)."""
    from onnxpress import budget as budget_mod

    result = budget_mod.search(reference if isinstance(reference, str) else working, budget, data=data, task=task, jobs=jobs, progress=progress, **options)
    report = OptimizeReport(result.pipeline, bytes_before, result.bytes_after, 0.0, [], None, budget=result)
    return result.model, report


def _folder_output(model: Any, output: Any, target: str) -> Any:
    """``onnxpress.llm.folder.FolderOutput`` when the input is a model of an onnxruntime-genai folder and the
    output goes to another folder (the output is then a whole genai folder), else None (a model file)."""
    if output is None or target == "mobile" or not isinstance(model, (str, os.PathLike)):
        return None  # mobile writes its artefacts beside one model file
    from onnxpress.llm import folder

    return folder.plan_output(model, output)


def _finish(out: Any, report: OptimizeReport, reference: Any, data: Any, dims: Any, output: Any, external_data: Any, keep_failed: bool, force: bool,
            stage: Callable[[str], None], folder_output: Any = None) -> None:
    """Target artefacts (mobile: .ort, operator config, EP report) and the atomic save, when the run passed
    (an onnxruntime-genai folder in, a whole folder out: ``onnxpress.llm.folder``)."""
    from onnxpress import io, targets

    if report.target == "mobile" and (report.passed or keep_failed):
        stage("converting to ORT format and checking the mobile execution providers")
        report.mobile = targets.export_mobile(
            out, output, reference=reference, inputs=data.evaluation, dims=dims,
            tolerance=report.validation.tolerance if report.validation else None, keep_failed=keep_failed, force=force,
        )
        report.written.extend(report.mobile.files.values())
    if output is not None and (report.passed or keep_failed):
        stage("saving")
        if folder_output is not None:
            from onnxpress.llm import folder

            others = folder.write_folder(folder_output, out, external_data=external_data)
            report.written.insert(0, str(folder_output.output))
            report.notes.append(f"onnxruntime-genai folder {folder_output.folder}: the model and {', '.join(others)} (copied from {folder_output.source})")
        else:
            io.save(out, output, external_data=external_data)
            report.written.insert(0, str(output))


def _bisect(pipe, working, reference, context, bytes_before, start, tolerance, validate_kwargs, verify_each, on_pass_start, on_pass_end):
    """Run one pass at a time, validating after each; stop at the first that breaks the tolerance."""
    stats: list[PassStats] = []
    log: list[tuple[str, ValidationReport]] = []
    out: Any = working
    first_failing = None
    for p in pipe:
        result = Pipeline([p]).run(out, context=context, verify_each=verify_each, on_pass_start=on_pass_start, on_pass_end=_releasing(out, on_pass_end))
        out = result.model
        stats.extend(result.stats)
        report = validate(reference, out, tolerance=tolerance, **validate_kwargs)
        log.append((str(p), report))
        if not report.passed:
            first_failing = str(p)
            break
    stamp_metadata(out, str(pipe))
    final = log[-1][1] if log else None
    return out, OptimizeReport(str(pipe), bytes_before, model_bytes(out), time.perf_counter() - start, stats, final,
                               bisect=log, first_failing_pass=first_failing)


def _releasing(model: ir.Model, on_pass_end: Callable[[Pass], None] | None) -> Callable[[Pass], None]:
    """``on_pass_end`` that first unmaps the external weights the pass read (so a 3 GB model read by one
    pass is not resident through the next)."""

    def end(p: Pass) -> None:
        release_external_tensors(model)
        if on_pass_end is not None:
            on_pass_end(p)

    return end
