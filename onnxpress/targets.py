"""Deployment targets: ``cpu``, ``cuda`` and ONNX Runtime Mobile (``mobile``).

A target says where the rewritten model will run and therefore
- which execution provider validates it (``Target.provider``, a key of ``runtime.PROVIDERS``);
- which pass options it implies (``Target.pass_defaults``: pass name -> option overrides; an option the
  user set in the pipeline text always wins, see ``apply_target``).

Mobile (``export_mobile`` / ``check_mobile``): the model is converted to ORT format with onnxruntime's own
converter (``onnxruntime.tools.convert_onnx_models_to_ort``), the ``.ort`` file is loaded in onnxruntime
and compared with the reference, the required-operators config of a reduced-size build is written, and
onnxruntime's mobile usability checker estimates, per mobile execution provider (NNAPI, CoreML, XNNPACK),
how many nodes it takes, in how many partitions, and which op types fall back to the CPU provider.
All work happens in a temporary folder beside the output; files are moved into place only at the end, so a
failure leaves nothing behind.

CUDA (``check_cuda``): says precisely what is missing, onnxruntime-gpu or a visible GPU or its CUDA
libraries, instead of letting onnxruntime fall back to the CPU silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io as _stdio
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress import runtime
from onnxpress.errors import OnnxpressError, UsageError, ValidationError
from onnxpress.io import load as load_model
from onnxpress.validate import Tolerance, ValidationReport, compare_runs, make_feeds, validate


# ------------------------------------------------------------------------------------------------
# Targets: data only
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """Where the model will run: the provider that validates it and the pass options it implies."""

    name: str
    provider: str  # key of runtime.PROVIDERS: validation runs on this execution provider
    description: str
    pass_defaults: Mapping[str, Mapping[str, Any]]  # pass name -> {option: value}
    reasons: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # "pass.option" -> why


def _frozen(d: dict[str, dict[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in d.items()})


TARGETS: Mapping[str, Target] = MappingProxyType({
    "cpu": Target(
        "cpu", "cpu",
        "ONNX Runtime CPU (x86/ARM servers and desktops): the pass defaults are tuned for it",
        _frozen({}),
    ),
    "cuda": Target(
        "cuda", "cuda",
        "ONNX Runtime with CUDAExecutionProvider (onnxruntime-gpu and an NVIDIA GPU)",
        _frozen({"qdq": {"weight_type": "int8"}}),
        MappingProxyType({
            "qdq.weight_type": "symmetric int8 weights (zero point 0); uint8+128 only helps AVX2 CPU kernels",
        }),
    ),
    "mobile": Target(
        "mobile", "cpu",
        "ONNX Runtime Mobile (.ort format; NNAPI on Android, CoreML on iOS, XNNPACK, or the CPU provider)",
        # per_channel stays True on purpose: NNAPI's QDQ MatMul/Gemm want per-tensor weight scales, but
        # per-tensor int8 weights wreck transformers (MiniLM: embedding cosine 0.42 per-tensor vs 0.9925
        # per-channel, same run); the CPU provider and XNNPACK take per-channel weights, NNAPI Conv does too.
        _frozen({"qdq": {
            "activation_type": "uint8",
            "weight_type": "int8",
            "reduce_range": False,
            "smooth": "off",
        }}),
        MappingProxyType({
            "qdq.activation_type": "NNAPI takes only uint8 (asymmetric) activations in QDQ groups",
            "qdq.weight_type": "NNAPI/XNNPACK take int8 weights only when symmetric (zero point 0)",
            "qdq.reduce_range": "7-bit weights are an x86 AVX2 workaround; mobile kernels use the full int8 range",
            "qdq.smooth": "SmoothQuant puts a float Mul in front of most QuantizeLinear nodes: one more op per quantized input for the mobile EPs to place",
        }),
    ),
})


def get_target(target: str | Target) -> Target:
    if isinstance(target, Target):
        return target
    key = str(target).lower()
    if key not in TARGETS:
        raise UsageError(f"unknown target '{target}' (valid: {', '.join(TARGETS)})")
    return TARGETS[key]


def apply_target(pipeline: Any, target: str | Target) -> Any:
    """The pipeline with the target's option defaults filled in; options set in the pipeline text win.

    ``pipeline``: a Pipeline, pipeline text or a list of passes. Returns a new ``Pipeline`` whose text shows
    the effective options (e.g. ``qdq(per_channel=false,...)``), so reports say what really ran.
    """
    from onnxpress.pipeline import Pipeline

    t = get_target(target)
    pipe = Pipeline.coerce(pipeline)
    passes = []
    for p in pipe:
        overrides = t.pass_defaults.get(p.name)
        if not overrides:
            passes.append(p)
            continue
        fields = {f.name for f in dataclasses.fields(p.Options)}
        unknown = sorted(set(overrides) - fields)
        if unknown:  # a renamed option must not silently drop a target constraint
            raise UsageError(f"target {t.name}: pass '{p.name}' has no option {', '.join(unknown)}")
        kwargs = {k: getattr(p.options, k) for k in p.explicit}
        for key, value in overrides.items():
            kwargs.setdefault(key, value)
        passes.append(type(p)(**kwargs))
    return Pipeline(passes)


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------
_CUDA = runtime.PROVIDERS["cuda"]


@dataclasses.dataclass
class CudaStatus:
    """What this machine offers for ``--target cuda``; ``problem`` names what is missing (None: usable)."""

    onnxruntime: str
    packages: list[str]  # installed onnxruntime distributions, e.g. ["onnxruntime-gpu 1.32.0"]
    providers: list[str]  # ort.get_available_providers()
    problem: str | None = None
    detail: str = ""  # what onnxruntime said when the CUDA provider did not start

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _installed_ort_packages() -> list[str]:
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "ort-nightly-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


@contextlib.contextmanager
def _native_stderr():
    """Capture what native code (onnxruntime's C++ logger) writes to file descriptor 2."""
    captured: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as buf:
        saved = os.dup(2)
        os.dup2(buf.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            captured.append(buf.read().decode("utf-8", "replace"))


def _probe_cuda() -> tuple[bool, str]:
    """Start a CUDA session on a one-node model; (True, "") when CUDA really runs it, else (False, reason)."""
    import numpy as np
    import onnxruntime as ort

    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Add", ["x", "x"], ["y"])], "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    so = ort.SessionOptions()
    so.log_severity_level = 2
    error = ""
    with _native_stderr() as native, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "provider not in available provider names": the result says it
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=[_CUDA, "CPUExecutionProvider"], enable_fallback=0)
            ok = session.get_providers()[0] == _CUDA
            if ok:
                session.disable_fallback()
                session.run(None, {"x": np.ones(2, np.float32)})
        except Exception as exc:  # an EP error: CUDA libraries missing, no device
            ok, error = False, " ".join(str(exc).split())
    log = " ".join(" ".join(native).split())
    return ok, (error + " " + log).strip()


_LIB_PATTERN = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file|(\w+\.dll)[^.]*(?:not found|could not be loaded)", re.I)
_NO_DEVICE = ("no cuda-capable device", "cudaerrornodevice", "cuda failure 100", "cuda_error_no_device", "no gpu",
              "cuda driver version is insufficient", "found no nvidia driver")


def cuda_status(
    available: Sequence[str] | None = None,
    packages: Sequence[str] | None = None,
    probe: bool | Callable[[], tuple[bool, str]] = True,
) -> CudaStatus:
    """Check CUDA validation here: provider compiled in, GPU visible, libraries loadable.

    ``available``/``packages``/``probe`` replace what is read from onnxruntime (tests, dry runs);
    ``probe=False`` skips starting a CUDA session (the check is then only "onnxruntime-gpu is installed").
    """
    import onnxruntime as ort

    providers = list(ort.get_available_providers() if available is None else available)
    pkgs = list(_installed_ort_packages() if packages is None else packages)
    status = CudaStatus(ort.__version__, pkgs, providers)
    names = [p.split()[0] for p in pkgs]
    if _CUDA not in providers:
        offered = ", ".join(providers) or "nothing"
        if "onnxruntime-gpu" in names and "onnxruntime" in names:
            status.problem = (
                "CUDA validation needs onnxruntime-gpu, but both onnxruntime and onnxruntime-gpu are installed and the "
                f"CPU-only build was imported (it offers {offered}); fix: `pip uninstall -y onnxruntime onnxruntime-gpu "
                "&& pip install onnxruntime-gpu`"
            )
        else:
            status.problem = (
                f"CUDA validation needs onnxruntime-gpu, which is not installed: onnxruntime {ort.__version__} offers "
                f"{offered}; fix: `pip uninstall -y onnxruntime && pip install onnxruntime-gpu` on a machine with an NVIDIA GPU"
            )
        return status
    if probe is False:
        return status
    ok, detail = (probe if callable(probe) else _probe_cuda)()
    status.detail = detail[:600]
    if ok:
        return status
    low = detail.lower()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    lib = _LIB_PATTERN.search(detail)
    gpu_package = next((p for p in pkgs if p.startswith("onnxruntime-gpu")), f"onnxruntime {ort.__version__}")
    if lib:
        status.problem = (
            f"{gpu_package} is installed but its CUDA provider cannot load {lib.group(1) or lib.group(2)} (CUDA/cuDNN runtime "
            "libraries missing or of the wrong major version); fix: install the CUDA and cuDNN versions this onnxruntime-gpu "
            "was built for, e.g. `pip install onnxruntime-gpu[cuda,cudnn]`"
        )
    elif visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        status.problem = f"{gpu_package} is installed but no GPU is visible: CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    elif any(s in low for s in _NO_DEVICE) or (sys.platform.startswith("linux") and not os.path.exists("/dev/nvidia0")):
        status.problem = f"{gpu_package} is installed but no GPU is visible (no CUDA device found by the driver)"
    else:
        status.problem = f"{gpu_package} is installed but CUDAExecutionProvider did not start"
    if detail and not lib:
        status.problem += f"; onnxruntime said: {detail[:300]}"
    return status


def check_cuda(
    available: Sequence[str] | None = None,
    packages: Sequence[str] | None = None,
    probe: bool | Callable[[], tuple[bool, str]] = True,
) -> list[str]:
    """The provider list for CUDA validation (as ``runtime.resolve_providers("cuda")``), or a
    ``ValidationError`` naming what is missing: onnxruntime-gpu, a visible GPU, or its CUDA libraries."""
    status = cuda_status(available, packages, probe)
    if status.problem:
        raise ValidationError(status.problem)
    return runtime.resolve_providers("cuda", status.providers)  # one provider list for CUDA, runtime's


def ep_assignment(model: Any, provider: str = "cpu") -> dict[str, dict[str, int]]:
    """Which execution provider runs which nodes once onnxruntime has partitioned the graph:
    ``{provider name: {op type: node count}}`` (CUDA: the ops that fall back to the CPU provider)."""
    import onnxruntime as ort

    providers = check_cuda() if provider == "cuda" else runtime.resolve_providers(provider)
    so = runtime.session_options()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    with runtime.model_source(model) as source:
        try:
            session = ort.InferenceSession(source, so, providers=providers)
        except Exception as exc:
            raise ValidationError(f"onnxruntime cannot load the model: {_one_line(exc)}") from None
    out: dict[str, Counter] = {}
    for sub in session.get_provider_graph_assignment_info():
        counts = out.setdefault(sub.ep_name, Counter())
        for node in sub.get_nodes():
            counts[node.op_type] += 1
    return {ep: dict(sorted(c.items())) for ep, c in out.items()}


# ------------------------------------------------------------------------------------------------
# Mobile: EP coverage (onnxruntime's usability checker, plus XNNPACK rules)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpCoverage:
    """How much of the graph one mobile execution provider can take (an estimate by op type and shapes)."""

    ep: str
    nodes: int
    supported: int
    partitions: int
    partition_sizes: list[int]
    fallback_ops: list[str]  # op types the EP cannot take: they run on the CPU provider
    dynamic_shape_nodes: int  # nodes rejected only because an input shape is not fixed
    rank_ops: list[str]  # op types rejected for tensor rank (CoreML: rank > 5)
    suitability: str  # ORT's verdict: YES (one partition > 75% of nodes), MAYBE, NO; n/a for XNNPACK (CPU)
    fixed_supported: int | None = None  # if every shape were fixed (None: no node was rejected for its shapes)
    fixed_partitions: int | None = None
    fixed_suitability: str | None = None
    caveats: list[str] = dataclasses.field(default_factory=list)  # per-op conditions the estimate does not check
    source: str = "onnxruntime usability checker"

    @property
    def fraction(self) -> float:
        return self.supported / self.nodes if self.nodes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fraction": self.fraction}


# XNNPACK has no supported-ops file in onnxruntime's tools: these rules follow ORT's
# onnxruntime/core/providers/xnnpack/detail/node_support_checker.cc (and each kernel's IsOnnxNodeSupported).
XNNPACK_OPS: Mapping[str, str] = MappingProxyType({
    "ai.onnx:Conv": "2D (4-D input); constant weights",
    "ai.onnx:ConvTranspose": "2D (4-D input); constant weights",
    "ai.onnx:QLinearConv": "2D (4-D input); constant weights",
    "ai.onnx:MaxPool": "2D (4-D input)",
    "ai.onnx:AveragePool": "2D (4-D input)",
    "ai.onnx:Softmax": "float or QDQ uint8",
    "ai.onnx:Resize": "2D (4-D input), linear or nearest",
    "ai.onnx:Gemm": "alpha=beta=1; constant B and C; inputs of rank <= 2",
    "ai.onnx:MatMul": "float; constant B; A and B of rank <= 2",
    "ai.onnx:Relu": "only fused into a preceding Conv/MaxPool/AveragePool",
    "ai.onnx:Clip": "only fused into a preceding Conv/MaxPool/AveragePool; constant min/max",
})


class _XnnpackChecker:
    """Duck-types usability_checker._SupportedOpsChecker (is_op_supported, get_caveats) for XNNPACK."""

    _FUSES_INTO = ("Conv", "MaxPool", "AveragePool")

    def __init__(self, graph: onnx.GraphProto, value_info: Mapping[str, onnx.ValueInfoProto]) -> None:
        self.constants = {i.name for i in graph.initializer}
        self.const_rank = {i.name: len(i.dims) for i in graph.initializer}
        self.constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
        self.value_info = value_info
        self.producer = {o: n for n in graph.node for o in n.output}
        self.seen: set[str] = set()
        self.has_qdq = any(n.op_type == "DequantizeLinear" for n in graph.node)

    def _rank(self, name: str) -> int | None:
        if name in self.const_rank:
            return self.const_rank[name]
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return len(vi.type.tensor_type.shape.dim)

    def _elem(self, name: str) -> int | None:
        vi = self.value_info.get(name)
        return vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else None

    def _attr(self, node: onnx.NodeProto, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def _supported(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        op, ins = node.op_type, node.input
        if op in ("Conv", "ConvTranspose", "QLinearConv"):
            weight = ins[3] if op == "QLinearConv" else ins[1]
            return self._rank(ins[0]) in (4, None) and weight in self.constants
        if op in ("MaxPool", "AveragePool", "Resize"):
            return self._rank(ins[0]) in (4, None)
        if op == "Softmax":
            return True
        if op == "Gemm":
            if self._attr(node, "alpha", 1.0) != 1.0 or self._attr(node, "beta", 1.0) != 1.0:
                return False
            consts = ins[1] in self.constants and (len(ins) < 3 or not ins[2] or ins[2] in self.constants)
            return consts and all((self._rank(i) or 0) <= 2 for i in ins[:2])
        if op == "MatMul":
            float_a = self._elem(ins[0]) in (onnx.TensorProto.FLOAT, None)
            return float_a and ins[1] in self.constants and all((self._rank(i) or 3) <= 2 for i in ins[:2])
        if op in ("Relu", "Clip"):
            src = self.producer.get(ins[0])
            if src is None or src.op_type not in self._FUSES_INTO or not self._supported(src):
                return False
            return op == "Relu" or all(not i or i in self.constants for i in ins[1:])
        return False

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        ok = self._supported(node)
        if ok:
            self.seen.add(f"ai.onnx:{node.op_type}")
        return ok

    def get_caveats(self) -> list[str]:
        out = [f"{op}: {XNNPACK_OPS[op]}" for op in sorted(self.seen) if op in XNNPACK_OPS]
        if self.has_qdq:
            out.append("QDQ groups (DequantizeLinear -> op -> QuantizeLinear) are counted as unsupported; XNNPACK takes some QDQ Conv/MatMul groups")
        return out


def _shape_inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every value as far as they can be known: onnxruntime's symbolic shape inference (it follows
    Shape/Range/Reshape chains of transformer graphs; needs the initializer data), else onnx's with data
    propagation, else the model as it is."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    has_data = all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if has_data:
        try:
            with _native_stderr(), contextlib.redirect_stdout(_stdio.StringIO()):
                inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
            if inferred is not None:
                return inferred
        except Exception:
            pass
    for kwargs in ({"strict_mode": True, "data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(proto, **kwargs)
        except Exception:
            continue
    return proto


def _value_info(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    out = {v.name: v for v in graph.input}
    out.update({v.name: v for v in graph.output})
    out.update({v.name: v for v in graph.value_info})
    return out


def ep_coverage(model: onnx.ModelProto | str | os.PathLike, dims: Mapping[str, int] | None = None) -> tuple[list[EpCoverage], list[str]]:
    """Per mobile EP coverage of a model (as the EP would see it: pass the graph after ORT's basic
    optimizations, which ``check_mobile`` does). ``dims`` fixes symbolic dimensions (``{"batch": 1}``) as
    the deployed app would. Returns (coverage rows, names of inputs whose shapes stay dynamic)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    if isinstance(model, (str, os.PathLike)):
        proto = onnx.load(os.fspath(model))  # with its data: symbolic shape inference reads constants
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    if dims:
        del proto.graph.value_info[:]
        for name, value in dims.items():
            make_dim_param_fixed(proto.graph, name, int(value))
    proto = _shape_inferred(proto)
    graph = proto.graph
    quiet = logging.getLogger("onnxpress.targets.usability")
    quiet.setLevel(logging.CRITICAL)
    dynamic_inputs, _ = uc.check_shapes(graph, quiet)
    initializer_names = {i.name for i in graph.initializer}
    dynamic = [i.name for i in dynamic_inputs if i.name not in initializer_names]
    value_info = _value_info(graph)

    def xnnpack(m: onnx.ModelProto, fixed: bool):
        return uc.check_partitioning(m.graph, _XnnpackChecker(m.graph, value_info), fixed)

    checkers: list[tuple[str, Callable[[onnx.ModelProto, bool], Any], str]] = [
        ("NNAPI", uc.check_nnapi_partitions, "onnxruntime usability checker"),
        ("CoreML MLProgram", lambda m, f: uc.check_coreml_partitions(m, f, "coreml_supported_mlprogram_ops.md"), "onnxruntime usability checker"),
        ("CoreML NeuralNetwork", lambda m, f: uc.check_coreml_partitions(m, f, "coreml_supported_neuralnetwork_ops.md"), "onnxruntime usability checker"),
        ("XNNPACK", xnnpack, "onnxpress rules from onnxruntime's XNNPACK node_support_checker"),
    ]
    rows = []
    for ep, fn, source in checkers:
        try:
            info = fn(proto, True)
        except ValueError:  # no shape information at all: only the op-type estimate is possible
            info = fn(proto, False)
        row = EpCoverage(
            ep=ep, nodes=info.num_nodes, supported=info.num_supported_nodes, partitions=info.num_partitions,
            partition_sizes=[len(g) for g in info.supported_groups], fallback_ops=sorted(info.unsupported_ops),
            dynamic_shape_nodes=info.nodes_unsupported_due_to_dynamic_input, rank_ops=sorted(info.ops_with_unsupported_rank),
            suitability=_verdict(ep, info),
            caveats=list(info.supported_ops_checker.get_caveats()), source=source,
        )
        if info.nodes_unsupported_due_to_dynamic_input and info.num_nodes:
            fixed = fn(proto, False)
            row.fixed_supported, row.fixed_partitions = fixed.num_supported_nodes, fixed.num_partitions
            row.fixed_suitability = _verdict(ep, fixed)
        rows.append(row)
    return rows, dynamic


def _verdict(ep: str, info: Any) -> str:
    """ORT's rule (YES: one partition with > 75% of the nodes) assumes a device copy between partitions;
    XNNPACK runs on the CPU, so its partitions cost nothing and there is no verdict."""
    if ep == "XNNPACK":
        return "n/a"
    return info.suitability().name if info.num_nodes else "NO"


# ------------------------------------------------------------------------------------------------
# Mobile: conversion to ORT format, validation of the .ort, the report
# ------------------------------------------------------------------------------------------------
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:\s*", "", text)
    return text[:400] or type(exc).__name__


@contextlib.contextmanager
def _quiet_ort_tools():
    """The converter prints to stdout and logs at INFO; keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "ort_format_model")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(_stdio.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _env(key: str, value: str):
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


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
        with _quiet_ort_tools(), _native_stderr(), _env("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", level):
            convert_onnx_models_to_ort(
                src, output_dir=out_dir, optimization_styles=[ort_style], target_platform=target_platform,
                enable_type_reduction=type_reduction, save_optimized_onnx_model=save_optimized,
            )
    except Exception as exc:
        raise OnnxpressError(f"ONNX Runtime Mobile cannot convert the model to ORT format: {_one_line(exc)}") from None
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
    with _native_stderr():
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
        raise OnnxpressError(f"the converted .ort model does not load in onnxruntime{how}: {_one_line(exc)}") from None


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
