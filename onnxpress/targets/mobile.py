"""ONNX Runtime Mobile: how much of a graph each mobile execution provider can take.

Per execution provider (NNAPI, CoreML MLProgram and NeuralNetwork, XNNPACK): how many nodes it takes, in
how many partitions, and which op types fall back to the CPU provider. NNAPI and CoreML are estimated by
onnxruntime's own usability checker; XNNPACK has no supported-ops file in onnxruntime's tools, so its
rules are written here from onnxruntime's source. The estimate is by op type and shapes: it does not run
the providers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import onnx

from onnxpress.targets.ort_output import native_stderr


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
            with native_stderr(), contextlib.redirect_stdout(io.StringIO()):
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
