"""The budget search as one object whose stages run top to bottom (``BudgetSearch.run``):

    prepare_data -> find_layers -> measure_sensitivity -> search_on_path -> refine -> baselines
    -> build_and_verify -> result

Shared state lives on the object: ``layers``; per layer ``tables[li]`` (bytes, d) and ``layer_options[li]``
(FP32 first, then the candidates measured or predicted); ``path`` (the greedy hull moves); ``config``
(layer -> option index) and ``accepted`` (its moves); ``target`` (the budget the search aims at, moved by
back-offs); ``points``, ``attempts``, ``notes`` and ``seconds`` for the report. The algorithm is described
in ``onnxpress.budget``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.budget import cache as sens_cache
from onnxpress.budget.build import build
from onnxpress.budget.layers import FP32, Choice, Grid, Layer, Planners, Recon, choice_bytes, find_layers, local_error, reconstruct, reconstruct_kept, weight_energy
from onnxpress.budget.paths import TINY, Move, greedy_path, lower_hull, search_path
from onnxpress.budget.spec import CONFIDENCE_Z
from onnxpress.budget.progress import Reporter
from onnxpress.budget.result import BudgetResult, LayerDecision, Point
from onnxpress.budget.simulate import Simulator, compare, output_metrics
from onnxpress.budget.spec import OUTPUT_METRICS, Budget
from onnxpress.errors import UsageError
from onnxpress.passes.calib_stats import blas_threads, collect_input_stats

# a predicted candidate is measured when it would matter if its d were this many times smaller than
# predicted (on MiniLM, prediction / measurement is 0.4-5, 80% within 0.7-1.9)
REFINE_SLACK = 4.0


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How hard the search works (``search``'s keyword arguments of the same names)."""

    grid: Grid | None = None  # None: the task's grid (``Task.budget_grid``) or the default ``Grid()``
    jobs: int = 1
    cache: Any = True  # True, a folder, or False
    sensitivity_batches: int = 1
    rounds: int = 3
    size_tol: float = 0.005
    backoff: int = 3
    baselines: bool = False
    predict: bool = True
    refine_rounds: int = 3
    # plain quantizations measured per layer: "all", or "one" (the least and the most compressing; the others
    # interpolated between them on their local errors), "auto" ("one" when the grid has no structural option,
    # whose predictions need every quantization's gain)
    measure_quants: str = "auto"


@dataclasses.dataclass
class Built:
    """One build with the real passes and its verdict."""

    model: Any
    pipeline: str
    metrics: dict[str, Any]
    value: float  # the budget metric on the evaluation (held-out) data
    fit_value: float  # the same on the calibration data
    passed: bool
    config: dict[int, int]


class BudgetSearch:
    """One budget search. ``search`` below is the function to call; this object holds its stages."""

    def __init__(self, model: Any, budget: Budget | str, options: SearchOptions, *, task: Any = None,
                 evaluate: Callable[[Any], dict[str, float]] | None = None) -> None:
        from onnxpress import tasks
        from onnxpress.io import model_bytes

        self.t_start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self.budget = Budget.coerce(budget)
        self.opt = options
        self.jobs = max(1, os.cpu_count() or 1) if options.jobs is None else max(1, int(options.jobs))
        if not self.budget.is_output_metric and evaluate is None and task is None:
            raise UsageError(f"budget on '{self.budget.metric}' is a task metric: give task= (CLI --task NAME or PKG.MOD:FUNCTION) or evaluate=; "
                             f"output budgets are {', '.join(OUTPUT_METRICS)}")
        self.working, self.reference = _as_model(model)
        self.bytes_before = model_bytes(self.reference if isinstance(self.reference, onnx.ModelProto) else self.working)
        self.resolved = tasks.resolve(task, self.reference) if evaluate is None else None
        task_grid = getattr(self.resolved, "budget_grid", None)
        self.grid = options.grid or (Grid(**task_grid) if task_grid else Grid())
        # a user's evaluate() decides both on the fit data and for the verdict; a task has one of each
        self.evaluate = self.evaluate_verdict = evaluate
        self.target = self.budget
        self.points: list[Point] = []
        self.attempts: list[dict[str, Any]] = []
        self.checked: dict[tuple[tuple[int, int], ...], float] = {}  # configuration -> measured budget metric
        self._sim: Simulator | None = None
        self._tick: Callable[..., None] = lambda *a, **k: None  # the progress of the stage searching now

    # -- data ---------------------------------------------------------------------------------------------
    def prepare_data(self, calibration: Any, evaluation: Any, holdout: Any, data: Any, base: str | None) -> None:
        """Fit (calibration) and verdict (evaluation) feeds, the base pipeline, the task's evaluators."""
        from onnxpress import rundata
        from onnxpress.data import generate_inputs
        from onnxpress.pass_infra import PassContext
        from onnxpress.passes import DEFAULT_PIPELINE
        from onnxpress.pipeline import Pipeline

        # No lossless pipeline by default: onnxsim turns MatMul+Add into Gemm, which int4 does not cover.
        base_text = "" if base is None else (DEFAULT_PIPELINE if base == "default" else base)
        base_pipe = Pipeline.parse(base_text)
        self.base_text = base_text
        # The search fits to the calibration data and decides on held-out data (``onnxpress.rundata``): with
        # calibration only, a seeded part of it is held out and never seen by the passes or the search.
        if data is None:
            data = rundata.prepare(self.working, calibration=calibration, evaluation=evaluation, holdout=holdout,
                                   task=self.resolved.module if self.resolved is not None else None)
        elif calibration is not None or evaluation is not None:
            raise UsageError("give data= (a prepared rundata.RunData) or calibration=/evaluation=, not both")
        self.data = data
        calib, eval_feeds, self.evaluation_label = data.calibration, data.evaluation, data.evaluation_source
        if calib is None:
            calib = [generate_inputs(self.working, seed=i) for i in range(4)]
            self.notes.append("no calibration data given: fitted on 4 generated input batches (pass calibration= for real data)")
        if eval_feeds is None:
            eval_feeds = [generate_inputs(self.working, seed=100 + i) for i in range(4)]
            self.evaluation_label = "generated random inputs (no real data given: the last resort), other seeds than the fit inputs"
        self.calib, self.eval_feeds = calib, eval_feeds
        if len(base_pipe):
            self.working = base_pipe.run(self.working, context=PassContext(calibration=calib)).model
        # task metrics: the search compares configurations on the fit data where the task takes data (user tasks)
        resolved = self.resolved
        if resolved is not None:
            self.evaluate = resolved.evaluator(calib if resolved.uses_data else None)
            self.evaluate_verdict = resolved.evaluator(eval_feeds if resolved.uses_data else None)
            fit = resolved.fit_evaluator()
            if fit is not None:
                self.evaluate = fit
                self.notes.append(f"task {resolved.name} compares configurations on its fit data ({resolved.fit_source}) and decides on its held-out evaluation set")
            elif not resolved.uses_data:
                self.notes.append(f"task {resolved.name} scores every configuration on its own evaluation set (the passes fit only the calibration data)")
        if not self.budget.is_output_metric:
            on = self.evaluation_label if resolved is not None and resolved.uses_data else "its own evaluation set"
            self.evaluation_label = f"task {resolved.name if resolved else 'evaluate()'} on " + on
        self.sens_feeds = calib[: max(1, self.opt.sensitivity_batches)]

    def run(self, progress: Any) -> BudgetResult:
        """Every stage after ``prepare_data``, with progress; the result."""
        with Reporter(progress) as self.rep:
            self.find_layers()
            self.measure_sensitivity()
            self.search_on_path()
            self.refine()
            if self.opt.baselines:
                self.baselines()
            self.build_and_verify()
        return self.result()

    # -- layers, statistics ---------------------------------------------------------------------------------
    def find_layers(self) -> None:
        t0 = time.perf_counter()
        self.planners = Planners.registered()
        self.layers, self.skipped = find_layers(self.working, self.grid, self.planners, self.calib)
        if not self.layers:
            raise UsageError("the model has no MatMul/Gemm/Conv/Gather weights the lossy passes can rewrite")
        with self.rep.stage("input statistics", 1) as advance:
            self.stats = collect_input_stats(self.working, self.calib, [layer.x for layer in self.layers if layer.x is not None])
            advance()
        self.seconds["statistics"] = time.perf_counter() - t0

    # -- sensitivity: every (layer, candidate) alone ----------------------------------------------------------
    def measure_sensitivity(self) -> None:
        """``tables`` and ``layer_options``: per layer its candidates' exact bytes and their ``d`` alone
        (plain quantizations measured; factorizations predicted from the layer's gain when ``predict``)."""
        t0 = time.perf_counter()
        layers = self.layers
        self.runtime_quantized: dict[str, bool] = {}  # storage option -> its input quantization checked on this model
        act_blocks = {layer.name: sorted({b for c in layer.choices if (b := self.act_block(layer, c, checked=False)) is not None}) for layer in layers}
        self._sim_args = (layers, [layer for layer in layers if any(c.structure is not None for c in layer.choices)],
                          {name: blocks for name, blocks in act_blocks.items() if blocks})
        self.check_runtime_quantization()
        if not self.budget.is_output_metric:
            # fail fast on a metric the task does not report, or a budget the original model misses itself
            original_value = _task_value(self.evaluate, self.task_model({}), self.budget.metric)
            if not self.budget.ok(original_value):
                raise UsageError(f"the original model does not meet the budget itself: {self.budget.metric} = {original_value:.6g} (budget {self.budget})")
            self.checked[()] = original_value
        hot_sizes = {layer.name: int(layer.hot.size) for layer in layers if layer.hot is not None}
        key = sens_cache.digest(self.working, self.sens_feeds, json.dumps([sens_cache.CACHE_VERSION, dataclasses.asdict(self.grid), hot_sizes]))
        cache_path = sens_cache.cache_file(self.opt.cache, key)
        self.cached = sens_cache.load(cache_path)
        self.recon_memo: dict[tuple[int, Choice], Recon] = {}
        self.tables: list[list[tuple[float, float]]] = []
        self.layer_options: list[list[Choice]] = []
        self.candidates: list[dict[str, Any]] = []
        self.predicted: set[tuple[int, Choice]] = set()  # (layer, choice) whose d is predicted, not measured yet
        self.local_errors: dict[tuple[int, Choice], float] = {}
        self.energies: dict[int, float] = {}  # layer -> tr(W^T S W), the denominator of its local errors
        self.quant_predicted: set[tuple[int, Choice]] = set()  # plain quantizations interpolated between their layer's anchors
        self.last_reader = {layer.x: li for li, layer in enumerate(layers) if layer.x is not None}
        self.measure_quants = self.opt.measure_quants
        if self.measure_quants not in ("auto", "all", "one"):
            raise UsageError(f"measure_quants must be 'auto', 'all' or 'one', not '{self.measure_quants}'")
        if self.measure_quants == "auto":  # with no structural option, nothing needs every quantization's gain
            self.measure_quants = "all" if any(c.structure is not None for layer in layers for c in layer.choices) else "one"
        self.sim.references(self.sens_feeds)
        with self.rep.stage("sensitivity (layer x candidate)", sum(len(layer.choices) for layer in layers)) as advance, blas_threads(1):
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) if self.jobs > 1 else None
            try:
                for li in range(len(layers)):
                    self._layer_sensitivity(li, pool, advance)
            finally:
                if pool is not None:
                    pool.shutdown()
        sens_cache.save(cache_path, self.cached)
        self.seconds["sensitivity"] = time.perf_counter() - t0

    def _layer_sensitivity(self, li: int, pool: Any, advance: Callable[..., None]) -> None:
        """One layer's table: groups of candidates, the plain quantizations first (measured, or with
        ``measure_quants="one"`` the least and the most compressing, the others interpolated), then one
        group per ratio (largest first); a ratio whose error alone passes ``max_layer_error`` ends the layer."""
        layer = self.layers[li]
        table = [(float(layer.fp32_bytes), 0.0)]
        tried: list[Choice] = []
        groups = [[c for c in layer.choices if c.structure is None]]
        for option in dict.fromkeys(c.structure for c in layer.choices if c.structure is not None):  # least compressing first
            groups.append([c for c in layer.choices if c.structure == option])
        gain = None
        for gi, group in enumerate(groups):
            if gi == 1 and self.opt.predict:
                gain = self.layer_gain(li, tried, table)
            anchors = self._quant_anchors(li, group) if gi == 0 else ()
            todo = [c for c in group if f"{layer.name}|{c.label}" not in self.cached and gain is None]
            # candidates are computed on the pool while onnxruntime measures the ones ready
            futures = {c: pool.submit(self.recon, li, c) for c in todo} if pool is not None and len(todo) > 1 else {}
            group_best = float("inf")
            if anchors:  # the anchors first: the group's other candidates are interpolated between them
                group = [*anchors, *(c for c in group if c not in anchors)]
            for c in group:
                if anchors and c not in anchors:
                    d = self._interpolated_d(li, c, anchors, [table[1 + tried.index(a)][1] for a in anchors])
                else:
                    d = self._candidate_d(li, c, gain, futures)
                nbytes = choice_bytes(self.planners, layer, c)
                table.append((float(nbytes), d))
                tried.append(c)
                group_best = min(group_best, d)
                self.candidates.append({"layer": layer.name, "op": layer.op, "choice": c.label, "technique": c.technique, "bytes_before": layer.fp32_bytes,
                                        "bytes": nbytes, "d": d, "measured": (li, c) not in self.predicted and (li, c) not in self.quant_predicted})
                advance()
            if gi > 0 and group_best > self.grid.max_layer_error:
                skipped_count = sum(len(g) for g in groups[gi + 1 :])
                if skipped_count:
                    advance(skipped_count)
                break
        order = sorted(range(len(tried)), key=lambda i: layer.choices.index(tried[i]))  # the layer's own order
        tried, rows = [tried[i] for i in order], [table[1 + i] for i in order]
        table = [table[0], *rows]
        opts = [FP32, *tried]
        self.tables.append(table)
        self.layer_options.append(opts)
        # keep the reconstructions on this layer's hull (the search) and the plain quantizations (the uniform
        # baselines); drop the others
        keep = {opts[i] for i in lower_hull(table)}
        for c in tried:
            if c not in keep and c.structure is not None:
                self.recon_memo.pop((li, c), None)
        self._release_inputs(li)

    def _quant_anchors(self, li: int, group: Sequence[Choice]) -> tuple[Choice, ...]:
        """With ``measure_quants="one"``: the plain quantizations of layer ``li`` that are measured, the least and the
        most compressing; the others are interpolated between them (``_interpolated_d``). Empty: every one is measured."""
        layer = self.layers[li]
        if self.measure_quants != "one" or layer.x is None or len(group) < 3:
            return ()
        by_bytes = sorted(group, key=lambda c: choice_bytes(self.planners, layer, c))
        return (by_bytes[-1], by_bytes[0])

    def _interpolated_d(self, li: int, c: Choice, anchors: Sequence[Choice], anchor_d: Sequence[float]) -> float:
        """``d`` of a plain quantization between the two measured anchors of its layer, linear in the layer's local
        (weight) error: the run-time quantization of the input, which the local error does not see, is in both
        anchors' measurements (int8 and int4/32 quantize it in the same blocks); a cached measurement wins."""
        key = f"{self.layers[li].name}|{c.label}"
        if key in self.cached:
            return float(self.cached[key])
        (lo, hi), (d_lo, d_hi) = anchors, anchor_d
        e_lo, e_hi, e = self.local(li, lo), self.local(li, hi), self.local(li, c)
        if not e_hi > e_lo:
            return self.measure_alone(li, c)
        self.quant_predicted.add((li, c))
        return d_lo + min(max((e - e_lo) / (e_hi - e_lo), 0.0), 1.0) * (d_hi - d_lo)

    def _release_inputs(self, li: int) -> None:
        """After the last layer reading an input: the storage planner's factors for it go (``release``), and its
        statistics too where no reader has a structural choice (only predictions and refinement read them later;
        every plain reconstruction is kept)."""
        x = self.layers[li].x
        if x is None or self.last_reader.get(x) != li:
            return
        release = getattr(self.planners.storage, "release", None)
        if release is not None:
            release(x)
        readers = [(ri, layer) for ri, layer in enumerate(self.layers) if layer.x == x]
        if any(c.structure is not None for _, layer in readers for c in layer.choices):
            return
        # a cached d skips its reconstruction here, and the search makes it later from these statistics: keep them
        # unless every plain reconstruction of every reader is already made
        if all((ri, c) in self.recon_memo for ri, layer in readers for c in layer.choices if c.structure is None):
            self.stats.pop(x, None)

    def _candidate_d(self, li: int, c: Choice, gain: float | None, futures: dict[Choice, Any]) -> float:
        """``d`` of one candidate: from the cache, predicted from the layer's gain, or measured."""
        key = f"{self.layers[li].name}|{c.label}"
        if key in self.cached:
            return float(self.cached[key])
        if c in futures:
            futures[c].result()
        if gain is not None:
            self.predicted.add((li, c))
            return self.predict_d(li, c, gain)
        return self.measure_alone(li, c)

    def recon(self, li: int, choice: Choice) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias delta) of layer ``li`` rewritten by ``choice``; kept compact (``layers.Recon``)."""
        key = (li, choice)
        kept = self.recon_memo.get(key)
        if kept is None:
            layer = self.layers[li]
            kept = self.recon_memo[key] = reconstruct_kept(self.planners, layer, choice, self.stats.get(layer.x) if layer.x else None)
        return kept.weight(), kept.delta

    @property
    def sim(self) -> Simulator:
        """The simulation session, made on first use and again after ``drop_simulator``."""
        if self._sim is None:
            layers, with_bias, act_blocks = self._sim_args
            self._sim = Simulator(self.working, layers, with_bias, threads=self.jobs, act_blocks=act_blocks)
        return self._sim

    def drop_simulator(self) -> None:
        """Free the simulation session (its copy of every weight: ~0.6 GB on SmolLM2) while the passes build and the
        built model is verified; a search after a back-off makes it again (seconds)."""
        self._sim = None

    def act_block(self, layer: Layer, c: Choice, checked: bool = True) -> int | None:
        """The block in which ``c``'s kernel quantizes the layer's input at run time (the storage planner's
        ``activation_block``; ``checked``: where that depends on the session, only if ``check_runtime_quantization``
        saw it), or None."""
        block_of = getattr(self.planners.storage, "activation_block", None)
        if block_of is None or c.structure is not None or c.storage is None:
            return None
        if checked and not self.runtime_quantized.get(c.storage, True):
            return None
        return block_of(layer, c.storage)

    def check_runtime_quantization(self) -> None:
        """For each storage option whose run-time input quantization depends on the session's fusions (the
        planner's ``activation_block_measured``), build it with the real pass on one layer (MSE rounding, no
        calibration) and see on one fit feed whether onnxruntime's output is the simulation's with the input
        quantized or without: whichever is closer decides for every layer."""
        from onnxpress import runtime

        measured = getattr(self.planners.storage, "activation_block_measured", None)
        if measured is None:
            return
        options = dict.fromkeys(c.storage for layer in self.layers for c in layer.choices
                                if c.structure is None and c.storage is not None and measured(c.storage))
        for option in options:
            choice = Choice(None, option)
            layer = next((lay for lay in self.layers if choice in lay.choices and self.act_block(lay, choice, checked=False) is not None), None)
            if layer is None:
                continue
            w, delta = reconstruct(self.planners, layer, choice, None)
            built, _ = build(self.working, {layer.name: choice}, [], self.planners)
            session = runtime.make_session(built, threads=self.jobs)
            real = [runtime.run(session, feed, self.sim.output_names) for feed in self.sens_feeds[:1]]
            del session, built
            with_input = compare(self.sim.run(self.sens_feeds[:1], self.sim.override(layer, w, delta, self.act_block(layer, choice, checked=False))), real).d
            without = compare(self.sim.run(self.sens_feeds[:1], self.sim.override(layer, w, delta)), real).d
            self.runtime_quantized[option] = with_input < without
            self.notes.append(f"{option}: onnxruntime {'quantizes' if with_input < without else 'does not quantize'} the layer input at run time "
                              f"(checked on {layer.name}); the simulation {'does' if with_input < without else 'does not'} too")

    def measure_alone(self, li: int, c: Choice) -> float:
        """``d`` of candidate ``c`` applied to layer ``li`` alone, measured in the simulation session."""
        layer = self.layers[li]
        w, delta = self.recon(li, c)
        d = self.sim.error(self.sens_feeds, self.sim.override(layer, w, delta, self.act_block(layer, c)), per_sample=False).d
        self.cached[f"{layer.name}|{c.label}"] = d
        return d

    def local(self, li: int, c: Choice) -> float:
        """The layer's own relative output error of candidate ``c`` (``layers.local_error``), memoised."""
        key = (li, c)
        if key not in self.local_errors:
            layer = self.layers[li]
            if li not in self.energies:
                self.energies[li] = weight_energy(layer, self.stats[layer.x])
            self.local_errors[key] = local_error(layer, self.recon(li, c)[0], self.stats[layer.x], self.energies[li])
        return self.local_errors[key]

    def layer_gain(self, li: int, measured: Sequence[Choice], table: Sequence[tuple[float, float]]) -> float | None:
        """How much of a layer's own relative output error reaches the model output (d / local error), from
        its measured quantizations (geometric mean); None when it cannot be estimated."""
        layer = self.layers[li]
        if layer.x is None:
            return None
        ratios = []
        for i, c in enumerate(measured, start=1):
            if c.structure is not None:
                continue
            e = self.local(li, c)
            if e > 0 and table[i][1] > 0:
                ratios.append(math.log(table[i][1] / e))
        return math.exp(sum(ratios) / len(ratios)) if ratios else None

    def predict_d(self, li: int, c: Choice, gain: float) -> float:
        """Predicted d of a factorization candidate: gain x (discarded output energy + the local error of
        quantizing the whole weight the same way, a stand-in for quantizing the factors)."""
        layer = self.layers[li]
        e_quant = self.local_errors.get((li, Choice(None, c.storage)), 0.0) if c.storage is not None else 0.0
        structural = self.planners.structural.predicted_error(layer, c.structure, self.stats[layer.x])
        if structural is None:  # the planner has no cheap estimate: measure (and say so in the report)
            self.predicted.discard((li, c))
            return self.measure_alone(li, c)
        return gain * (structural + e_quant)

    # -- configurations -------------------------------------------------------------------------------------
    def config_bytes(self, config: dict[int, int]) -> int:
        return int(self.working_bytes - self.base_weight_bytes + sum(self.tables[li][config.get(li, 0)][0] for li in range(len(self.layers))))

    def config_d(self, config: dict[int, int]) -> float:
        return float(sum(self.tables[li][o][1] for li, o in config.items()))

    def overrides(self, config: dict[int, int]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for li, o in config.items():
            if o == 0:
                continue
            c = self.layer_options[li][o]
            w, delta = self.recon(li, c)
            out.update(self.sim.override(self.layers[li], w, delta, self.act_block(self.layers[li], c)))
        return out

    def task_model(self, over: dict[str, np.ndarray]) -> Any:
        """What a task's evaluate() scores: an evaluate() marked ``accepts_session`` gets the simulation session
        with the overrides fed; any other a standalone model with the reconstructions written in."""
        return self.sim.session_with(over) if getattr(self.evaluate, "accepts_session", False) else self.sim.materialize(over)

    def measure(self, config: dict[int, int]) -> float:
        """The budget metric of a configuration on the fit data, simulated (each configuration once)."""
        key = tuple(sorted((li, o) for li, o in config.items() if o))
        if key not in self.checked:
            over = self.overrides(config)
            if self.budget.is_output_metric:
                value = self.sim.error(self.calib, over).metrics()[self.budget.metric]
            else:
                value = _task_value(self.evaluate, self.task_model(over), self.budget.metric)
            self.checked[key] = value
        return self.checked[key]

    # -- the search on the greedy path ------------------------------------------------------------------------
    def probe(self, config: dict[int, int]) -> float:
        """The margin of ``config`` against the current target (>= 0: passes); recorded as a path point."""
        value = self.measure(config)
        ok = self.target.ok(value)
        self.points.append(Point(f"{sum(1 for o in config.values() if o)} layers rewritten", self.config_bytes(config), self.config_d(config), value, ok, "path"))
        self._tick()
        return self.target.margin(value)

    def _search_stage(self, name: str) -> None:
        """Search the current path (``config``, ``accepted``) under a progress stage called ``name``."""
        with self.rep.stage(name, 2 * int(math.log2(len(self.path) + 1) + 1) * max(self.opt.rounds, 1)) as advance:
            self._tick = advance
            original = self.checked.get((), self.budget.ideal)  # the unchanged model's value (its ideal for output metrics)
            margin0 = self.target.margin(original) if original is not None else None
            self.config, self.accepted = search_path(self.path, self.probe, self.opt.rounds, size_tol=self.opt.size_tol, size0=float(self.working_bytes),
                                                     margin0=margin0)

    def search_on_path(self) -> None:
        from onnxpress.io import model_bytes

        t0 = time.perf_counter()
        self.path = self._greedy_path()
        self.base_weight_bytes = sum(t[0][0] for t in self.tables)
        self.working_bytes = model_bytes(self.working)
        self._search_stage("search (verified configurations)")
        self.seconds["search"] = time.perf_counter() - t0

    # -- refine: measure the predicted candidates the search uses or could use, then search again -------------
    def refine(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.opt.refine_rounds if self.predicted else 0):
            todo = self.relevant_predictions(self.config, self.accepted)
            if not todo:
                break
            with self.rep.stage("sensitivity (predicted candidates the search may use)", len(todo)) as advance, blas_threads(1):
                for li, c in todo:
                    o = self.layer_options[li].index(c)
                    d = self.measure_alone(li, c)
                    self.tables[li][o] = (self.tables[li][o][0], d)
                    self.predicted.discard((li, c))
                    for row in self.candidates:
                        if row["layer"] == self.layers[li].name and row["choice"] == c.label:
                            row.update(d=d, measured=True)
                    advance()
            self.path = self._greedy_path()
            self._search_stage("search again (measured candidates)")
        self.seconds["refine"] = time.perf_counter() - t0

    def relevant_predictions(self, config: dict[int, int], accepted: Sequence[Move]) -> list[tuple[int, Choice]]:
        """Predicted candidates the chosen configuration uses, or whose hull move, with the prediction
        REFINE_SLACK times too pessimistic, is as efficient as the best move the search had to reject (the
        price the budget sets): only these can change the result once measured."""
        taken = set(accepted)
        price = max((m.efficiency for m in self.path if m not in taken), default=0.0)
        out: list[tuple[int, Choice]] = []
        for li, table in enumerate(self.tables):
            opts = self.layer_options[li]
            # optimistic: every prediction REFINE_SLACK times too high (on the hull and efficient enough?)
            hopeful = [(nbytes, d / REFINE_SLACK if (li, opts[o]) in self.predicted else d) for o, (nbytes, d) in enumerate(table)]
            hull = lower_hull(hopeful)
            on_hull = [b for b in hull[1:] if (li, opts[b]) in self.predicted]
            relevant = any(
                config.get(li, 0) == b or (hopeful[a][0] - hopeful[b][0]) / max(hopeful[b][1] - hopeful[a][1], TINY) >= price
                for a, b in zip(hull, hull[1:])
                if (li, opts[b]) in self.predicted
            )
            # a layer with one relevant prediction gets all its hull predictions measured at once: its
            # neighbours on the hull tend to become relevant next, and each round costs a search
            if relevant:
                out.extend((li, opts[b]) for b in on_hull)
            o = config.get(li, 0)
            if o and (li, opts[o]) in self.predicted and (li, opts[o]) not in out:
                out.append((li, opts[o]))
        return out

    # -- uniform baselines (report and plot) ------------------------------------------------------------------
    def baselines(self) -> None:
        t0 = time.perf_counter()
        with self.rep.stage("uniform baselines", 3) as advance:
            for quant in ("int8", "int4/32", "int4/128"):
                cfg: dict[int, int] = {}
                for li, opts in enumerate(self.layer_options):
                    pick = Choice(None, quant) if Choice(None, quant) in opts else (Choice(None, "int8") if Choice(None, "int8") in opts else None)
                    if pick is not None:
                        cfg[li] = opts.index(pick)
                value = self.measure(cfg)
                label = f"all {quant}" + (" (int8 where int4 does not apply)" if quant != "int8" else "")
                self.points.append(Point(label, self.config_bytes(cfg), self.config_d(cfg), value, self.budget.ok(value), "baseline"))
                advance()
        self.seconds["baselines"] = time.perf_counter() - t0

    # -- build with the real passes, verify on held-out data, back off ------------------------------------------
    def build_and_verify(self) -> None:
        """Build the configuration with the real passes and verify it on the evaluation data; when it fails,
        drop the fit-dependent options in the build first (the embedding split: the sharpest overfit), else tighten the target and search again;
        after ``backoff`` such rounds (+1 for the split) the lossless model is the last resort."""
        t0 = time.perf_counter()
        self._reference_outputs()
        self.final: Built | None = None
        fit_dependent_banned = False
        builds: list[tuple[float, float]] = []  # (simulated fit value, held-out value) of the builds that missed
        backoff = self.opt.backoff
        with self.rep.stage("build and verify", backoff + 1) as advance:
            for attempt in range(backoff + 3):  # + 1: a held-out failure with a fit-dependent option first drops those options
                last_resort = attempt == backoff + 2
                if last_resort:
                    self.config = {}
                    self.notes.append("no configuration met the budget when built with the real passes: returned the lossless model")
                simulated = self.measure(self.config)  # before the simulation session goes
                self.drop_simulator()
                self.final = None  # a failed build's model goes before the next is built
                built, check_rows = self._build_once(simulated)
                advance()
                self.final = built
                if built.passed or last_resort:
                    break
                if self.budget.ok(built.fit_value):
                    self.notes.append(f"attempt {attempt + 1}: {self.budget.metric} {built.fit_value:.6g} on the calibration data but {built.value:.6g} on held-out data: "
                                      "the calibration set looks too small or unrepresentative; backing off")
                if check_rows and not fit_dependent_banned:
                    fit_dependent_banned = True
                    self._ban_fit_dependent(check_rows)
                    continue
                builds.append((simulated, built.value))
                self.target = self.budget.aimed(builds)
                if not np.isfinite(self.target.value):
                    self.config = {}
                    continue
                self._search_stage(f"search again (target tightened to {self.target.value:.6g})")
        self.seconds["build"] = time.perf_counter() - t0

    def _reference_outputs(self) -> None:
        """The original model's float outputs on the evaluation and the fit data (output-metric budgets)."""
        self.reference_outputs = self.fit_reference = None
        if self.budget.is_output_metric:
            from onnxpress import runtime

            ref_session = runtime.make_session(self.reference, threads=self.jobs)
            self.reference_outputs = [_float_outputs(runtime.run(ref_session, f)) for f in self.eval_feeds]
            self.fit_reference = [_float_outputs(runtime.run(ref_session, f)) for f in self.calib]

    def _build_once(self, simulated: float) -> tuple[Built, list[dict[str, Any]]]:
        """Build ``config``, measure it on held-out and fit data; (the build, the embedding splits' held-out
        coverage). ``simulated``: the configuration's simulated value on the fit data. Appends the attempt to
        ``attempts``."""
        from onnxpress.io import model_bytes
        from onnxpress.pipeline import Pipeline

        config, layers = self.config, self.layers
        decisions = {layers[li].name: self.layer_options[li][o] for li, o in config.items() if o}
        built_model, lossy_passes = build(self.working, decisions, self.calib, self.planners, self.grid.structural_options)
        text = ",".join(p for p in [self.base_text.strip(), str(Pipeline(lossy_passes))] if p)
        if self.budget.is_output_metric:
            metrics = output_metrics(built_model, self.eval_feeds, self.reference_outputs, threads=self.jobs).metrics()
            fit_metrics = output_metrics(built_model, self.calib, self.fit_reference, threads=self.jobs).metrics()
        else:
            metrics = dict(self.evaluate_verdict(built_model))
            fit_metrics = dict(self.evaluate(built_model)) if self.evaluate is not self.evaluate_verdict else dict(metrics)
        value = float(metrics[self.budget.metric])
        fit_value = float(fit_metrics[self.budget.metric])
        standard_error = float(metrics.get(f"{self.budget.metric}_se", 0.0))
        ok = self.budget.ok_with_confidence(value, standard_error)
        if self.budget.ok(value) and not ok:
            self.notes.append(f"held-out {self.budget.metric} {value:.6g} meets the budget, but not by {CONFIDENCE_Z} standard errors "
                              f"(s.e. {standard_error:.3g} over {len(self.eval_feeds)} held-out feeds): not enough evidence; backing off")
        check_rows = self._heldout_checks(config)
        self.attempts.append({"pipeline": text, "bytes": model_bytes(built_model), "value": value, "fit_value": fit_value,
                              "standard_error": standard_error, "simulated": simulated, "passed": ok, "target": self.target.value,
                              "heldout_checks": check_rows})
        return Built(built_model, text, metrics, value, fit_value, ok, dict(config)), check_rows

    def _heldout_checks(self, config: dict[int, int]) -> list[dict[str, Any]]:
        """The planners' held-out checks of the fit-dependent options in ``config`` (``heldout_check``: e.g. how
        many held-out token occurrences an embedding split stores in 2-bit rows), one row each."""
        rows = []
        for li, o in config.items():
            choice = self.layer_options[li][o]
            for planner, option in ((self.planners.structural, choice.structure), (self.planners.storage, choice.storage)):
                check = getattr(planner, "heldout_check", None)
                row = check(self.working, self.layers[li], option, self.eval_feeds) if (o and option is not None and check) else None
                if row is not None:
                    rows.append({**row, "option": option})
        return rows

    def _greedy_path(self) -> list[Move]:
        """The greedy path over the tables, without moves into rejected options (error set to infinity, e.g.
        embedding splits the held-out check rejected) or beyond them on the same layer: an infinite error still
        sits on a layer's hull (it saves the most bytes), and the path search, which measures the fit set, would
        take it again."""
        path: list[Move] = []
        blocked: set[int] = set()
        for move in greedy_path(self.tables):
            if move.layer in blocked:
                continue
            if not math.isfinite(self.tables[move.layer][move.dst][1]):
                blocked.add(move.layer)
                continue
            path.append(move)
        return path

    def _ban_fit_dependent(self, check_rows: Sequence[dict[str, Any]]) -> None:
        """Options fitted to the calibration data beyond its statistics overfit first (the embedding split:
        rows the calibration data never indexed are 2-bit). When the held-out verdict fails with such options
        in the build, every option of theirs' kind leaves the tables and the path is searched again."""
        for what in dict.fromkeys(r["what"] for r in check_rows):
            rows = [r for r in check_rows if r["what"] == what]
            misfit = sum(r["misfit"] for r in rows) / len(rows)
            self.notes.append(f"{', '.join(sorted({r['option'] for r in rows}))} rejected by the held-out check ({misfit:.1%} {what})")
        kinds = {r["option"].split("/")[0] for r in check_rows}
        for li, opts in enumerate(self.layer_options):
            for oi, c in enumerate(opts):
                if any(o is not None and o.split("/")[0] in kinds for o in (c.structure, c.storage)):
                    self.tables[li][oi] = (self.tables[li][oi][0], math.inf)
        self.path = self._greedy_path()
        self._search_stage(f"search again (without {', '.join(sorted(kinds))})")

    # -- the result -------------------------------------------------------------------------------------------
    def result(self) -> BudgetResult:
        from onnxpress.io import model_bytes
        from onnxpress.pipeline import stamp_metadata

        final = self.final
        assert final is not None
        stamp_metadata(final.model, final.pipeline)
        config = final.config
        layer_rows = []
        for li, layer in enumerate(self.layers):
            o = config.get(li, 0)
            c = self.layer_options[li][o]
            describe = getattr(self.planners.structural, "describe", None)
            rank = describe(layer, c.structure).get("rank") if (c.structure is not None and describe) else None
            layer_rows.append(LayerDecision(layer.name, layer.op, layer.shape, c.label, layer.fp32_bytes, int(self.tables[li][o][0]), float(self.tables[li][o][1]), rank))
        bytes_after = model_bytes(final.model)
        self.points.append(Point("chosen (built with the passes)", bytes_after, self.config_d(config), final.value, final.passed, "built"))
        self.seconds["total"] = time.perf_counter() - self.t_start
        skipped = list(self.skipped)
        for layer in self.layers:
            for tech, reason in layer.skipped.items():
                skipped.append({"layer": layer.name, "op": layer.op, "skipped": f"{tech}: {reason}"})
        return BudgetResult(
            budget=self.budget, pipeline=final.pipeline, model=final.model, bytes_before=self.bytes_before, bytes_after=bytes_after,
            predicted_bytes=self.config_bytes(config), value=final.value, fit_value=final.fit_value, passed=final.passed,
            metrics={k: float(v) for k, v in final.metrics.items() if isinstance(v, (int, float))},
            layers=layer_rows, candidates=self.candidates, points=self.points, attempts=self.attempts, seconds=self.seconds, notes=self.notes,
            skipped=skipped, evaluation=self.evaluation_label, data=self.data.to_dict(),
        )


def search(
    model: Any,
    budget: Budget | str,
    calibration: Any = None,
    *,
    evaluation: Any = None,
    holdout: float | int | None = None,
    data: Any = None,
    task: Any = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    base: str | None = None,
    grid: Grid | None = None,
    jobs: int | None = 1,
    cache: bool | str | os.PathLike = True,
    sensitivity_batches: int = 1,
    rounds: int = 3,
    size_tol: float = 0.005,
    backoff: int = 3,
    baselines: bool = False,
    predict: bool = True,
    refine_rounds: int = 3,
    measure_quants: str = "auto",
    progress: Any = False,
) -> BudgetResult:
    """Find the smallest per-layer mix of factorization and quantization that meets ``budget``.

    ``model``: path, ir.Model or ModelProto (never modified). ``budget``: text or ``Budget``.
    ``calibration``: feeds (list of dicts) or a path (.npz / folder), used by the calibrated passes and
    for the sensitivity analysis (the first ``sensitivity_batches`` batches); default: the task's
    calibration feeds, else 4 generated batches. ``evaluation``: feeds the budget is verified on (default: a
    held-out part of the calibration data, ``holdout``: ``onnxpress.rundata``); ``data``: an already prepared
    ``rundata.RunData`` instead of both. ``task`` (``digits``, ``minilm``, ``lm``) or ``evaluate``
    (``model -> dict of metrics``) is needed for a task-metric budget; an ``evaluate`` with the attribute
    ``accepts_session = True`` is handed an ``InferenceSession`` look-alike during the search (no model is
    written per configuration) and the built model at the end. ``base``: pipeline text run
    first (default none; ``"default"``: onnxpress's lossless default pipeline, whose ``simplify`` turns
    MatMul+Add into Gemm, which ``qdq(mode=int4)`` does not cover). ``jobs``: threads for onnxruntime and
    for computing candidates (default 1; None: all cores). ``rounds``: how many times the search continues past a layer whose
    move broke the budget; ``size_tol``: the search on the path stops when the bytes it could still gain
    are below this fraction of the passing configuration's size. ``baselines``: also measure int8 / int4
    everywhere (for the report and plot; a few more checks). ``predict``: measure only the plain
    quantizations of every layer; predict the factorization candidates' errors from the layer's gain
    (measured d / its own output error) and measure, after a first search, only those the search uses or
    could use (``refine_rounds`` times at most); False measures every candidate. ``measure_quants``: "all" plain
    quantizations of a layer measured, or "one" (the least and the most compressing; the others interpolated on
    their local errors: two thirds of the model runs on a decoder's int8/int4/32/int4/128 grid); "auto": "one"
    when the grid has no structural option. ``cache``: True (``$ONNXPRESS_CACHE`` or
    ``~/.cache/onnxpress``), a folder, or False. Returns a ``BudgetResult``.
    """
    options = SearchOptions(grid=grid, jobs=jobs, cache=cache, sensitivity_batches=sensitivity_batches, rounds=rounds, size_tol=size_tol,
                            backoff=backoff, baselines=baselines, predict=predict, refine_rounds=refine_rounds,
                            measure_quants=measure_quants)
    runner = BudgetSearch(model, budget, options, task=task, evaluate=evaluate)
    runner.prepare_data(calibration, evaluation, holdout, data, base)
    return runner.run(progress)


# -- helpers ----------------------------------------------------------------------------------------------------
def _as_model(model: Any) -> tuple[ir.Model, Any]:
    """(working ir.Model copy, reference for evaluate/validate: a path string or a proto)."""
    from onnxpress.io import load

    if isinstance(model, (str, os.PathLike)):
        return load(model), os.fspath(model)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"cannot search a budget for {type(model).__name__}")
    return ir.serde.deserialize_model(proto), proto


def _float_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _task_value(evaluate: Callable[[Any], dict[str, float]], model: Any, metric: str) -> float:
    metrics = evaluate(model)
    if metric not in metrics:
        raise UsageError(f"the task's evaluate() has no metric '{metric}' (it reports: {', '.join(sorted(metrics))})")
    return float(metrics[metric])

