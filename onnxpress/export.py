"""PyTorch -> ONNX: the dynamo exporter first, the TorchScript exporter as a fallback, one clear error otherwise.

``export(module, example_inputs)`` returns an ``onnx_ir.Model`` held in memory (nothing is written to disk),
ready for ``onnxpress.optimize(model, "pipeline")`` or ``onnxpress.save``.  The module is exported in eval
mode on the CPU; its training flag is restored afterwards.  The returned model owns copies of the weights,
so later changes to the module do not change the model.

Dynamic axes are given by input name: ``dynamic_axes_by_name={"input_ids": {0: "batch", 1: "sequence"}}``
(or ``{"input_ids": ["batch", "sequence"]}`` for the leading axes); the ONNX inputs then carry those
symbolic dimension names.  Example inputs should be larger than 1 along each dynamic axis: torch.export
specializes axes of size 0 or 1.

When the dynamo exporter fails, the TorchScript exporter is tried and a ``ExportFallbackWarning`` says why.
The TorchScript tracer records one path through Python control flow; if it warns that the trace depends on
tensor values (data-dependent control flow), the fallback is refused rather than returning a model that is
only right for the example inputs.  When both exporters fail, ``OnnxpressError`` carries each exporter's
reason on one paragraph and a hint naming the operator or the kind of failure.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.errors import OnnxpressError, UsageError

DEFAULT_OPSET = 18

AxesSpec = Mapping[int, str] | Sequence[str | None]


class ExportFallbackWarning(UserWarning):
    """The dynamo exporter failed and the TorchScript exporter was used instead."""


def export(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes_by_name: Mapping[str, AxesSpec] | None = None,
    opset: int = DEFAULT_OPSET,
    fallback: bool = True,
) -> ir.Model:
    """Export a ``torch.nn.Module`` to an ``onnx_ir.Model`` (CPU, eval mode, nothing written to disk).

    ``example_inputs``: a tensor or a tuple of positional tensors.  ``input_names`` default to the names
    of ``forward``'s parameters; ``output_names`` to ``output``, ``output_1``, ...  ``dynamic_shapes`` is
    passed to the dynamo exporter as is (torch.export's format); ``dynamic_axes_by_name`` is the simpler
    by-name form and works with both exporters.  ``fallback=False`` disables the TorchScript fallback.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"export expects a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(example_inputs)
    names = list(input_names) if input_names is not None else _forward_names(module, len(args))
    if len(names) != len(args):
        raise UsageError(f"{len(names)} input name(s) for {len(args)} example input(s)")
    axes = _normalize_axes(dynamic_axes_by_name, names, args)
    outputs = list(output_names) if output_names is not None else None
    label = type(module).__name__
    was_training = module.training
    module.eval()
    try:
        try:
            model = _export_dynamo(module, args, names, outputs, dynamic_shapes, axes, opset)
        except Exception as dynamo_exc:  # noqa: BLE001 - any exporter failure is reported, then the fallback runs
            dynamo_reason = describe_failure(dynamo_exc)
            if not fallback:
                raise OnnxpressError(_failure_message(label, dynamo_reason, None)) from None
            warnings.warn(
                f"the dynamo exporter failed for {label} ({dynamo_reason['summary']}); "
                "falling back to the TorchScript exporter",
                ExportFallbackWarning,
                stacklevel=2,
            )
            try:
                model = _export_torchscript(module, args, names, outputs, axes, opset)
            except Exception as ts_exc:  # noqa: BLE001
                raise OnnxpressError(_failure_message(label, dynamo_reason, describe_failure(ts_exc))) from None
    finally:
        module.train(was_training)
    _own_weights(model)
    return model


def run_module(module: Any, example_inputs: Any) -> list[np.ndarray]:
    """The module's outputs on the inputs (eval mode, no grad) as a flat list of numpy arrays."""
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*_as_args(example_inputs))
    finally:
        module.train(was_training)
    flat: list[np.ndarray] = []
    _flatten(out, flat)
    return flat


def compare_with_module(module: Any, model: Any, example_inputs: Any, tolerance: Any = None):
    """Run ``model`` (ONNX: ir.Model, proto or path) in onnxruntime and the module in torch on the same
    inputs; returns a ``ValidationReport`` whose reference is the PyTorch module."""
    from onnxpress import runtime
    from onnxpress.validate import Tolerance, ValidationReport, compare_arrays

    tolerance = tolerance or Tolerance()
    args = _as_args(example_inputs)
    expected = run_module(module, args)
    session = runtime.make_session(model)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    names = [o.name for o in session.get_outputs()]
    if len(names) != len(expected):
        raise OnnxpressError(f"the ONNX model has {len(names)} output(s), the module returned {len(expected)}")
    actual = runtime.run(session, feeds, names)
    comps = [compare_arrays(n, actual[n], e, tolerance) for n, e in zip(names, expected)]
    return ValidationReport("cpu (torch reference)", tolerance, comps, {k: list(v.shape) for k, v in feeds.items()})


# --- failure analysis --------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_failure(exc: BaseException) -> dict[str, str]:
    """The reason an exporter gave, reduced to one line, and a hint: {"summary", "op", "kind", "where"}."""
    text = _ANSI.sub("", str(exc))
    chain = [text] + [_ANSI.sub("", str(c)) for c in _causes(exc)]
    full = "\n".join(chain)
    summary = ""
    m = re.search(r"## Exception summary\s*\n+(.*?)(?:\n\n|\n⬆|$)", text, re.S)
    if m:
        summary = re.sub(r"<class '([\w.]+)'>:\s*", lambda g: g.group(1).rsplit(".", 1)[-1] + ": ", m.group(1))
    if not summary:
        summary = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    summary = " ".join(summary.split())[:300]
    op = ""
    for pattern in (
        r"No ONNX function found for <OpOverload\(op='([\w.:]+)'",
        r"operator '([\w:.]+)' to ONNX",
        r"target=torch\.ops\.([\w.]+)\.default",
        r"Unsupported: .*?(aten\.[\w.]+)",
    ):
        m = re.search(pattern, full)
        if m:
            op = m.group(1)
            break
    where = ""
    m = re.search(r'File "([^"]+)", line (\d+), in (\w+)', full)
    if m:
        where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}"
    lowered = full.lower()
    if "data-dependent" in lowered or "guardondatadependent" in lowered or "python boolean" in lowered:
        kind = "data-dependent control flow"
    elif op:
        kind = "unsupported operator"
    else:
        kind = "export error"
    return {"summary": summary, "op": op, "kind": kind, "where": where, "type": type(exc).__name__}


def _causes(exc: BaseException):
    seen = set()
    cur = exc.__cause__ or exc.__context__
    while cur is not None and id(cur) not in seen and len(seen) < 5:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _failure_message(label: str, dynamo: dict[str, str], torchscript: dict[str, str] | None) -> str:
    parts = [f"cannot export {label} to ONNX: the dynamo exporter (torch.export) failed: {dynamo['summary']}"]
    if torchscript is not None:
        parts.append(f"; the TorchScript exporter also failed: {torchscript['summary']}")
    else:
        parts.append(" (TorchScript fallback disabled)")
    ops = [r["op"] for r in (dynamo, torchscript) if r and r["op"]]
    where = next((r["where"] for r in (dynamo, torchscript) if r and r["where"]), "")
    kinds = {r["kind"] for r in (dynamo, torchscript) if r}
    if "data-dependent control flow" in kinds:
        hint = "the module branches on tensor values (data-dependent control flow)"
        hint += f" at {where}" if where else ""
        hint += "; rewrite the branch with torch.where or torch.cond, or make the condition a Python constant"
    elif ops:
        hint = f"operator {ops[0]} has no ONNX translation at this opset"
        if len(ops) > 1 and ops[1] != ops[0]:
            hint += f" (TorchScript: {ops[1]})"
        hint += "; replace it in the module, try a newer opset, or pass a custom translation"
    else:
        hint = "rerun with --debug (CLI) or call torch.onnx.export directly for the full trace"
    return "".join(parts) + f". Hint: {hint}."


# --- exporters ---------------------------------------------------------------------------------------


def _export_dynamo(module, args, names, outputs, dynamic_shapes, axes, opset) -> ir.Model:
    import torch

    if dynamic_shapes is None and axes:
        dynamic_shapes = tuple({int(k): v for k, v in axes[n].items()} if n in axes else None for n in names)
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
            report=False,
            external_data=False,
        )
    model = program.model
    _rename_dims(model, names, axes)
    return model


def _export_torchscript(module, args, names, outputs, axes, opset) -> ir.Model:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes={n: dict(a) for n, a in axes.items()} or None,
            opset_version=opset,
            do_constant_folding=True,
        )
    for w in caught:
        if type(w.message).__name__ == "TracerWarning" and "python" in str(w.message).lower():
            raise RuntimeError(
                "the trace depends on tensor values (data-dependent control flow: "
                f"{str(w.message).split('.')[0]}) " + f'File "{w.filename}", line {w.lineno}, in forward'
            )
    proto = onnx.load_from_string(buffer.getvalue())
    return ir.serde.deserialize_model(proto)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, registry warnings and deprecation chatter."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --- helpers -----------------------------------------------------------------------------------------


def _as_args(example_inputs: Any) -> tuple:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise UsageError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _forward_names(module: Any, count: int) -> list[str]:
    import inspect

    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) >= count:
        return params[:count]
    return [f"input_{i}" for i in range(count)]


def _normalize_axes(spec: Mapping[str, AxesSpec] | None, names: list[str], args: tuple) -> dict[str, dict[int, str]]:
    if not spec:
        return {}
    out: dict[str, dict[int, str]] = {}
    for name, axes in spec.items():
        if name not in names:
            raise UsageError(f"dynamic axes for unknown input '{name}' (inputs: {', '.join(names)})")
        rank = args[names.index(name)].dim()
        if isinstance(axes, Mapping):
            mapping = {int(k): str(v) for k, v in axes.items()}
        else:
            mapping = {i: str(v) for i, v in enumerate(axes) if v is not None}
        for axis in mapping:
            if not -rank <= axis < rank:
                raise UsageError(f"input '{name}' has rank {rank}; axis {axis} is out of range")
        out[name] = {a % rank: v for a, v in mapping.items()}
    return out


def _rename_dims(model: ir.Model, names: list[str], axes: dict[str, dict[int, str]]) -> None:
    """Give graph inputs the requested symbolic dim names (torch.export may call them s0, s1, ...)."""
    if not axes:
        return
    renames: dict[str, str] = {}
    for value in model.graph.inputs:
        wanted = axes.get(value.name)
        if not wanted or value.shape is None:
            continue
        for axis, label in wanted.items():
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value != label:
                renames.setdefault(dim.value, label)
    if not renames:
        return
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        dims = list(value.shape)
        changed = False
        for i, dim in enumerate(dims):
            if isinstance(dim, ir.SymbolicDim) and dim.value in renames:
                dims[i] = renames[dim.value]
                changed = True
        if changed:
            value.shape = ir.Shape(dims)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def _own_weights(model: ir.Model) -> None:
    """Replace initializers by numpy copies: the exporter's tensors share memory with the module's parameters."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor):
            continue
        value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=value.name)


def _flatten(obj: Any, out: list[np.ndarray]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj.detach().cpu().numpy())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _flatten(item, out)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _flatten(item, out)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        _flatten(obj.to_tuple(), out)
    elif obj is not None:
        raise OnnxpressError(f"cannot compare a module output of type {type(obj).__name__}")
