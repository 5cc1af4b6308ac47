"""The budget search: ``search`` (the algorithm is described in ``onnxpress.budget``)."""

from __future__ import annotations

import contextlib
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
from onnxpress.budget.layers import FP32, Choice, Grid, Spectra, choice_bytes, collect_input_stats, find_layers, local_error, lowrank_tail, reconstruct, split_coverage
from onnxpress.budget.paths import TINY, Move, greedy_path, lower_hull, search_path
from onnxpress.budget.progress import Reporter
from onnxpress.budget.result import BudgetResult, LayerDecision, Point
from onnxpress.budget.simulate import Simulator, output_metrics
from onnxpress.budget.spec import OUTPUT_METRICS, Budget
from onnxpress.errors import UsageError

# a predicted candidate is measured when it would matter if its d were this many times smaller than
# predicted (on MiniLM, prediction / measurement is 0.4-5, 80% within 0.7-1.9)
REFINE_SLACK = 4.0


def _as_model(model: Any) -> tuple[ir.Model, Any]:
    """(working ir.Model copy, reference for evaluate/validate: a path string or a proto)."""
    from onnxpress.io import load

    if isinstance(model, (str, os.PathLike)):
        return load(model), os.fspath(model)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"cannot search a budget for {type(model).__name__}")
    return ir.serde.deserialize_model(proto), proto


def _blas_threads(limit: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


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
    could use (``refine_rounds`` times at most); False measures every candidate. ``cache``: True (``$ONNXPRESS_CACHE`` or
    ``~/.cache/onnxpress``), a folder, or False. Returns a ``BudgetResult``.
    """
    from onnxpress.api import model_bytes
    from onnxpress.pass_infra import PassContext
    from onnxpress.pipeline import Pipeline

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    budget = Budget.coerce(budget)
    grid = grid or Grid()
    jobs = max(1, os.cpu_count() or 1) if jobs is None else max(1, int(jobs))
    from onnxpress import rundata, tasks

    if not budget.is_output_metric and evaluate is None:
        if task is None:
            raise UsageError(f"budget on '{budget.metric}' is a task metric: give task= (CLI --task NAME or PKG.MOD:FUNCTION) or evaluate=; output budgets are {', '.join(OUTPUT_METRICS)}")
    working, reference = _as_model(model)
    bytes_before = model_bytes(reference if isinstance(reference, onnx.ModelProto) else working)
    resolved = tasks.resolve(task, reference) if evaluate is None else None

    # -- base (lossless) pipeline ------------------------------------------------------------------
    from onnxpress.passes import DEFAULT_PIPELINE

    # No lossless pipeline by default: onnxsim turns MatMul+Add into Gemm, which int4 does not cover.
    base_text = "" if base is None else (DEFAULT_PIPELINE if base == "default" else base)
    base_pipe = Pipeline.parse(base_text)
    # The search fits to the calibration data and decides on held-out data (``onnxpress.rundata``): with
    # calibration only, a seeded part of it is held out and never seen by the passes or the search.
    if data is None:
        data = rundata.prepare(working, calibration=calibration, evaluation=evaluation, holdout=holdout,
                               task=resolved.module if resolved is not None else None)
    elif calibration is not None or evaluation is not None:
        raise UsageError("give data= (a prepared rundata.RunData) or calibration=/evaluation=, not both")
    calib, eval_feeds, evaluation_label = data.calibration, data.evaluation, data.evaluation_source
    if calib is None:
        from onnxpress.data import generate_inputs

        calib = [generate_inputs(working, seed=i) for i in range(4)]
        notes.append("no calibration data given: fitted on 4 generated input batches (pass calibration= for real data)")
    if eval_feeds is None:
        from onnxpress.data import generate_inputs

        eval_feeds = [generate_inputs(working, seed=100 + i) for i in range(4)]
        evaluation_label = "generated random inputs (no real data given: the last resort), other seeds than the fit inputs"
    if len(base_pipe):
        result = base_pipe.run(working, context=PassContext(calibration=calib))
        working = result.model
    # task metrics: the search compares configurations on the fit data where the task takes data (user tasks)
    evaluate_fit = evaluate_verdict = evaluate
    if resolved is not None:
        evaluate_fit = resolved.evaluator(calib if resolved.uses_data else None)
        evaluate_verdict = resolved.evaluator(eval_feeds if resolved.uses_data else None)
        if not resolved.uses_data:
            notes.append(f"task {resolved.name} scores every configuration on its own evaluation set (the passes fit only the calibration data)")
    evaluate = evaluate_fit
    if not budget.is_output_metric:
        evaluation_label = (f"task {resolved.name if resolved else 'evaluate()'} on " + (evaluation_label if resolved is not None and resolved.uses_data else "its own evaluation set"))
    sens_feeds = calib[: max(1, sensitivity_batches)]

    with Reporter(progress) as rep:
        # -- layers, statistics ------------------------------------------------------------------------
        t0 = time.perf_counter()
        layers, skipped = find_layers(working, grid, calib)
        if not layers:
            raise UsageError("the model has no MatMul/Gemm/Conv/Gather weights the lossy passes can rewrite")
        matmul_inputs = [layer.x for layer in layers if layer.x is not None]
        with rep.stage("input statistics", 1) as advance:
            stats = collect_input_stats(working, calib, matmul_inputs)
            advance()
        seconds["statistics"] = time.perf_counter() - t0

        # -- sensitivity -----------------------------------------------------------------------------
        t0 = time.perf_counter()
        with_bias = [layer for layer in layers if any(c.ratio is not None for c in layer.choices)]
        sim = Simulator(working, layers, with_bias, threads=jobs)
        checked: dict[tuple[tuple[int, int], ...], float] = {}

        def task_model(over: dict[str, np.ndarray]) -> Any:
            # an evaluate() marked ``accepts_session`` scores the simulation session with the overrides fed;
            # any other gets a standalone model with the reconstructions written in
            return sim.session_with(over) if getattr(evaluate, "accepts_session", False) else sim.materialize(over)

        if not budget.is_output_metric:
            # fail fast on a metric the task does not report, or a budget the original model misses itself
            original_value = _task_value(evaluate, task_model({}), budget.metric)
            if not budget.ok(original_value):
                raise UsageError(f"the original model does not meet the budget itself: {budget.metric} = {original_value:.6g} (budget {budget})")
            checked[()] = original_value
        hot_sizes = {layer.name: int(layer.hot.size) for layer in layers if layer.hot is not None}
        digest = sens_cache.digest(working, sens_feeds, json.dumps([sens_cache.CACHE_VERSION, dataclasses.asdict(grid), hot_sizes]))
        cache_path = sens_cache.cache_file(cache, digest)
        cached = sens_cache.load(cache_path)
        spectra = Spectra()
        recon_memo: dict[tuple[int, Choice], tuple[np.ndarray, np.ndarray | None]] = {}

        def recon(li: int, choice: Choice) -> tuple[np.ndarray, np.ndarray | None]:
            key = (li, choice)
            if key not in recon_memo:
                layer = layers[li]
                recon_memo[key] = reconstruct(layer, choice, stats.get(layer.x) if layer.x else None, spectra)
            return recon_memo[key]

        tables: list[list[tuple[float, float]]] = []
        options: list[list[Choice]] = []
        candidates: list[dict[str, Any]] = []
        predicted: set[tuple[int, Choice]] = set()  # (layer, choice) whose d is predicted, not measured yet
        local_errors: dict[tuple[int, Choice], float] = {}

        def measure_alone(li: int, c: Choice) -> float:
            layer = layers[li]
            w, delta = recon(li, c)
            d = sim.error(sens_feeds, sim.override(layer, w, delta)).d
            cached[f"{layer.name}|{c.label}"] = d
            if layer.x is not None and c.ratio is None:
                local_errors[(li, c)] = local_error(layer, w, stats[layer.x])
            return d

        def layer_gain(li: int, measured: Sequence[Choice], table: Sequence[tuple[float, float]]) -> float | None:
            """How much of a layer's own relative output error reaches the model output (d / local error),
            from its measured quantizations (geometric mean); None when it cannot be estimated."""
            layer = layers[li]
            if layer.x is None:
                return None
            ratios = []
            for i, c in enumerate(measured, start=1):
                if (li, c) not in local_errors and c.ratio is None:
                    local_errors[(li, c)] = local_error(layer, recon(li, c)[0], stats[layer.x])
                e = local_errors.get((li, c), 0.0)
                if e > 0 and table[i][1] > 0:
                    ratios.append(math.log(table[i][1] / e))
            return math.exp(sum(ratios) / len(ratios)) if ratios else None

        def predict_d(li: int, c: Choice, gain: float) -> float:
            """Predicted d of a factorization candidate: gain x (discarded output energy + the local error of
            quantizing the whole weight the same way, a stand-in for quantizing the factors)."""
            layer = layers[li]
            e_quant = local_errors.get((li, Choice(None, c.quant)), 0.0) if c.quant is not None else 0.0
            return gain * (lowrank_tail(layer, stats[layer.x], spectra, c.ratio) + e_quant)
        total = sum(len(layer.choices) for layer in layers)
        sim.references(sens_feeds)
        with rep.stage("sensitivity (layer x candidate)", total) as advance, _blas_threads(1):
            import concurrent.futures

            pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs) if jobs > 1 else None
            try:
                for li, layer in enumerate(layers):
                    table = [(float(layer.fp32_bytes), 0.0)]
                    tried: list[Choice] = []
                    # groups of candidates: the plain quantizations (measured), then one group per ratio
                    # (largest first); a ratio whose error alone passes max_layer_error ends the layer's search
                    groups = [[c for c in layer.choices if c.ratio is None]]
                    for r in sorted({c.ratio for c in layer.choices if c.ratio is not None}, reverse=True):
                        groups.append([c for c in layer.choices if c.ratio == r])
                    gain = None
                    for gi, group in enumerate(groups):
                        if gi == 1 and predict:
                            gain = layer_gain(li, tried, table)
                        todo = [c for c in group if f"{layer.name}|{c.label}" not in cached and gain is None]
                        # candidates are computed on the pool while onnxruntime measures the ones ready
                        futures = {c: pool.submit(recon, li, c) for c in todo} if pool is not None and len(todo) > 1 else {}
                        group_best = float("inf")
                        for c in group:
                            key = f"{layer.name}|{c.label}"
                            if key in cached:
                                d = float(cached[key])
                            elif gain is not None:
                                d = predict_d(li, c, gain)
                                predicted.add((li, c))
                            else:
                                if c in futures:
                                    futures[c].result()
                                d = measure_alone(li, c)
                            nbytes = choice_bytes(layer, c)
                            table.append((float(nbytes), d))
                            tried.append(c)
                            group_best = min(group_best, d)
                            candidates.append({"layer": layer.name, "op": layer.op, "choice": c.label, "technique": c.technique, "bytes_before": layer.fp32_bytes, "bytes": nbytes, "d": d, "measured": (li, c) not in predicted})
                            advance()
                        if gi > 0 and group_best > grid.max_layer_error:
                            skipped_count = sum(len(g) for g in groups[gi + 1 :])
                            if skipped_count:
                                advance(skipped_count)
                            break
                    opts = [FP32, *tried]
                    tables.append(table)
                    options.append(opts)
                    # keep the reconstructions on this layer's hull (the search) and the plain quantizations
                    # (the uniform baselines); drop the others
                    keep = {opts[i] for i in lower_hull(table)}
                    for c in tried:
                        if c not in keep and c.ratio is not None:
                            recon_memo.pop((li, c), None)
            finally:
                if pool is not None:
                    pool.shutdown()
        sens_cache.save(cache_path, cached)
        seconds["sensitivity"] = time.perf_counter() - t0

        # -- greedy path and its search --------------------------------------------------------------------
        t0 = time.perf_counter()
        path = greedy_path(tables)
        base_weight_bytes = sum(t[0][0] for t in tables)
        working_bytes = model_bytes(working)
        points: list[Point] = []

        def config_bytes(config: dict[int, int]) -> int:
            return int(working_bytes - base_weight_bytes + sum(tables[li][config.get(li, 0)][0] for li in range(len(layers))))

        def config_d(config: dict[int, int]) -> float:
            return float(sum(tables[li][o][1] for li, o in config.items()))

        def overrides(config: dict[int, int]) -> dict[str, np.ndarray]:
            out: dict[str, np.ndarray] = {}
            for li, o in config.items():
                if o == 0:
                    continue
                w, delta = recon(li, options[li][o])
                out.update(sim.override(layers[li], w, delta))
            return out

        def measure(config: dict[int, int]) -> float:
            key = tuple(sorted((li, o) for li, o in config.items() if o))
            if key not in checked:
                over = overrides(config)
                if budget.is_output_metric:
                    value = sim.error(calib, over).metrics()[budget.metric]
                else:
                    value = _task_value(evaluate, task_model(over), budget.metric)
                checked[key] = value
            return checked[key]

        def relevant_predictions(config: dict[int, int], accepted: Sequence[Move]) -> list[tuple[int, Choice]]:
            """Predicted candidates the chosen configuration uses, or whose hull move, with the prediction
            REFINE_SLACK times too pessimistic, is as efficient as the best move the search had to reject
            (the price the budget sets): only these can change the result once measured."""
            taken = set(accepted)
            price = max((m.efficiency for m in path if m not in taken), default=0.0)
            out: list[tuple[int, Choice]] = []
            for li, table in enumerate(tables):
                # optimistic: every prediction REFINE_SLACK times too high (on the hull and efficient enough?)
                hopeful = [(nbytes, d / REFINE_SLACK if (li, options[li][o]) in predicted else d) for o, (nbytes, d) in enumerate(table)]
                hull = lower_hull(hopeful)
                on_hull = [b for b in hull[1:] if (li, options[li][b]) in predicted]
                relevant = any(
                    config.get(li, 0) == b or (hopeful[a][0] - hopeful[b][0]) / max(hopeful[b][1] - hopeful[a][1], TINY) >= price
                    for a, b in zip(hull, hull[1:])
                    if (li, options[li][b]) in predicted
                )
                # a layer with one relevant prediction gets all its hull predictions measured at once: its
                # neighbours on the hull tend to become relevant next, and each round costs a search
                if relevant:
                    out.extend((li, options[li][b]) for b in on_hull)
                o = config.get(li, 0)
                if o and (li, options[li][o]) in predicted and (li, options[li][o]) not in out:
                    out.append((li, options[li][o]))
            return out

        target = budget
        tick: list[Callable[..., None]] = [lambda *a, **k: None]  # the progress of the stage searching now

        def search_stage(name: str) -> Any:
            return rep.stage(name, 2 * int(math.log2(len(path) + 1) + 1) * max(rounds, 1))

        with search_stage("search (verified configurations)") as advance:
            tick[0] = advance

            def probe(config: dict[int, int]) -> float:
                value = measure(config)
                ok = target.ok(value)
                points.append(Point(f"{sum(1 for o in config.values() if o)} layers rewritten", config_bytes(config), config_d(config), value, ok, "path"))
                tick[0]()
                return target.margin(value)

            def run_search() -> tuple[dict[int, int], list[Move]]:
                return search_path(path, probe, rounds, size_tol=size_tol, size0=float(working_bytes))

            config, accepted = run_search()
        seconds["search"] = time.perf_counter() - t0

        # -- refine: measure the predicted candidates the search uses or could use, then search again -------
        t0 = time.perf_counter()
        for _ in range(refine_rounds if predicted else 0):
            todo = relevant_predictions(config, accepted)
            if not todo:
                break
            with rep.stage("sensitivity (predicted candidates the search may use)", len(todo)) as advance, _blas_threads(1):
                for li, c in todo:
                    o = options[li].index(c)
                    d = measure_alone(li, c)
                    tables[li][o] = (tables[li][o][0], d)
                    predicted.discard((li, c))
                    for row in candidates:
                        if row["layer"] == layers[li].name and row["choice"] == c.label:
                            row.update(d=d, measured=True)
                    advance()
            path = greedy_path(tables)
            with search_stage("search again (measured candidates)") as advance:
                tick[0] = advance
                config, accepted = run_search()
        seconds["refine"] = time.perf_counter() - t0

        if baselines:
            t0 = time.perf_counter()
            with rep.stage("uniform baselines", 3) as advance:
                for quant in ("int8", "int4/32", "int4/128"):
                    cfg: dict[int, int] = {}
                    for li, opts in enumerate(options):
                        pick = Choice(None, quant) if Choice(None, quant) in opts else (Choice(None, "int8") if Choice(None, "int8") in opts else None)
                        if pick is not None:
                            cfg[li] = opts.index(pick)
                    value = measure(cfg)
                    points.append(Point(f"all {quant}" + (" (int8 where int4 does not apply)" if quant != "int8" else ""), config_bytes(cfg), config_d(cfg), value, budget.ok(value), "baseline"))
                    advance()
            seconds["baselines"] = time.perf_counter() - t0

        # -- build with the real passes, verify, back off ----------------------------------------------------
        t0 = time.perf_counter()
        reference_outputs = fit_reference = None
        if budget.is_output_metric:
            from onnxpress import runtime

            ref_session = runtime.make_session(reference, threads=jobs)
            reference_outputs = [_float_outputs(runtime.run(ref_session, f)) for f in eval_feeds]
            fit_reference = [_float_outputs(runtime.run(ref_session, f)) for f in calib]
            del ref_session
        attempts: list[dict[str, Any]] = []
        final = None
        splits_banned = False
        with rep.stage("build and verify", backoff + 1) as advance:
            for attempt in range(backoff + 3):  # + 1: a held-out failure with an embedding split first drops the split
                last_resort = attempt == backoff + 2
                if last_resort:
                    config = {}
                    notes.append("no configuration met the budget when built with the real passes: returned the lossless model")
                decisions = {layers[li].name: options[li][o] for li, o in config.items() if o}
                built_model, lossy_passes = build(working, layers, decisions, calib)
                text = ",".join(p for p in [base_text.strip(), str(Pipeline(lossy_passes))] if p)
                if budget.is_output_metric:
                    metrics = output_metrics(built_model, eval_feeds, reference_outputs, threads=jobs).metrics()
                    fit_metrics = output_metrics(built_model, calib, fit_reference, threads=jobs).metrics()
                else:
                    metrics = dict(evaluate_verdict(built_model))
                    fit_metrics = dict(evaluate_fit(built_model)) if evaluate_fit is not evaluate_verdict else dict(metrics)
                value = float(metrics[budget.metric])
                fit_value = float(fit_metrics[budget.metric])
                ok = budget.ok(value)
                simulated = measure(config)
                split_rows = []
                for li, o in config.items():
                    if o and options[li][o].quant is not None and options[li][o].quant.startswith("split/") and layers[li].hot is not None:
                        cold, total = split_coverage(working, layers[li], eval_feeds)
                        split_rows.append({"layer": layers[li].name, "held_out_cold_occurrences": cold, "held_out_occurrences": total})
                attempts.append({"pipeline": text, "bytes": model_bytes(built_model), "value": value, "fit_value": fit_value,
                                 "simulated": simulated, "passed": ok, "target": target.value, "embedding_split": split_rows})
                advance()
                final = (built_model, text, metrics, value, ok, dict(config), fit_value)
                if ok or last_resort:
                    break
                if budget.ok(fit_value):
                    notes.append(f"attempt {attempt + 1}: {budget.metric} {fit_value:.6g} on the calibration data but {value:.6g} on held-out data: "
                                 "the calibration set looks too small or unrepresentative; backing off")
                if split_rows and not splits_banned:
                    # the embedding split is the sharpest overfit: rows the calibration data never indexed are
                    # 2-bit; when the held-out verdict fails with a split in the build, drop splits first
                    splits_banned = True
                    cold_share = sum(r["held_out_cold_occurrences"] for r in split_rows) / max(1, sum(r["held_out_occurrences"] for r in split_rows))
                    notes.append(f"embedding split rejected by the held-out check ({cold_share:.1%} of held-out token occurrences fall in 2-bit rows)")
                    for li, opts in enumerate(options):
                        for oi, c in enumerate(opts):
                            if c.quant is not None and c.quant.startswith("split/"):
                                tables[li][oi] = (tables[li][oi][0], math.inf)
                    path = greedy_path(tables)
                    with search_stage("search again (no embedding split)") as search_advance:
                        tick[0] = search_advance
                        config, accepted = run_search()
                    continue
                target = target.backed_off(simulated, value)
                if not np.isfinite(target.value):
                    config = {}
                    continue
                with search_stage(f"search again (target tightened to {target.value:.6g})") as search_advance:
                    tick[0] = search_advance
                    config, accepted = run_search()
        seconds["build"] = time.perf_counter() - t0
        assert final is not None
        built_model, text, metrics, value, ok, config, fit_value = final

    _stamp(built_model, text)
    layer_rows = []
    for li, layer in enumerate(layers):
        o = config.get(li, 0)
        c = options[li][o]
        rank = None
        if c.ratio is not None:
            from onnxpress.passes.factorize import rank_for_ratio

            k, n = layer.matrix.shape
            rank = rank_for_ratio(k, n, c.ratio)
        layer_rows.append(LayerDecision(layer.name, layer.op, layer.shape, c.label, layer.fp32_bytes, int(tables[li][o][0]), float(tables[li][o][1]), rank))
    points.append(Point("chosen (built with the passes)", model_bytes(built_model), config_d(config), value, ok, "built"))
    seconds["total"] = time.perf_counter() - t_start
    for layer in layers:
        for tech, reason in layer.skipped.items():
            skipped.append({"layer": layer.name, "op": layer.op, "skipped": f"{tech}: {reason}"})
    return BudgetResult(
        budget=budget, pipeline=text, model=built_model, bytes_before=bytes_before, bytes_after=model_bytes(built_model),
        predicted_bytes=config_bytes(config), value=value, fit_value=fit_value, passed=ok, metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        layers=layer_rows, candidates=candidates, points=points, attempts=attempts, seconds=seconds, notes=notes, skipped=skipped,
        evaluation=evaluation_label, data=data.to_dict(),
    )


def _float_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _task_value(evaluate: Callable[[Any], dict[str, float]], model: Any, metric: str) -> float:
    metrics = evaluate(model)
    if metric not in metrics:
        raise UsageError(f"the task's evaluate() has no metric '{metric}' (it reports: {', '.join(sorted(metrics))})")
    return float(metrics[metric])


def _stamp(model: Any, pipeline: str) -> None:
    from onnxpress.api import stamp_metadata

    stamp_metadata(model, pipeline)
