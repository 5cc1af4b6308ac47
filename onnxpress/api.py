"""The Python API: ``optimize`` runs a pipeline and ends in a validation; everything stays in memory."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from onnxpress import __version__
from onnxpress.io import load, release_external_tensors
from onnxpress.pass_infra import Pass, PassContext, PassStats
from onnxpress.pipeline import Pipeline
from onnxpress.validate import Tolerance, ValidationReport, validate

# Lossy pipelines are judged on output cosine similarity unless the caller sets a tolerance.
LOSSY_MIN_COSINE = 0.99


def default_pipeline() -> str:
    from onnxpress.passes import DEFAULT_PIPELINE

    return DEFAULT_PIPELINE


def model_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Bytes the model takes on disk: the serialized proto plus its external data."""
    if isinstance(model, ir.Model):
        return _ir_model_bytes(model)
    return _proto_bytes(model)


def _proto_bytes(proto: onnx.ModelProto, skip_location: str | None = None) -> int:
    external = 0
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if info.get("location") != skip_location:
                external += int(info.get("length", 0) or 0)
    return proto.ByteSize() + external


_STAND_IN = "onnxpress-size-stand-in"


def _length_delimited(size: int) -> int:
    """Bytes of a length-delimited protobuf field of ``size`` bytes with a one-byte tag."""
    return 1 + _varint_len(size) + size


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def _ir_model_bytes(model: ir.Model) -> int:
    """``model_bytes`` without serializing the whole model: serializing it would copy every in-memory tensor
    (a 3 GB model quantized to int8: 0.75 GB) just to measure it. Large in-memory initializers are replaced by
    external-data stand-ins for the measurement; each one's exact serialized size is added back, one tensor at
    a time."""
    big = [
        v for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 1 << 20
    ]
    originals = [v.const_value for v in big]
    correction = 0
    try:
        for value, tensor in zip(big, originals):
            stand_in = ir.ExternalTensor(_STAND_IN, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name)
            real = ir.serde.serialize_tensor(tensor).ByteSize()
            stub = ir.serde.serialize_tensor(stand_in).ByteSize()
            correction += _length_delimited(real) - _length_delimited(stub)
            value.const_value = stand_in
        proto = ir.to_proto(model)
    finally:
        for value, tensor in zip(big, originals):
            value.const_value = tensor
    # The graph message grew by ``correction``: its length prefix inside the model may grow by a byte or two.
    graph_stub = proto.graph.ByteSize()
    correction += _varint_len(graph_stub + correction) - _varint_len(graph_stub)
    return _proto_bytes(proto, skip_location=_STAND_IN) + correction


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

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnxpress_version": self.version,
            "pipeline": self.pipeline,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "seconds": self.seconds,
            "passes": [p.to_dict() for p in self.passes],
            "validation": self.validation.to_dict() if self.validation else None,
            "bisect": [{"after": text, **r.to_dict()} for text, r in self.bisect] or None,
            "first_failing_pass": self.first_failing_pass,
        }


def optimize(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    pipeline: Pipeline | str | list[Pass] | None = None,
    *,
    validate_result: bool = True,
    inputs: Any = None,
    dims: dict[str, int] | None = None,
    calibration: Any = None,
    tolerance: Tolerance | None = None,
    provider: str = "cpu",
    verify_each: bool = False,
    bisect: bool = False,
    on_pass_start: Callable[[Pass], None] | None = None,
    on_pass_end: Callable[[Pass], None] | None = None,
) -> tuple[ir.Model | onnx.ModelProto, OptimizeReport]:
    """Run ``pipeline`` (text, Pipeline or passes; default: the lossless pipeline) and validate the result.

    The input is never modified: a path is loaded lazily; an in-memory model is copied first.
    ``calibration``: a path (.npz / folder) or a list of feeds, given to the passes that use it.
    ``bisect=True`` validates after every pass and stops at the first pass that breaks the tolerance
    (``report.first_failing_pass``); the returned model is then the one after that pass.
    Returns the rewritten model (an ``ir.Model``, or an ``onnx.ModelProto`` if the pipeline ends in a
    proto-stage pass such as ``sparsify``) and an ``OptimizeReport``.
    """
    start = time.perf_counter()
    pipe = Pipeline.coerce(pipeline, default_pipeline())
    if isinstance(model, (str, os.PathLike)):
        reference: Any = os.fspath(model)
        working = load(model)
        bytes_before = model_bytes(working)
    else:
        reference = ir.to_proto(model) if isinstance(model, ir.Model) else model
        working = ir.serde.deserialize_model(reference)
        if isinstance(model, ir.Model):
            _copy_base_dir(model, working)
        bytes_before = model_bytes(reference)
    context = PassContext(calibration=_calibration_feeds(calibration, working))
    if tolerance is None:
        tolerance = Tolerance() if pipe.lossless else Tolerance(min_cosine=LOSSY_MIN_COSINE)
    if bisect:
        return _bisect(pipe, working, reference, context, bytes_before, start, tolerance,
                       dict(inputs=inputs, dims=dims, provider=provider), verify_each, on_pass_start, on_pass_end)
    result = pipe.run(working, context=context, verify_each=verify_each, on_pass_start=on_pass_start, on_pass_end=_releasing(working, on_pass_end))
    out = result.model
    _stamp_metadata(out, str(pipe))
    report = None
    if validate_result:
        report = validate(reference, out, inputs=inputs, dims=dims, tolerance=tolerance, provider=provider)
    return out, OptimizeReport(str(pipe), bytes_before, model_bytes(out), time.perf_counter() - start, result.stats, report)


def _bisect(pipe, working, reference, context, bytes_before, start, tolerance, validate_kwargs, verify_each, on_pass_start, on_pass_end):
    """Run one pass at a time, validating after each; stop at the first that breaks the tolerance."""
    stats: list[PassStats] = []
    log: list[tuple[str, ValidationReport]] = []
    out: Any = working
    first_failing = None
    for p in pipe:
        end = _releasing(out, on_pass_end) if isinstance(out, ir.Model) else on_pass_end
        result = Pipeline([p]).run(out, context=context, verify_each=verify_each, on_pass_start=on_pass_start, on_pass_end=end)
        out = result.model
        stats.extend(result.stats)
        report = validate(reference, out, tolerance=tolerance, **validate_kwargs)
        log.append((str(p), report))
        if not report.passed:
            first_failing = str(p)
            break
    _stamp_metadata(out, str(pipe))
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


def _calibration_feeds(calibration: Any, model: ir.Model):
    if calibration is None or isinstance(calibration, list):
        return calibration
    from onnxpress.data import load_calibration

    return load_calibration(calibration, model)


def _copy_base_dir(src: ir.Model, dst: ir.Model) -> None:
    for value in src.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            ir.external_data.set_base_dir(dst.graph, tensor.base_dir)
            return


def _stamp_metadata(model: ir.Model | onnx.ModelProto, pipeline: str) -> None:
    entries = {"onnxpress.pipeline": pipeline, "onnxpress.version": __version__}
    if isinstance(model, ir.Model):
        model.metadata_props.update(entries)
    else:
        kept = [p for p in model.metadata_props if p.key not in entries]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        for key, value in entries.items():
            model.metadata_props.add(key=key, value=value)
