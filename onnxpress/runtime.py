"""onnxruntime sessions for ir models, protos and files; provider selection; intermediate-value capture.

Every numeric fact in onnxpress (validation, calibration statistics, latency) comes from here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.errors import ValidationError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
_PROTO_LIMIT = 2**31 - 1


def resolve_providers(provider: str = "cpu", available: Sequence[str] | None = None) -> list[str]:
    """Provider list for onnxruntime; a clear error when the requested one is not usable here."""
    import onnxruntime as ort

    key = provider.lower()
    if key not in PROVIDERS:
        raise ValidationError(f"unknown provider '{provider}' (valid: {', '.join(PROVIDERS)})")
    available = list(ort.get_available_providers() if available is None else available)
    wanted = PROVIDERS[key]
    if wanted not in available:
        if key == "cuda":
            raise ValidationError(
                "CUDA validation needs onnxruntime-gpu and a visible GPU: CUDAExecutionProvider is not available "
                f"(installed onnxruntime offers {', '.join(available)}); `pip install onnxruntime-gpu` on a GPU machine"
            )
        raise ValidationError(f"{wanted} is not available in this onnxruntime ({', '.join(available)})")
    return [wanted] if key == "cpu" else [wanted, "CPUExecutionProvider"]


def session_options(threads: int | None = None, optimization: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: ORT's own ERROR lines would break the one-line error policy
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[optimization]
    return so


@contextlib.contextmanager
def model_source(model: Any) -> Iterator[Any]:
    """Yields something onnxruntime can open: bytes for small models, a path for big or external ones."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model)
        return
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"cannot run {type(model).__name__} in onnxruntime")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if not external and proto.ByteSize() < _PROTO_LIMIT:
        yield proto.SerializeToString()
        return
    # Large or external-data model: save to a temporary folder so ORT can mmap its data.
    with tempfile.TemporaryDirectory(prefix="onnxpress-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(proto)
        ir.save(ir_model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield path


def make_session(model: Any, provider: str = "cpu", threads: int | None = None, optimization: str = "all"):
    import onnxruntime as ort

    providers = resolve_providers(provider)
    with model_source(model) as source:
        try:
            session = ort.InferenceSession(source, sess_options=session_options(threads, optimization), providers=providers)
        except Exception as exc:
            raise ValidationError(f"onnxruntime cannot load the model: {_one_line(exc)}") from None
    if providers[0] != "CPUExecutionProvider":
        # onnxruntime silently falls back to the CPU when CUDA fails to start: a CUDA check must not pass on CPU.
        if session.get_providers()[0] != providers[0]:
            raise ValidationError(f"{providers[0]} could not start (onnxruntime fell back to {session.get_providers()[0]}); check the CUDA/cuDNN libraries")
        session.disable_fallback()
    return session


def run(session, feeds: dict[str, Any], output_names: Sequence[str] | None = None) -> dict[str, Any]:
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds)
    except Exception as exc:
        raise ValidationError(f"onnxruntime failed to run the model: {_one_line(exc)}") from None
    return dict(zip(names, values))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__


def expose_values(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of the model whose graph outputs also include the named intermediate values."""
    clone = ir.from_proto(ir.to_proto(model))
    by_name = {v.name: v for node in clone.graph for v in node.outputs}
    by_name.update({v.name: v for v in clone.graph.inputs})
    existing = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in existing:
            continue
        value = by_name.get(name)
        if value is None:
            raise KeyError(f"no value named '{name}' in the graph")
        if value.is_graph_input():
            continue
        clone.graph.outputs.append(value)
        existing.add(name)
    return clone


def capture(model: ir.Model, feeds: Iterable[dict[str, np.ndarray]], names: Sequence[str], provider: str = "cpu") -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each feed and yield the named intermediate values (inputs included).

    The model is run with ORT's basic optimizations only, so the captured values are exactly the
    ones the graph computes (no fusion removes them).
    """
    exposed = expose_values(model, names)
    session = make_session(exposed, provider, optimization="basic")
    input_names = {i.name for i in session.get_inputs()}
    wanted = [n for n in names if n not in input_names]
    for feed in feeds:
        out = run(session, feed, wanted)
        out.update({n: feed[n] for n in names if n in input_names})
        yield out
