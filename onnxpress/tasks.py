"""Task metrics for verdicts and budgets: built-in tasks (``onnxpress.models.TASKS``) and user tasks.

A user task is a Python callable ``fn(session_factory, data) -> dict[str, float]``: ``session_factory()``
returns an onnxruntime ``InferenceSession`` (or a look-alike with ``get_inputs``/``get_outputs``/``run``) of
the model being judged, ``data`` is the list of feeds to judge it on (the evaluation data for a verdict, the
calibration data while the budget search compares configurations). Name it on the command line as
``--task pkg.module:function`` or ``--task path/to/file.py:function``.

For every number ``x`` the callable returns, onnxpress adds the original model's value ``reference_x``,
``x_drop = reference_x - x`` and ``x_increase_rel = x / reference_x - 1``, so ``accuracy_drop<=1%`` or
``cer_increase_rel<=5%`` work for any metric the callable reports.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.errors import UsageError

Feed = dict[str, np.ndarray]
Evaluate = Callable[..., dict[str, float]]


def builtin_tasks() -> dict[str, Any]:
    """Task name -> module (``onnxpress.models.TASKS``); empty when the models extra is not installed."""
    try:
        from onnxpress.models import TASKS
    except ImportError:  # pragma: no cover - models are part of the package, but keep the core importable
        return {}
    return dict(TASKS)


def load_callable(spec: str, what: str = "--task") -> Callable[..., Any]:
    """``pkg.mod:function`` or ``path/to/file.py:function`` -> the callable (UsageError when it cannot be had)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"{what} expects a built-in task name, PKG.MOD:FUNCTION or FILE.py:FUNCTION, got '{spec}'")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise UsageError(f"{what}: {target}: no such file")
            mod_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if mod_spec is None or mod_spec.loader is None:
                raise UsageError(f"{what}: cannot import {target}")
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{what}: cannot import {target}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UsageError(f"{what}: {target} has no callable '{attr}'")
    return fn


def with_relative(metrics: dict[str, float], reference: dict[str, float] | None = None) -> dict[str, float]:
    """Add ``reference_x``, ``x_drop`` and ``x_increase_rel`` (``perplexity`` -> ``ppl_increase_rel``) for
    every metric with a reference value (given, or already reported as ``reference_x``)."""
    out = dict(metrics)
    for key, value in metrics.items():
        if key.startswith("reference_") or not isinstance(value, (int, float)):
            continue
        ref = reference.get(key) if reference is not None else metrics.get(f"reference_{key}")
        if ref is None or not isinstance(ref, (int, float)):
            continue
        short = "ppl" if key == "perplexity" else key
        out.setdefault(f"reference_{key}", float(ref))
        out.setdefault(f"{key}_drop", float(ref) - float(value))
        if ref:
            out.setdefault(f"{short}_increase_rel", float(value) / float(ref) - 1.0)
    return out


def _numbers(result: Any, name: str) -> dict[str, float]:
    if not isinstance(result, dict):
        raise UsageError(f"task {name} returned {type(result).__name__}, not a dict of metrics")
    numbers = {str(k): float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}
    if not numbers:
        raise UsageError(f"task {name} returned no numbers (got keys: {', '.join(map(str, result)) or 'none'})")
    return numbers


def _session_factory(model: Any) -> Callable[[], Any]:
    if hasattr(model, "get_outputs") and hasattr(model, "run"):
        return lambda: model
    from onnxpress import runtime

    return lambda: runtime.make_session(os.fspath(model) if isinstance(model, os.PathLike) else model)


@dataclasses.dataclass
class Task:
    """A resolved task: ``evaluate(model, data=None) -> metrics`` with the relative keys added.

    ``accepts_session``: ``evaluate`` may be given an InferenceSession look-alike instead of a model (the
    budget search then scores configurations without building a model). ``uses_data``: ``evaluate`` honours
    ``data`` (user tasks); built-in tasks always use their own evaluation set."""

    name: str
    evaluate_fn: Callable[[Any, Sequence[Feed] | None], dict[str, float]]
    accepts_session: bool
    uses_data: bool
    module: Any = None  # built-in tasks: the module (calibration_feeds / evaluation_feeds)
    # a task with data of its own may score the budget search's comparisons on its *fit* part (the data the
    # passes calibrate on) so that its evaluation set decides only the verdict: ``fit_fn(model) -> metrics``
    fit_fn: Callable[[Any], dict[str, float]] | None = None
    fit_source: str = "the calibration part"  # what fit_fn scores on, in words
    budget_grid: Any = None  # the budget grid (onnxpress.budget.Grid keyword arguments) that suits the task, or None
    # the condition on the task's held-out metrics that decides a lossy -p run's verdict when the user gives
    # neither --accept nor an output tolerance (None: the output comparison decides)
    default_accept: str | None = None
    owns_data: bool = False  # the task reads the user's --calibration / --eval-data itself (llm: text, token ids)

    def evaluate(self, model: Any, data: Sequence[Feed] | None = None) -> dict[str, float]:
        return self.evaluate_fn(model, data)

    def evaluator(self, data: Sequence[Feed] | None = None) -> Evaluate:
        """``model -> metrics`` on ``data``, with the ``accepts_session`` attribute the budget search reads."""

        def evaluate(model: Any) -> dict[str, float]:
            return self.evaluate_fn(model, data)

        evaluate.accepts_session = self.accepts_session  # type: ignore[attr-defined]
        return evaluate

    def fit_evaluator(self) -> Evaluate | None:
        """``model -> metrics`` on the task's fit data (``fit_fn``), or None when the task has no fit part."""
        if self.fit_fn is None:
            return None
        fit_fn = self.fit_fn

        def evaluate(model: Any) -> dict[str, float]:
            return fit_fn(model)

        evaluate.accepts_session = self.accepts_session  # type: ignore[attr-defined]
        return evaluate


def resolve(task: Any, reference: Any, calibration: Any = None, evaluation: Any = None) -> Task | None:
    """``task``: None, a built-in name, ``module:function`` text, or a callable ``fn(session_factory, data)``.
    ``reference``: the original model (path, ir.Model or proto) the relative metrics are computed against.
    ``calibration`` / ``evaluation``: the run's data; a task that ``owns_data`` (llm) reads it itself, other
    tasks leave it to ``rundata``; text data without such a task is refused here."""
    if task is None or not (isinstance(task, str) and task == "llm"):
        from onnxpress.llm.data import LLM_ONLY_SUFFIXES

        for value, what in ((calibration, "calibration"), (evaluation, "evaluation")):
            if isinstance(value, (str, os.PathLike)) and Path(value).suffix.lower() in LLM_ONLY_SUFFIXES:
                raise UsageError(f"{value}: {what} text or token ids need --task llm (a causal LM's tokenizer and KV cache); other models take .npz feeds")
    if task is None:
        return None
    if isinstance(task, Task):
        return task
    builtins = builtin_tasks()
    if isinstance(task, str) and task == "llm":
        return llm_task(reference, calibration=calibration, evaluation=evaluation)
    if isinstance(task, str) and task in builtins:
        return _builtin(task, builtins[task], reference)
    if isinstance(task, str):
        if ":" not in task:
            raise UsageError(f"unknown task '{task}' (built-in: {', '.join([*builtins, 'llm']) or 'none'}; or PKG.MOD:FUNCTION / FILE.py:FUNCTION)")
        fn = load_callable(task)
        name = task
    elif callable(task):
        fn = task
        name = getattr(task, "__name__", "task")
    else:
        raise UsageError(f"task must be a name, 'module:function' or a callable, not {type(task).__name__}")
    return _user(name, fn, reference)


def _user(name: str, fn: Callable[..., Any], reference: Any) -> Task:
    reference_cache: dict[int, dict[str, float]] = {}

    def call(model: Any, data: Sequence[Feed] | None) -> dict[str, float]:
        try:
            result = fn(_session_factory(model), list(data) if data is not None else None)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"task {name} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        return _numbers(result, name)

    def evaluate(model: Any, data: Sequence[Feed] | None) -> dict[str, float]:
        key = id(data)
        if key not in reference_cache:
            reference_cache[key] = call(reference, data)
        metrics = call(model, data)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad and all(not math.isfinite(v) for v in metrics.values()):
            raise UsageError(f"task {name} returned no finite numbers ({', '.join(bad)})")
        return with_relative(metrics, reference_cache[key])

    return Task(name, evaluate, accepts_session=True, uses_data=True)


# built-in tasks whose evaluate() runs feeds through anything with ``get_outputs`` (a session look-alike)
_SESSION_TASKS = ("minilm", "lm")


def _builtin(name: str, module: Any, reference: Any) -> Task:
    ref = reference
    build = getattr(module, "build", None)
    if isinstance(reference, (str, os.PathLike)) and build is not None:
        # the task's own fp32 build: let evaluate() use its cached reference outputs instead of re-running it
        try:
            if Path(reference).resolve() == Path(build()).resolve():
                ref = None
        except Exception:  # noqa: BLE001 - the build may be unavailable; then the reference is run
            pass

    def evaluate(model: Any, data: Sequence[Feed] | None) -> dict[str, float]:
        return with_relative(module.evaluate(model, reference=ref))

    return Task(name, evaluate, accepts_session=name in _SESSION_TASKS, uses_data=False, module=module)


# -- the LLM task: any causal LM with a KV cache, in a folder with its tokenizer ------------------------------
class LLMTaskData:
    """The ``llm`` task's data for ``rundata.prepare``: calibration = prefill feeds (empty past) of the
    calibration sequences plus decode steps; evaluation = prefill feeds of the evaluation sequences. By default
    the 20 calibration and 40 evaluation paragraphs of ``onnxpress.models.llm_text`` (disjoint sets), else the
    user's text or token ids (``onnxpress.llm.data``), tokenized with the model folder's own tokenizer."""

    __name__ = "llm"

    def __init__(self, spec: Any, calibration_ids: list[list[int]], evaluation_ids: list[list[int]], open_session: Callable[[], Any],
                 calibration_source: str = "", evaluation_source: str = "") -> None:
        self.spec, self.calibration_ids, self.evaluation_ids, self.open_session = spec, calibration_ids, evaluation_ids, open_session
        self.calibration_source, self.evaluation_source = calibration_source, evaluation_source

    def calibration_feeds(self) -> list[Feed]:
        from onnxpress.llm import kv

        prefill = list(kv.kv_feeds(self.spec, self.calibration_ids))
        # a session of its own, dropped after: the reference session would sit under the calibration's peak
        decode = list(kv.kv_feeds(self.spec, self.calibration_ids[:4], decode_steps=4, session=self.open_session()))
        return prefill + decode

    def evaluation_feeds(self) -> list[Feed]:
        from onnxpress.llm import kv

        return list(kv.kv_feeds(self.spec, self.evaluation_ids))


# the llm task's verdict for a lossy -p pipeline when the user names no other: the int4 bar (the
# logits/KV-output cosine floor of other models says little about a decoder: int4 at +9% perplexity has
# present-value cosines of 0.96)
LLM_DEFAULT_ACCEPT = "ppl_increase_rel<=10%"
# at most this many user sequences (windows of max_tokens) are calibrated on / evaluated on
LLM_CALIBRATION_LIMIT = 32
LLM_EVALUATION_LIMIT = 64


def llm_task(reference: Any, max_tokens: int = 128, calibration: Any = None, evaluation: Any = None) -> Task:
    """Perplexity on held-out prose and greedy-generation agreement (``onnxpress.llm.task``) of any causal-LM
    ONNX model with a KV cache whose folder holds its tokenizer (an onnxruntime-genai folder, or the output of
    ``onnxpress export --causal-lm``). Budget keys: ``ppl_increase_rel``, ``greedy_agreement``, ``perplexity``.

    ``calibration`` / ``evaluation``: the user's text or token ids (``onnxpress.llm.data``) instead of the
    built-in paragraphs; either may be given alone (the other stays built in, so the two never share text
    unless the user's text does). The reference session is opened on first use, not here."""
    if not isinstance(reference, (str, os.PathLike)):
        raise UsageError("task llm needs the model as a path: its folder holds the tokenizer")
    folder = Path(reference).resolve().parent
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user error
        raise UsageError(f"task llm: no tokenizer in {folder} ({type(exc).__name__}); export with 'onnxpress export --causal-lm'") from None
    from onnxpress import runtime
    from onnxpress.llm import data as token_data
    from onnxpress.llm import kv
    from onnxpress.llm import task as llm
    from onnxpress.models import llm_text

    spec = kv.kv_spec(os.fspath(reference))
    sessions: list[Any] = []

    def session() -> Any:
        if not sessions:
            sessions.append(runtime.make_session(os.fspath(reference)))
        return sessions[0]

    def sequences(value: Any, what: str, texts: list[str], limit: int) -> tuple[list[list[int]], str]:
        if value is None:
            return llm_text.token_ids(tokenizer, texts, max_tokens=max_tokens), f"the task's {what} data (llm: {len(texts)} built-in paragraphs)"
        got = token_data.read(value, tokenizer, max_tokens, what, limit, vocab=len(tokenizer))
        return got.sequences, got.source

    calibration_ids, calibration_source = sequences(calibration, "calibration", llm_text.calibration_texts(), LLM_CALIBRATION_LIMIT)
    evaluation_ids, evaluation_source = sequences(evaluation, "evaluation", llm_text.eval_texts(), LLM_EVALUATION_LIMIT)
    data = llm.LLMData.from_ids(evaluation_ids, n_prompts=10)
    figures: dict[str, Any] = {}

    def evaluate(model: Any, _data: Sequence[Feed] | None) -> dict[str, float]:
        if "ref" not in figures:
            figures["ref"] = llm.reference_figures(session(), data, spec)
        return llm.evaluate(model, figures["ref"], data, spec=spec)

    # the budget search compares configurations on the 20 selection paragraphs (perplexity only: no greedy
    # generation, the costliest part) and the evaluation sequences decide the verdict: held-out truth. Not on
    # the calibration sequences: GPTQ/AWQ fit those, and on SmolLM2 their perplexity increase was a third of the
    # held-out one, so every first build missed and backed off (~330 s of a 19-minute search)
    select_ids = llm_text.token_ids(tokenizer, llm_text.select_texts(), max_tokens=max_tokens)
    fit_data = llm.LLMData.from_ids(select_ids, n_prompts=0)

    def fit(model: Any) -> dict[str, float]:
        if "fit_ref" not in figures:
            figures["fit_ref"] = llm.reference_figures(session(), fit_data, spec)
        return llm.evaluate(model, figures["fit_ref"], fit_data, spec=spec)

    # int8 / int4 per layer: low-rank factors and embedding splits cost a decoder most of the search time
    # (SmolLM2-135M: 1,980 candidates, 19 of 66 minutes refining factorizations) and the result used one
    grid = {"quants": ("int8", "int4/32", "int4/128"), "splits": (), "ratios": ()}
    task = Task("llm", evaluate, accepts_session=True, uses_data=False, fit_fn=fit, budget_grid=grid, default_accept=LLM_DEFAULT_ACCEPT,
                owns_data=True, fit_source=f"{len(select_ids)} selection paragraphs no pass calibrates on")
    task.module = LLMTaskData(spec, calibration_ids, evaluation_ids, lambda: runtime.make_session(os.fspath(reference)), calibration_source, evaluation_source)
    return task
