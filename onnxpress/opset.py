"""Opsets: which default-domain opset a model uses, and raising it with ONNX's own version converter.

Why onnx.version_converter and not onnxscript's: onnxscript's converter (what ``qdq`` used to call on its own)
only converts from opset 18 on ("Target opset version 13 is not supported. Supported range: 18 to 25"), while
most public ONNX files are opset 7-17. ``onnx.version_converter`` has adapters for every opset of the default
domain; it leaves other domains (ai.onnx.ml, com.microsoft, ...) and their nodes as they are.

``convert`` works in place on an ``ir.Model`` (the graph is swapped for the converted one, so passes and the
caller keep their reference) and says what it changed; ``check`` runs the model before and after in
onnxruntime. The ``upgrade-opset`` pass (``onnxpress.passes.upgrade_opset``) puts both together, and the
pipeline inserts it before any pass whose ``required_opset()`` is above the model's opset.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import onnx
import onnx_ir as ir

from onnxpress.errors import OnnxpressError

DEFAULT_DOMAINS = ("", "ai.onnx")


def newest_opset() -> int:
    """The newest default-domain opset the installed onnx package (and so its converter) knows."""
    return onnx.defs.onnx_opset_version()


def default_opset(model: ir.Model) -> int | None:
    """The model's default-domain (ai.onnx) opset, or None when it imports none (e.g. a pure ai.onnx.ml model)."""
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


@dataclasses.dataclass
class Conversion:
    """What one conversion did: opsets, node counts, and per op type how many nodes were rewritten."""

    from_opset: int
    to_opset: int
    nodes_before: int
    nodes_after: int
    rewritten: dict[str, int]  # op type -> nodes whose attributes/inputs the converter changed
    added: dict[str, int]  # op type -> nodes the converter inserted (e.g. Constant for attributes that became inputs)
    removed: dict[str, int]  # op type -> nodes that are gone (replaced by another op type)

    @property
    def nodes_changed(self) -> int:
        return sum(self.rewritten.values()) + sum(self.added.values()) + sum(self.removed.values())

    def ops_touched(self) -> list[str]:
        """Op types involved in any change, most changed first."""
        total: collections.Counter[str] = collections.Counter()
        for table in (self.rewritten, self.added, self.removed):
            total.update(table)
        return [op for op, _ in total.most_common()]

    def describe(self) -> str:
        if self.from_opset == self.to_opset:
            return f"already at opset {self.to_opset}"
        parts = [f"{op} x{n}" for op, n in sorted(self.rewritten.items(), key=lambda kv: -kv[1])]
        parts += [f"+{op} x{n}" for op, n in sorted(self.added.items(), key=lambda kv: -kv[1])]
        parts += [f"-{op} x{n}" for op, n in sorted(self.removed.items(), key=lambda kv: -kv[1])]
        changes = ", ".join(parts) if parts else "no node changed"
        return f"opset {self.from_opset} -> {self.to_opset}: {self.nodes_changed} nodes changed ({changes})"

    def to_row(self) -> dict[str, Any]:
        return {
            "layer": "(model)",
            "from_opset": self.from_opset,
            "to_opset": self.to_opset,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "nodes_changed": self.nodes_changed,
            "rewritten": dict(self.rewritten),
            "added": dict(self.added),
            "removed": dict(self.removed),
        }


def _signature(node: ir.Node) -> tuple:
    """What a converter can change about a node: op, attributes (values, except subgraphs), inputs."""
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            attrs.append((name, "graph"))
        elif attr.type == ir.AttributeType.TENSOR:
            tensor = attr.value
            attrs.append((name, str(tensor.dtype), tuple(tensor.shape), tensor.tobytes() if tensor.size <= 64 else tensor.size))
        else:
            value = attr.value
            attrs.append((name, tuple(value) if isinstance(value, (list, tuple)) else value))
    inputs = tuple(v.name if v is not None else "" for v in node.inputs)
    return node.domain, node.op_type, tuple(attrs), inputs


def _node_table(model: ir.Model) -> dict[tuple[str, ...], tuple[str, tuple]]:
    table = {}
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        key = tuple(v.name or f"#{i}.{j}" for j, v in enumerate(node.outputs)) or (f"#{i}",)
        table[key] = (node.op_type, _signature(node))
    return table


def diff(before: ir.Model, after: ir.Model, from_opset: int, to_opset: int) -> Conversion:
    """Nodes matched by their output names (the converter keeps them): rewritten, added and removed ones."""
    old, new = _node_table(before), _node_table(after)
    rewritten: collections.Counter[str] = collections.Counter()
    added: collections.Counter[str] = collections.Counter()
    removed: collections.Counter[str] = collections.Counter()
    for key, (op, sig) in new.items():
        if key not in old:
            added[op] += 1
        elif old[key][0] != op:
            removed[old[key][0]] += 1
            added[op] += 1
        elif old[key][1] != sig:
            rewritten[op] += 1
    for key, (op, _sig) in old.items():
        if key not in new:
            removed[op] += 1
    return Conversion(from_opset, to_opset, len(old), len(new), dict(rewritten), dict(added), dict(removed))


def _base_dir(model: ir.Model) -> str | None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return tensor.base_dir
    return None


def convert(model: ir.Model, target: int) -> Conversion:
    """Raise ``model``'s default-domain opset to ``target`` in place with ``onnx.version_converter``.

    External tensors stay references to their files (only the graph structure is serialized for the
    converter); other domains and their opset imports are kept unchanged. A converter failure is one
    ``OnnxpressError`` line naming the op it could not convert.
    """
    current = default_opset(model)
    if current is None or current >= target:
        at = current if current is not None else target
        return Conversion(at, at, 0, 0, {}, {}, {})
    if target > newest_opset():
        raise OnnxpressError(f"opset {target} is newer than the installed onnx package knows (up to {newest_opset()})")
    base_dir = _base_dir(model)
    proto = ir.to_proto(model)
    # The converter keys the default domain by "" only; "ai.onnx" is the same domain under its long name.
    for entry in proto.opset_import:
        if entry.domain == "ai.onnx":
            entry.domain = ""
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # noqa: BLE001 - the C++ converter raises plain RuntimeError/ValueError
        lines = str(exc).strip().splitlines()
        raise OnnxpressError(
            f"cannot convert opset {current} -> {target} with onnx.version_converter: {lines[0] if lines else type(exc).__name__}"
        ) from None
    del proto
    # IR version: a model stamped with an old IR version but a new opset is refused by some loaders.
    needed_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, needed_ir, model.ir_version)
    new = ir.serde.deserialize_model(converted)
    if base_dir is not None:
        ir.external_data.set_base_dir(new.graph, base_dir)
    summary = diff(model, new, current, target)
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)
    return summary


@dataclasses.dataclass
class Check:
    """The conversion's check in onnxruntime: ``passed`` is None when it could not run (``note`` says why)."""

    passed: bool | None
    note: str
    max_abs: float = 0.0
    worst_output: str = ""


def check(original: ir.Model, converted: ir.Model, feeds: list[dict[str, Any]] | None) -> Check:
    """Run both models in onnxruntime on ``feeds`` (None: generated inputs) within the lossless tolerance."""
    from onnxpress import runtime
    from onnxpress.validate import Tolerance, make_feeds, validate

    data = "a calibration batch" if feeds else "generated inputs"
    try:
        feed_list = make_feeds(original, feeds[:1] if feeds else None)
        session = runtime.make_session(original)
        names = [o.name for o in session.get_outputs()]
        expected = [runtime.run(session, f, names) for f in feed_list]
        del session
    except Exception as exc:  # noqa: BLE001 - the original itself does not run here: nothing to compare with
        return Check(None, f"not checked: onnxruntime cannot run the original on {data} ({_first_line(exc)})")
    try:
        report = validate(original, converted, inputs=feed_list, tolerance=Tolerance(), reference_outputs=expected)
    except Exception as exc:  # noqa: BLE001 - the converted model does not load or run: that is the finding
        return Check(False, f"onnxruntime cannot run the converted model: {_first_line(exc)}", float("inf"))
    worst = max(report.outputs, key=lambda o: o.max_abs) if report.outputs else None
    return Check(report.passed, f"checked on {data}", worst.max_abs if worst else 0.0, worst.name if worst else "")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:300]
