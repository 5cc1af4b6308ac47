"""onnxruntime sessions for ir models, protos and files; provider selection; intermediate-value capture.

Every numeric fact in onnxpress (validation, calibration statistics, latency) comes from here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.errors import ValidationError
from onnxpress.io import has_external_data

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
_PROTO_LIMIT = 2**31 - 1
# An in-memory model with more initializer bytes than this goes to onnxruntime as a file with external data
# (memory-mapped by ORT) instead of serialized bytes (a proto copy, a bytes copy and ORT's parsed copy).
INLINE_LIMIT_BYTES = 256 * 1024 * 1024


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
            raise ValidationError(cuda_provider_missing(available, installed_ort_packages()))
        raise ValidationError(f"{wanted} is not available in this onnxruntime ({', '.join(available)})")
    return [wanted] if key == "cpu" else [wanted, "CPUExecutionProvider"]


def installed_ort_packages() -> list[str]:
    """The onnxruntime distributions installed here, e.g. ``["onnxruntime-gpu 1.32.0"]``."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "ort-nightly-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def cuda_provider_missing(available: Sequence[str], packages: Sequence[str]) -> str:
    """Why CUDAExecutionProvider is not among the ``available`` providers, with the fix: the one message for
    it (``resolve_providers`` and ``onnxpress.targets.cuda_status`` both say this). ``packages``: as
    ``installed_ort_packages``."""
    import onnxruntime as ort

    offered = ", ".join(available) or "nothing"
    names = [p.split()[0] for p in packages]
    if "onnxruntime-gpu" in names and "onnxruntime" in names:
        return (
            "CUDA validation needs onnxruntime-gpu, but both onnxruntime and onnxruntime-gpu are installed and the "
            f"CPU-only build was imported (it offers {offered}); fix: `pip uninstall -y onnxruntime onnxruntime-gpu "
            "&& pip install onnxruntime-gpu`"
        )
    return (
        f"CUDA validation needs onnxruntime-gpu, which is not installed: onnxruntime {ort.__version__} offers "
        f"{offered}; fix: `pip uninstall -y onnxruntime && pip install onnxruntime-gpu` on a machine with an NVIDIA GPU"
    )


def runs_on(session, provider: str) -> bool:
    """Whether ``session`` really runs on ``provider`` (onnxruntime silently falls back to the CPU when CUDA
    does not start); if so, that fallback is switched off for its runs too."""
    if session.get_providers()[0] != provider:
        return False
    session.disable_fallback()
    return True


def session_options(threads: int | None = None, optimization: str = "all", low_memory: bool = False):
    """ORT session options.

    ``low_memory`` (validation of large models) keeps one copy of the weights, ORT's memory map of the file:
    - no pre-packed copies of MatMul weights (ORT computes from the mapped external data);
    - no arena, so transient buffers go back to the system after each node;
    - no graph optimizations and the priority-based node order. With ORT's fusions the nodes are renumbered
      and its scheduler runs every DequantizeLinear of a weight-quantized model before the first MatMul: all
      weights dequantized at once (a 3 GB float transient for a 3 GB model). Without them the order follows
      the model, where each DequantizeLinear sits next to its consumer (the int8 session of the 1 GB scale model: 1.16 -> 0.42 GB peak).
      The model's own arithmetic is what gets validated, which is the point of validation anyway.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: ORT's own ERROR lines would break the one-line error policy
    if low_memory:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        optimization = "disable"
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


def in_memory_bytes(model: ir.Model) -> int:
    """Bytes of the initializers held in memory (external tensors excluded: they are memory-mapped lazily)."""
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


@contextlib.contextmanager
def model_source(model: Any) -> Iterator[Any]:
    """Yields something onnxruntime can open: bytes for small models, a path for big or external ones."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model)
        return
    if isinstance(model, ir.Model):
        # Decide on the IR: serializing a large model only to measure it would copy every tensor twice.
        if not has_external_data(model) and in_memory_bytes(model) < INLINE_LIMIT_BYTES:
            yield ir.to_proto(model).SerializeToString()
            return
        ir_model = model
    elif isinstance(model, onnx.ModelProto):
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if not external and model.ByteSize() < _PROTO_LIMIT:
            yield model.SerializeToString()
            return
        ir_model = ir.serde.deserialize_model(model)
    else:
        raise TypeError(f"cannot run {type(model).__name__} in onnxruntime")
    # Large or external-data model: save to a temporary folder so ORT can mmap its data.
    with tempfile.TemporaryDirectory(prefix="onnxpress-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(ir_model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield path


def offload_weights(model: ir.Model) -> str:
    """Write ``model`` to a private temporary folder with external data and turn its in-memory initializers
    into lazy references to that file (same values); returns the saved model's path.

    For validating a large rewritten model: Python then no longer holds its weights while onnxruntime
    memory-maps the file, and a later ``io.save`` copies them file to file. The folder is removed when the
    model is garbage-collected.
    """
    import shutil
    import weakref

    folder = tempfile.mkdtemp(prefix="onnxpress-offload-")
    weakref.finalize(model, shutil.rmtree, folder, True)
    path = os.path.join(folder, "model.onnx")
    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
    saved = ir.load(path)
    for graph, saved_graph in zip(model.graphs(), saved.graphs()):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            other = saved_graph.initializers.get(name)
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or other is None:
                continue
            if isinstance(other.const_value, ir.ExternalTensor):
                other.const_value.base_dir = folder
                value.const_value = other.const_value
    return path


def make_session(model: Any, provider: str = "cpu", threads: int | None = None, optimization: str = "all", low_memory: bool = False):
    import onnxruntime as ort

    providers = resolve_providers(provider)
    with model_source(model) as source:
        try:
            session = ort.InferenceSession(source, sess_options=session_options(threads, optimization, low_memory), providers=providers)
        except Exception as exc:
            raise ValidationError(f"onnxruntime cannot load the model: {_one_line(exc)}") from None
    # A CUDA check must not pass on the CPU.
    if providers[0] != "CPUExecutionProvider" and not runs_on(session, providers[0]):
        raise ValidationError(f"{providers[0]} could not start (onnxruntime fell back to {session.get_providers()[0]}); check the CUDA/cuDNN libraries")
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


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy of ``model`` (in-memory tensors copied) whose external tensors still find their data.

    A proto round trip keeps an external tensor's ``location`` (relative to the model's folder) but not the
    folder itself (``base_dir``): the copy would then look for ``model.onnx.data`` in the working directory.
    The folder is copied tensor by tensor, so a model run from any working directory opens in onnxruntime.
    """
    copy = ir.from_proto(ir.to_proto(model))
    _copy_base_dirs(model, copy)
    return copy


def _copy_base_dirs(src: ir.Model, dst: ir.Model) -> None:
    for graph, other in zip(src.graphs(), dst.graphs()):
        for name, value in graph.initializers.items():
            tensor, target = value.const_value, other.initializers.get(name)
            if isinstance(tensor, ir.ExternalTensor) and target is not None and isinstance(target.const_value, ir.ExternalTensor):
                target.const_value.base_dir = tensor.base_dir


def expose_values(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of the model whose graph outputs also include the named intermediate values.

    The copy shares the model's tensors (``ir.Model.clone``): no weight is copied, and external tensors keep
    the folder their data is in.
    """
    clone = model.clone()
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
