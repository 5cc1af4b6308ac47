"""The command line: thin — parse arguments, call the API, render rich tables.

Errors are one line on stderr (``onnxpress: error: ...``) with exit code 2 for usage errors and 1 for
failures; ``--debug`` shows the traceback.  No command ever leaves a partial output file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from onnxpress.errors import OnnxpressError, UsageError
from onnxpress.models import BUILTIN_MODELS, TASKS  # the registries: tasks and models register themselves there
from onnxpress.targets import TARGETS as TARGET_NAMES
from onnxpress.render import make_console, make_progress, plain, print_all, render_inspect, render_rows, render_sample_metrics
from onnxpress.render import megabytes as _mb
from onnxpress.render import render_bisect, render_details, render_metrics, render_optimize, render_passes, render_validation

LOG_AFTER_SECONDS = 20.0  # redirected stderr: progress lines once a run has lasted this long
console = make_console(stderr=False)
err_console = make_console(stderr=True)


def _parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--dim expects NAME=VALUE, got '{item}'")
        try:
            dims[name] = int(raw)
        except ValueError:
            raise UsageError(f"--dim {name}: '{raw}' is not an integer") from None
        if dims[name] <= 0:
            raise UsageError(f"--dim {name}: must be positive")
    return dims


def _tolerance(atol: float | None, rtol: float | None, min_cosine: float | None):
    from onnxpress.validate import LOSSLESS_TOLERANCE, Tolerance

    if atol is None and rtol is None and min_cosine is None:
        return None  # let the API choose by pipeline kind
    return Tolerance(
        atol=LOSSLESS_TOLERANCE[0] if atol is None else atol,
        rtol=LOSSLESS_TOLERANCE[1] if rtol is None else rtol,
        min_cosine=min_cosine,
    )


def validation_options(command):
    """The options every validating command shares."""
    for decorator in reversed((
        click.option("--inputs", type=click.Path(exists=True, path_type=Path), help="Validation inputs: .npz keyed by input name, or a folder of input_*.pb."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", help="Value of a symbolic dimension for generated inputs (repeatable)."),
        click.option("--provider", default="cpu", show_default=True, help="Execution provider for validation: cpu or cuda."),
        click.option("--atol", type=float, help="Absolute tolerance (default 1e-4 for lossless pipelines)."),
        click.option("--rtol", type=float, help="Relative tolerance (default 1e-3 for lossless pipelines)."),
        click.option("--min-cosine", type=float, help="Pass an output on cosine >= this (default 0.99 for lossy pipelines)."),
    )):
        command = decorator(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxpress")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """onnxpress: make ONNX models small and fast, and prove they still compute the same."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .onnx path. For a model of an onnxruntime-genai folder, OUT/NAME.onnx in another folder writes a whole genai folder (config, tokenizer, model).")
@click.option("-p", "--pipeline", default=None, help="Pipeline text, e.g. 'simplify,fold,dedup'. Default: the lossless pipeline.")
@click.option("--validate/--no-validate", "do_validate", default=True, show_default=True, help="Compare the result with the input in onnxruntime.")
@validation_options
@click.option("--eval-data", "eval_data", type=click.Path(exists=True, path_type=Path), help="Evaluation data (the same as --inputs): what every verdict is computed on.")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), help="Calibration data for data-aware passes and the budget search (.npz with a leading sample axis, or a folder; with --task llm: text .txt, or token ids .json/.npz).")
@click.option("--holdout", "holdout", metavar="FRACTION|N", help="Without --inputs: the part of --calibration held out for the verdict (default 0.25, at least 8 samples; 0: none).")
@click.option("--target", "target_name", type=click.Choice(list(TARGET_NAMES)), default="cpu", show_default=True, help="Where the model will run: sets pass defaults and the validating runtime (mobile also writes OUT.ort, OUT.required_operators.config, OUT.mobile.json).")
@click.option("--budget", "budget_text", help="Search the smallest per-layer mix of factorization and quantization meeting e.g. 'cos>=0.99', 'min_cos>=0.95', 'accuracy_drop<=1%' (replaces -p).")
@click.option("--task", help="Task metrics: a built-in task (minilm, digits, lm, llm) or PKG.MOD:FUNCTION / FILE.py:FUNCTION, a function(session_factory, data) -> dict of metrics.")
@click.option("--accept", "accept", multiple=True, metavar="COND", help="With -p and --task: a condition on the task's held-out metrics that decides the verdict, e.g. 'ppl_increase_rel<=5%' (repeatable; replaces the default output floor; --task llm defaults to ppl_increase_rel<=10%).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="With --budget: write the size-vs-fidelity Pareto plot (PNG).")
@click.option("--jobs", type=int, default=1, show_default=True, help="With --budget: threads for onnxruntime and candidate maths.")
@click.option("--bisect", is_flag=True, help="Validate after every pass and name the first pass that breaks the tolerance.")
@click.option("--verify-each", is_flag=True, help="Run the onnx checker and strict shape inference after every pass that changed the model.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the full report as JSON.")
@click.option("--force", is_flag=True, help="Allow the output to overwrite the input file.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when validation fails.")
@click.option("--external-data/--no-external-data", default=None, help="Store tensors in OUTPUT.data (default: when the model is large or had external data).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
@click.option("-v", "--verbose", is_flag=True, help="Print every per-layer row (default: the worst layers and totals).")
def optimize(model, output, pipeline, do_validate, inputs, dims, provider, atol, rtol, min_cosine, eval_data, calibration, holdout,
             target_name, budget_text, task, accept, plot_path, jobs, bisect, verify_each, report_path, force, keep_failed, external_data, quiet, verbose):
    """Rewrite MODEL with a pipeline of passes (or a --budget search), validate it, and write OUTPUT."""
    from onnxpress import api, io, rundata

    if inputs is not None and eval_data is not None:
        raise UsageError("--inputs and --eval-data are the same option: give one")
    if plot_path and not budget_text:
        raise UsageError("--plot draws the budget search's Pareto plot: it needs --budget")
    for extra in (report_path, plot_path):
        if extra:
            io.check_writable_output(extra, (model,), force=False)
    tolerance = _tolerance(atol, rtol, min_cosine)
    # a live bar draws nothing when stderr is redirected (CI logs, nohup): a run that lasts logs a line per stage
    # and pass instead, from LOG_AFTER_SECONDS on (a short run, or a one-line error, stays one line)
    log_lines = not quiet and not budget_text and not sys.stderr.isatty()
    began = time.perf_counter()

    def log(text):
        if log_lines and time.perf_counter() - began >= LOG_AFTER_SECONDS:
            sys.stderr.write(f"[{time.perf_counter() - began:7.1f} s] {plain(text, cap=300)}\n")
            sys.stderr.flush()

    with make_progress(err_console, disable=quiet or bool(budget_text)) as progress:
        bar = progress.add_task("loading", total=None)

        def stage(text):
            progress.update(bar, description=text)
            log(text)

        def start(p):
            progress.update(bar, description=f"pass {p}")
            log(f"pass {p}")

        def end(p):
            progress.advance(bar)

        out_model, report = api.optimize(
            model, pipeline, budget=budget_text or None, task=task, accept=accept or None, calibration=calibration, evaluation=inputs or eval_data,
            holdout=rundata.parse_holdout(holdout), dims=_parse_dims(dims), tolerance=tolerance, provider=provider, target=target_name,
            validate_result=do_validate, verify_each=verify_each, bisect=bisect, output=output, external_data=external_data,
            keep_failed=keep_failed, force=force, jobs=jobs, budget_options={"baselines": bool(plot_path)} if budget_text else None,
            progress=(not quiet) if budget_text else False, on_pass_start=start, on_pass_end=end, on_stage=stage,
        )
    if plot_path and report.budget is not None:
        report.budget.plot(plot_path)
    if report_path:
        io.write_bytes_atomic(json.dumps(report.to_dict(), indent=2, default=str).encode(), report_path)
    for item in render_optimize(report, verbose=verbose, quiet=quiet):
        console.print(item, soft_wrap=quiet)  # the --quiet line is wrapped by the terminal, not cut by rich
    _raise_on_failure(report, budget_text)


def _raise_on_failure(report, budget_text) -> None:
    """The exit code: 1 with one line naming what failed."""
    if report.mobile is not None and not report.mobile.passed:
        raise OnnxpressError("mobile validation failed: the .ort file does not match the original within tolerance")
    if report.first_failing_pass:
        raise OnnxpressError(f"bisect: pass '{report.first_failing_pass}' is the first to break the tolerance ({report.validation.tolerance.describe()}); later passes were not run")
    if report.budget is not None and not report.budget.passed:
        raise OnnxpressError(f"budget {budget_text} not met on {report.budget.evaluation}: measured {report.budget.value:.6g}")
    failed = [a for a in report.acceptance if not a["passed"]]
    if failed:
        raise OnnxpressError("not accepted on " + failed[0]["on"] + ": " + ", ".join(f"{a['condition']} measured {a['value']:.6g}" for a in failed))
    if report.validation is not None and report.validation_decides and not report.validation.passed:
        worst = min(report.validation.outputs, key=lambda o: o.cosine if o.cosine == o.cosine else -1)
        raise OnnxpressError(
            f"validation failed on {report.validation.data or 'the evaluation data'}: output '{worst.name}' max abs {worst.max_abs:.3g}, "
            f"mean per-sample cosine {worst.cosine:.6f} (tolerance {report.validation.tolerance.describe()})"
        )


@main.command(name="validate")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@validation_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
def validate_cmd(reference, candidate, inputs, dims, provider, atol, rtol, min_cosine, report_path):
    """Run REFERENCE and CANDIDATE in onnxruntime on the same inputs and compare every output."""
    from onnxpress import io
    from onnxpress.validate import Tolerance, validate

    tol = _tolerance(atol, rtol, min_cosine) or Tolerance()
    io.load(candidate)  # same safety checks (external data, format) as for the reference
    report = validate(str(reference), str(candidate), inputs=inputs, dims=_parse_dims(dims), tolerance=tol, provider=provider)
    console.print(render_validation(report))
    if report.samples > 1:
        console.print(render_sample_metrics(report))
    if report_path:
        io.write_bytes_atomic(json.dumps(report.to_dict(), indent=2, default=str).encode(), report_path)
    if not report.passed:
        raise OnnxpressError("validation failed: " + ", ".join(o.name for o in report.outputs if not o.within_tolerance))
    console.print("passed", style="green")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", default=10, show_default=True, help="How many of the largest initializers to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model, top, as_json):
    """Opsets, inputs/outputs, node histogram, parameters and bytes by dtype, largest initializers."""
    from onnxpress.inspect import summarize

    info = summarize(model, top=top)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    print_all(console, render_inspect(info, title=str(model)))


@main.command(name="passes")
def passes_cmd():
    """List every pass with its options and defaults (generated from the registry)."""
    from onnxpress.pass_infra import describe_options
    from onnxpress.registry import registry

    for name, cls in registry().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        rows = describe_options(cls) or [("(none)", "", "", "")]
        console.print(render_rows(f"{name}  ({'lossless' if cls.lossless else 'lossy'})", ("option", "type", "default", "help"), rows, caption=doc[0] if doc else None))


def run(argv: list[str] | None = None) -> int:
    """Entry point with the error policy: one line, exit 2 for usage, 1 for failures, no traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ONNXPRESS_DEBUG") == "1"
    if not debug:  # onnx-ir / onnxscript log warnings to stderr; the CLI reports in tables and one error line
        import logging

        logging.lastResort = None  # unhandled library records are dropped; onnxpress's own captures still work
    try:
        main.main(args=args, prog_name="onnxpress", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("onnxpress: aborted", highlight=False)
        return 1
    except click.ClickException as exc:
        if debug:
            raise
        message = plain(exc.format_message().replace("\n", " "), cap=None)
        sys.stderr.write(f"onnxpress: error: {message}\n")
        return exc.exit_code
    except OnnxpressError as exc:
        if debug:
            raise
        sys.stderr.write(f"onnxpress: error: {plain(' '.join(str(exc).split()), cap=None)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxpress: interrupted\n")
        return 130
    except Exception as exc:  # an onnxpress bug or an unexpected library failure: still one line
        if debug:
            raise
        text = plain(" ".join(str(exc).split())[:400], cap=None)
        sys.stderr.write(f"onnxpress: error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)\n")
        return 1


def entry() -> None:
    sys.exit(run())


# --- export and eval: PyTorch export (onnxpress.export) and the real-model task metrics (onnxpress.models) ---


def _load_factory(spec: str):
    """``pkg.mod:factory`` or ``path/to/file.py:factory`` -> the callable."""
    from onnxpress.tasks import load_callable

    return load_callable(spec, what="--module")


@main.command(name="export")
@click.argument("name", required=False, metavar="[" + "|".join(BUILTIN_MODELS) + "]")
@click.option("--module", "module_spec", metavar="PKG.MOD:FACTORY", help="A factory returning (module, example_inputs) or (module, example_inputs, export_kwargs); FILE.py:FACTORY works too.")
@click.option("--causal-lm", "causal_lm", type=click.Path(exists=True, path_type=Path), help="A causal LM to export: a .gguf file or a Hugging Face folder (local; no hub). -o is then a folder onnxruntime-genai runs.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .onnx path (--causal-lm: output folder).")
@click.option("-p", "--pipeline", default=None, help="Run this pipeline on the exported model before writing it.")
@click.option("--opset", type=int, default=None, help="ONNX opset for --module exports (default 18).")
@click.option("--eval", "do_eval", is_flag=True, help="Builtin models: also print the task metrics of the result.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def export_cmd(name, module_spec, causal_lm, output, pipeline, opset, do_eval, force):
    """Export a PyTorch model to ONNX (a builtin model, --module, or a --causal-lm with its KV cache), check it, optionally optimize."""
    from onnxpress import api, io
    from onnxpress.export import DEFAULT_OPSET, compare_with_module, export
    from onnxpress.validate import Tolerance

    if causal_lm is not None:
        return _export_causal_lm(causal_lm, output, name, module_spec, pipeline, force)
    if (name is None) == (module_spec is None):
        raise UsageError(f"give a builtin model name ({', '.join(BUILTIN_MODELS)}), --module PKG.MOD:FACTORY or --causal-lm PATH: exactly one")
    io.check_writable_output(output, (), force=force)
    task = kind = None
    calibration = inputs = None
    with err_console.status("exporting"):
        if name is not None:

            if name not in BUILTIN_MODELS:
                raise UsageError(f"unknown builtin model '{name}' (valid: {', '.join(BUILTIN_MODELS)}; or use --module)")
            if opset is not None:
                raise UsageError(f"builtin models are exported at opset {DEFAULT_OPSET}; --opset applies to --module")
            task, kind = BUILTIN_MODELS[name]
            mod = TASKS[task]
            kw = {"kind": kind} if kind else {}
            torch_module = mod.module(**kw)
            example = mod.example_inputs(**kw)
            model = io.load(mod.build(**kw))
            calibration = mod.calibration_feeds(**kw)
            inputs = mod.evaluation_feeds(**kw)[:1]
        else:
            produced = _load_factory(module_spec)()
            if not isinstance(produced, tuple) or len(produced) not in (2, 3):
                raise UsageError("--module factory must return (module, example_inputs) or (module, example_inputs, export_kwargs)")
            torch_module, example = produced[0], produced[1]
            kwargs = dict(produced[2]) if len(produced) == 3 else {}
            model = export(torch_module, example, opset=opset or kwargs.pop("opset", DEFAULT_OPSET), **kwargs)
    check = compare_with_module(torch_module, model, example, Tolerance())
    check_table = render_validation(check)
    check_table.title = "Exported ONNX vs the PyTorch module (" + check.tolerance.describe() + ")"
    console.print(check_table)
    if not check.passed:
        raise OnnxpressError("the exported model does not match the PyTorch module: " + ", ".join(o.name for o in check.outputs if not o.within_tolerance))
    out_model = model
    if pipeline:
        # the orchestrator validates against the exported fp32 model and writes OUTPUT only when it passed
        out_model, report = api.optimize(model, pipeline, calibration=calibration, inputs=inputs, output=output, force=force)
        print_all(console, render_optimize(report))
        if not report.passed:
            raise OnnxpressError("validation of the optimized model against the exported fp32 model failed; nothing written")
    if do_eval:
        if task is None:
            raise UsageError("--eval needs a builtin model (its task defines the metric)")
        from onnxpress.models import evaluate_task

        console.print(render_metrics(f"Task metrics ({task}{'-' + kind if kind else ''}) vs the fp32 model", evaluate_task(task, out_model, kind=kind)))
    if not pipeline:
        io.save(out_model, output)
        console.print(render_rows("Result", ("", ""), [("size", _mb(api.model_bytes(model))), ("written", str(output))]))


def _export_causal_lm(source, output, name, module_spec, pipeline, force):
    """GGUF / HF folder -> an onnxruntime-genai folder (fp32 decoder with KV cache, tokenizer, genai_config.json)."""
    from onnxpress.llm.export import export_causal_lm

    if name is not None or module_spec is not None:
        raise UsageError("give a builtin model name, --module or --causal-lm: exactly one")
    if pipeline:
        raise UsageError("--causal-lm exports the fp32 folder; optimize OUT/model.onnx afterwards (e.g. --task llm)")
    with err_console.status("loading the causal LM (transformers, offline) and building the ONNX decoder"):
        info = export_causal_lm(source, output, overwrite=force)
    rows = [(k, f"{v:.1f}" if isinstance(v, float) else str(v)) for k, v in info.to_dict().items()]
    console.print(render_rows("Exported causal LM", ("", ""), rows))


@main.command(name="eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--task", required=True, type=click.Choice([*TASKS, "llm"]), help="The task whose metric to compute (llm: perplexity and greedy agreement of a causal LM against --reference).")
@click.option("--kind", type=click.Choice(["mlp", "cnn"]), help="digits only: the reference model (default: from the input rank).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Reference ONNX model (default: the cached fp32 build of the task).")
@click.option("--eval-data", "eval_data", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="llm only: the text (.txt) or token ids (.json, .npz input_ids) to evaluate on (default: the 40 built-in paragraphs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(model, task, kind, reference, eval_data, as_json):
    """Print the task metrics of MODEL (any ONNX file for the task) against the fp32 reference."""
    from onnxpress import io
    from onnxpress.models import evaluate_task

    io.load(model)  # the same safety checks (format, external data) as every other command
    with err_console.status(f"evaluating on the {task} task"):
        if task == "llm":
            from onnxpress import tasks

            if reference is None:
                raise UsageError("--task llm needs --reference: the original model (its folder holds the tokenizer)")
            metrics = tasks.llm_task(str(reference), evaluation=eval_data).evaluate(str(model))
        elif eval_data is not None:
            raise UsageError(f"--eval-data: task {task} evaluates on its own held-out data; --eval-data is for --task llm")
        else:
            metrics = evaluate_task(task, str(model), kind=kind, reference=str(reference) if reference else None)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    console.print(render_metrics(f"{model} on task {task} (reference: {reference or 'fp32 build'})", metrics))
