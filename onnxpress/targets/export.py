"""ONNX Runtime Mobile artefacts: conversion to ORT format, validation of the ``.ort``, the mobile report.

``export_mobile`` / ``check_mobile``: the model is converted to ORT format with onnxruntime's own converter
(``onnxruntime.tools.convert_onnx_models_to_ort``), the ``.ort`` file is loaded in onnxruntime and compared
with the reference, the required-operators config of a reduced-size build is written, and the coverage of
each mobile execution provider is estimated (``onnxpress.targets.mobile``). All work happens in a temporary
folder beside the output; files are moved into place only at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress import runtime
from onnxpress.errors import OnnxpressError, UsageError
from onnxpress.io import load as load_model
from onnxpress.targets.mobile import EpCoverage, ep_coverage
from onnxpress.targets.ort_output import env_var, native_stderr, one_line, quiet_ort_tools
from onnxpress.validate import Tolerance, ValidationReport, compare_runs, make_feeds, validate


# runtime: ORT's basic optimizations saved, the others recorded and replayed at run time (ORT's advice for
#          NNAPI/CoreML; the mobile EPs see standard ONNX ops). fixed: every optimization of the CPU provider
#          baked in (fused com.microsoft ops; fastest with the CPU provider). basic: only the basic optimizations
#          (standard ops for NNAPI/CoreML without the runtime records).
OptimizationStyle = Literal["runtime", "fixed", "basic"]
STYLES = ("runtime", "fixed", "basic")


@dataclasses.dataclass(frozen=True)
class MobilePaths:
    ort: Path
    config: Path
    report: Path


def mobile_paths(output: str | os.PathLike, type_reduction: bool = False) -> MobilePaths:
    """``out.onnx`` -> ``out.ort``, ``out.required_operators.config``, ``out.mobile.json``."""
    out = Path(output)
    config = ".required_operators_and_types.config" if type_reduction else ".required_operators.config"
    return MobilePaths(out.with_suffix(".ort"), out.with_suffix(config), out.with_suffix(".mobile.json"))


@dataclasses.dataclass
class MobileReport:
    style: str
    onnx_bytes: int
    ort_bytes: int
    required_ops: list[str]  # "domain;opset;op" lines of the required-operators config
    validation: ValidationReport  # the .ort against the reference
    ep_coverage: list[EpCoverage]
    dynamic_inputs: list[str]
    seconds: dict[str, float]
    replay_validation: ValidationReport | None = None  # runtime style: with the saved optimizations replayed
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # written files (empty: nothing written)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know (style fallback, ...)

    @property
    def passed(self) -> bool:
        return self.validation.passed and (self.replay_validation is None or self.replay_validation.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "onnx_bytes": self.onnx_bytes,
            "ort_bytes": self.ort_bytes,
            "required_ops": self.required_ops,
            "validation": self.validation.to_dict(),
            "replay_validation": self.replay_validation.to_dict() if self.replay_validation else None,
            "ep_coverage": [c.to_dict() for c in self.ep_coverage],
            "dynamic_inputs": self.dynamic_inputs,
            "seconds": self.seconds,
            "files": self.files,
            "notes": self.notes,
            "passed": self.passed,
        }

    COLUMNS = ("execution provider", "nodes", "share", "partitions", "falls back to CPU", "if shapes fixed", "verdict")

    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per EP, in ``COLUMNS`` order (for a rich table or markdown)."""
        out = []
        for c in self.ep_coverage:
            fallback = ", ".join(op.removeprefix("ai.onnx:") for op in c.fallback_ops) or "-"
            if c.dynamic_shape_nodes:
                fallback = f"{fallback}; {c.dynamic_shape_nodes} node(s) for dynamic shapes" if c.fallback_ops else f"{c.dynamic_shape_nodes} node(s) for dynamic shapes"
            fixed = "-" if c.fixed_supported is None else f"{c.fixed_supported}/{c.nodes} in {c.fixed_partitions} ({c.fixed_suitability})"
            out.append((c.ep, f"{c.supported}/{c.nodes}", f"{c.fraction:.0%}", str(c.partitions), fallback, fixed, c.suitability))
        return out



def _write_source(model: Any, path: Path) -> None:
    """Write the model to convert: an ir.Model, an onnx.ModelProto or a path to an .onnx file."""
    from onnxpress import io

    if isinstance(model, (str, os.PathLike)):
        model = io.load(model)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() < 2**31 - 1:
            path.write_bytes(model.SerializeToString())
            return
        model = ir.serde.deserialize_model(model)
    io.save(model, path)


def _file_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def convert_to_ort(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    style: OptimizationStyle = "runtime",
    target_platform: Literal["arm", "amd64"] = "arm",
    type_reduction: bool = False,
    save_optimized: bool = False,
) -> tuple[Path, Path]:
    """Convert one .onnx file to ORT format with onnxruntime's converter; returns (ort path, ops config path).

    ``out``: a folder (files get the model's name: ``<name>.ort``, ``<name>.required_operators.config``) or
    the ``.ort`` path to write (the config gets the same stem). Files are written to a temporary folder
    beside the destination and moved into place only when the conversion succeeded.
    ``style``: ``runtime`` saves only ORT's basic optimizations and records the others to be replayed at run
    time (what ORT recommends with NNAPI/CoreML, which then see standard ONNX ops); ``fixed`` bakes in every
    optimization for the CPU provider (fused ops such as FusedGemm that NNAPI/CoreML cannot take); ``basic``
    saves the basic optimizations only. Raises ``OnnxpressError`` (one line, nothing written) when onnxruntime cannot convert the model.
    """
    src = Path(onnx_path)
    dest = Path(out)
    if dest.is_dir():
        ort_path = dest / (src.stem + ".ort")
    else:
        ort_path = dest if dest.suffix == ".ort" else dest.with_suffix(".ort")
    config_path = mobile_paths(ort_path, type_reduction).config
    folder = ort_path.parent if str(ort_path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    work = Path(tempfile.mkdtemp(prefix=f".{ort_path.stem}.ort-", dir=folder))
    try:
        # Stage a copy: the converter converts every .onnx in a folder and writes temporary folders beside it.
        staged = work / "src" / (src.stem + ".onnx")
        staged.parent.mkdir()
        _write_source(src, staged)
        produced_ort, produced_config, _ = _convert(staged, work, style, target_platform, type_reduction, save_optimized)
        _rewrite_config(produced_config, ort_path.name)
        os.replace(produced_ort, ort_path)
        os.replace(produced_config, config_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ort_path, config_path


def _convert(src: Path, work: Path, style: str, target_platform: str, type_reduction: bool, save_optimized: bool):
    """Run onnxruntime's converter on ``src`` into ``work/ort``; returns (ort, config, optimized onnx or None)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle as OrtStyle
    from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort

    if style not in STYLES:
        raise UsageError(f"unknown ORT conversion style '{style}' (valid: {', '.join(STYLES)})")
    out_dir = work / "ort"
    ort_style = OrtStyle.Runtime if style == "runtime" else OrtStyle.Fixed
    level = "basic" if style == "basic" else "all"
    try:
        with quiet_ort_tools(), native_stderr(), env_var("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", level):
            convert_onnx_models_to_ort(
                src, output_dir=out_dir, optimization_styles=[ort_style], target_platform=target_platform,
                enable_type_reduction=type_reduction, save_optimized_onnx_model=save_optimized,
            )
    except Exception as exc:
        raise OnnxpressError(f"ONNX Runtime Mobile cannot convert the model to ORT format: {one_line(exc)}") from None
    orts = sorted(out_dir.glob("*.ort"))
    configs = sorted(out_dir.glob("*.config"))
    if len(orts) != 1 or len(configs) != 1:
        raise OnnxpressError(f"onnxruntime's converter produced {len(orts)} .ort and {len(configs)} .config files, expected one each")
    optimized = next(iter(out_dir.glob("*.optimized.onnx")), None)
    return orts[0], configs[0], optimized


def _rewrite_config(config: Path, ort_name: str) -> list[str]:
    """Replace the converter's header (temporary paths) with the final .ort name; returns the op lines."""
    lines = [ln.strip() for ln in config.read_text().splitlines()]
    ops = [ln for ln in lines if ln and not ln.startswith("#")]
    config.write_text(f"# Generated by onnxpress with onnxruntime's converter from model/s:\n# - {ort_name}\n" + "\n".join(ops) + "\n")
    return ops


def required_ops(config: str | os.PathLike) -> list[str]:
    """The op entries of a required-operators config, one ``domain;opset;op`` string per op."""
    lines = (ln.strip() for ln in Path(config).read_text().splitlines())
    return [op for ln in lines if ln and not ln.startswith("#") for op in _expand(ln)]


def _basic_optimized(src: Path, work: Path) -> Path:
    """The graph NNAPI/CoreML see with runtime style: the model after ORT's basic optimizations."""
    from onnxruntime.tools.onnx_model_utils import optimize_model

    out = work / "basic" / "model.onnx"
    out.parent.mkdir()
    with native_stderr():
        optimize_model(src, out, use_external_initializers=True)
    return out


def check_mobile(
    model: Any,
    *,
    reference: Any = None,
    inputs: Any = None,
    dims: dict[str, int] | None = None,
    tolerance: Tolerance | None = None,
    style: OptimizationStyle = "runtime",
    type_reduction: bool = False,
    _keep: Callable[[Path, Path, MobileReport], None] | None = None,
) -> MobileReport:
    """Convert ``model`` to ORT format, run the ``.ort`` in onnxruntime against ``reference``, and estimate
    per-EP coverage. Writes nothing (a temporary folder is used and removed).

    ``model``: an ir.Model, onnx.ModelProto or .onnx path (the optimized model). ``reference``: what the
    .ort must match (default: ``model`` itself, with the lossless tolerance); ``inputs``/``dims``/``tolerance``
    as for ``onnxpress.validate.validate``. Raises ``OnnxpressError`` when the model cannot be converted or
    the .ort file does not load.
    """
    with tempfile.TemporaryDirectory(prefix="onnxpress-mobile-") as tmp:
        return _mobile(model, Path(tmp), "model", reference, inputs, dims, tolerance, style, type_reduction, _keep)


def _load_ort(ort_path: Path, replay: bool = False):
    """A CPU session for the .ort; ``replay``: with the saved runtime optimizations applied, as an app that
    follows ORT's advice for runtime-style files loads it. A load failure is one ``OnnxpressError`` line."""
    import onnxruntime as ort

    so = runtime.session_options()
    if replay:
        so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    try:
        return ort.InferenceSession(str(ort_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        how = " with its saved runtime optimizations replayed" if replay else ""
        raise OnnxpressError(f"the converted .ort model does not load in onnxruntime{how}: {one_line(exc)}") from None


def _convert_and_load(src: Path, work: Path, style: str, type_reduction: bool):
    """Convert and load the .ort (twice for runtime style: plain, and replaying its runtime optimizations)."""
    shutil.rmtree(work / "ort", ignore_errors=True)
    ort_path, config, optimized = _convert(src, work, style, "arm", type_reduction, style == "fixed")
    sessions = {"plain": _load_ort(ort_path)}
    if style == "runtime":
        sessions["replay"] = _load_ort(ort_path, replay=True)
    return ort_path, config, optimized, sessions


def _compare(session, feeds, reference_outputs, tolerance: Tolerance) -> ValidationReport:
    """``validate`` for an already open session (the replay session needs its own session options)."""
    names = list(reference_outputs[0])
    actual = [runtime.run(session, feed, names) for feed in feeds]
    comparisons = compare_runs(actual, reference_outputs, feeds, tolerance)
    shapes = {k: list(np.shape(v)) for k, v in feeds[0].items()}
    return ValidationReport("cpu", tolerance, comparisons, shapes, samples=max(c.samples for c in comparisons), feeds=len(feeds))


def _mobile(model, work: Path, stem: str, reference, inputs, dims, tolerance, style, type_reduction, keep) -> MobileReport:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    src = work / "src" / f"{stem}.onnx"
    src.parent.mkdir(parents=True)
    _write_source(model, src)
    notes: list[str] = []
    try:
        ort_path, config, optimized, sessions = _convert_and_load(src, work, style, type_reduction)
    except OnnxpressError as exc:
        if style != "runtime":
            raise
        # onnxruntime 1.32 cannot always record or replay runtime optimizations (QDQ MatMul+Add / Conv with a
        # float bias: "..._bias_dq"; MiniLM QDQ: "Not enough produced nodes in the runtime optimization
        # record"). The fixed style still gives a working .ort, with the CPU provider's fusions baked in.
        try:
            ort_path, config, optimized, sessions = _convert_and_load(src, work, "fixed", type_reduction)
        except OnnxpressError:
            raise exc from None
        style = "fixed"
        notes.append(f"runtime style failed ({str(exc).removeprefix('ONNX Runtime Mobile ')}); converted with fixed style, "
                     "so the .ort holds CPU-provider fusions that NNAPI/CoreML cannot take (style=basic keeps standard ops)")
    ops = _rewrite_config(config, f"{stem}.ort")
    seconds["convert"] = time.perf_counter() - start

    t = time.perf_counter()
    tolerance = tolerance or Tolerance()
    ref = str(src) if reference is None else (str(reference) if isinstance(reference, Path) else reference)
    ref_ir = ref if isinstance(ref, ir.Model) else load_model(ref) if isinstance(ref, str) else ir.serde.deserialize_model(ref)
    feeds = make_feeds(ref_ir, inputs, dims)
    ref_session = runtime.make_session(ref)  # one session at a time: a large model's weights are held once
    names = [o.name for o in ref_session.get_outputs()]
    reference_outputs = [runtime.run(ref_session, f, names) for f in feeds]
    del ref_session
    validation = validate(ref_ir, str(ort_path), inputs=feeds, tolerance=tolerance, reference_outputs=reference_outputs)
    replay = _compare(sessions["replay"], feeds, reference_outputs, tolerance) if "replay" in sessions else None
    del sessions
    seconds["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    analyzed = optimized if style == "fixed" and optimized is not None else _basic_optimized(src, work)
    coverage, dynamic = ep_coverage(analyzed, dims)
    seconds["ep_check"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    report = MobileReport(
        style=style, onnx_bytes=_file_bytes(src), ort_bytes=ort_path.stat().st_size,
        required_ops=[op for line in ops for op in _expand(line)], validation=validation, replay_validation=replay,
        ep_coverage=coverage, dynamic_inputs=dynamic, seconds={k: round(v, 3) for k, v in seconds.items()}, notes=notes,
    )
    if keep is not None:
        keep(ort_path, config, report)
    return report


def _expand(line: str) -> list[str]:
    domain, opset, ops = line.split(";", 2)
    if "{" in ops:  # type reduction: "op{types}" entries hold commas; keep the line whole
        return [line]
    return [f"{domain};{opset};{op}" for op in ops.split(",")]


def export_mobile(
    model: Any,
    output: str | os.PathLike,
    *,
    reference: Any = None,
    inputs: Any = None,
    dims: dict[str, int] | None = None,
    tolerance: Tolerance | None = None,
    style: OptimizationStyle = "runtime",
    type_reduction: bool = False,
    keep_failed: bool = False,
    force: bool = False,
) -> MobileReport:
    """``check_mobile``, then write the mobile files beside ``output`` (the .onnx path the caller writes):
    ``out.ort``, ``out.required_operators.config`` and the JSON report ``out.mobile.json``.

    They are written only when the .ort matches the reference (or ``keep_failed``); ``report.files`` lists
    what was written. Each file is written to a temporary folder in the output folder and moved into place.
    A conversion or load failure raises ``OnnxpressError`` and writes nothing. This function does not write
    ``output`` itself: call it before saving the .onnx, so a failure leaves no file at all.
    """
    paths = mobile_paths(output, type_reduction)
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{folder}: output folder is not writable")
    sources = [s for s in (model, reference) if isinstance(s, (str, os.PathLike))]
    for p in (paths.ort, paths.config, paths.report):
        for s in sources:
            if p.exists() and Path(s).exists() and os.path.samefile(p, s) and not force:
                raise UsageError(f"{p}: this output would overwrite the input; choose another path or pass --force")

    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.mobile-", dir=folder))

    def keep(ort_path: Path, config: Path, report: MobileReport) -> None:
        if not (report.passed or keep_failed):
            return
        import json

        report.files = {"ort": str(paths.ort), "config": str(paths.config), "report": str(paths.report)}
        staged_report = work / "report.json"
        staged_report.write_text(json.dumps(report.to_dict(), indent=2, default=str))
        mode = _umask_mode()
        for staged, final in ((ort_path, paths.ort), (config, paths.config), (staged_report, paths.report)):
            os.chmod(staged, mode)
            os.replace(staged, final)

    try:
        return _mobile(model, work, out.stem, reference, inputs, dims, tolerance, style, type_reduction, keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
