"""Measuring budget candidates in onnxruntime with one session.

``Simulator`` builds one ORT session of the model in which every layer weight is an *overridable
initializer* (an initializer that is also a graph input) and every factorizable layer is followed by an
``Add`` of an overridable zero bias. Running it with a layer's reconstructed weight (and bias delta) fed
for that layer, and nothing fed for the others, gives the output of the rewritten model exactly up to
float rounding, without building or loading a new model per candidate. The reference outputs come from
the same session with nothing fed, so both sides share ORT's arithmetic.

For budgets on a task metric (``accuracy_drop``, ``ppl_increase``, ...) the task's ``evaluate`` needs a
model: ``materialize`` writes the reconstructions into a copy of the model (weights replaced, bias Adds
kept), which computes the same function as the rewritten model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress import metrics as metrics_mod
from onnxpress import runtime
from onnxpress.budget.layers import Layer
from onnxpress.passes.graph_utils import new_initializer

Feed = dict[str, np.ndarray]
Override = dict[str, np.ndarray]


@dataclasses.dataclass
class OutputError:
    """Error of the float outputs against the reference over a list of feeds: the additive proxy ``d`` and
    the per-sample metrics of ``onnxpress.metrics`` (worst output)."""

    sq_err: float = 0.0  # sum over outputs of (sum of squared differences / sum of squared reference)
    outputs: int = 0
    per_sample: dict[str, float] = dataclasses.field(default_factory=dict)  # metrics.KEYS -> value (worst output)

    @property
    def d(self) -> float:
        """The additive proxy: mean over outputs of the squared relative L2 error (all feeds together)."""
        return self.sq_err / max(self.outputs, 1)

    def metrics(self) -> dict[str, float]:
        return {**self.per_sample, "d": self.d}


def compare(
    outputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    feeds: Sequence[Mapping[str, Any]] | None = None,
    per_sample: bool = True,
) -> OutputError:
    """``d`` over all feeds, and per-sample metrics (samples = batch rows of ``feeds``, ``onnxpress.metrics``)."""
    err = OutputError()
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for out, ref in zip(outputs, references):
        for name, expected in ref.items():
            diff = np.asarray(out[name], np.float64) - np.asarray(expected, np.float64)
            num[name] = num.get(name, 0.0) + float(np.vdot(diff, diff))
            den[name] = den.get(name, 0.0) + float(np.vdot(expected, expected))
    for name in num:
        err.sq_err += num[name] / den[name] if den[name] > 0 else (0.0 if num[name] == 0 else float("inf"))
        err.outputs += 1
    if per_sample:  # (the sensitivity needs only d: the per-sample metrics were ~6% of SmolLM2's sensitivity stage)
        per_output = metrics_mod.compare_outputs(outputs, references, feeds)
        err.per_sample = metrics_mod.worst(m.summary() for m in per_output.values())
    return err


def bias_name(layer: Layer) -> str:
    return f"{layer.weight}/budget_delta"


def switch_name(layer: Layer, block: int) -> str:
    return f"{layer.weight}/budget_act_int8_{block}"


def _quantized_input(graph: ir.Graph, node: ir.Node, layer: Layer, blocks: Sequence[int], opset: int) -> None:
    """Feed ``node`` its input as a kernel that quantizes it per row in blocks computes with: ``x + sum_B s_B *
    (fq_B(x) - x)``, ``fq_B`` symmetric int8 per row and block of ``B`` along K (scale max|x| / 127, round to
    nearest even: MatMulNBits at accuracy_level 4, exactly), ``s_B`` an overridable switch, 0 by default."""
    x = node.inputs[0]
    k = layer.matrix.shape[0]
    new: list[ir.Node] = []

    def op(kind: str, inputs: Sequence[ir.Value], tag: str, **attributes: object) -> ir.Value:
        out = ir.Value(name=f"{prefix}/{tag}")
        new.append(ir.node(kind, list(inputs), attributes or None, outputs=[out], name=f"{prefix}/{tag}"))
        return out

    total = x
    for block in blocks:
        prefix = switch_name(layer, block)
        switch = new_initializer(graph, prefix, np.zeros((), np.float32))
        graph.inputs.append(switch)
        padded = -(-k // block) * block
        rows = op("Reshape", [x, new_initializer(graph, f"{prefix}/rows_shape", np.array([-1, k], np.int64))], "rows")
        if padded != k:
            rows = op("Pad", [rows, new_initializer(graph, f"{prefix}/pads", np.array([0, 0, 0, padded - k], np.int64))], "padded")
        blocked = op("Reshape", [rows, new_initializer(graph, f"{prefix}/block_shape", np.array([-1, padded // block, block], np.int64))], "blocked")
        magnitude = op("Abs", [blocked], "abs")
        if opset >= 18:
            amax = op("ReduceMax", [magnitude, new_initializer(graph, f"{prefix}/axes", np.array([-1], np.int64))], "amax", keepdims=1)
        else:
            amax = op("ReduceMax", [magnitude], "amax", axes=[-1], keepdims=1)
        scale = op("Div", [amax, new_initializer(graph, f"{prefix}/qmax", np.array(127.0, np.float32))], "scale")
        safe = op("Max", [scale, new_initializer(graph, f"{prefix}/tiny", np.array(1e-30, np.float32))], "safe_scale")
        codes = op("Round", [op("Div", [blocked, safe], "scaled")], "codes")
        flat = op("Reshape", [op("Mul", [codes, scale], "dequantized"), new_initializer(graph, f"{prefix}/flat_shape", np.array([-1, padded], np.int64))], "flat")
        if padded != k:
            flat = op("Slice", [flat, new_initializer(graph, f"{prefix}/starts", np.array([0], np.int64)), new_initializer(graph, f"{prefix}/ends", np.array([k], np.int64)),
                                new_initializer(graph, f"{prefix}/slice_axes", np.array([1], np.int64))], "unpadded")
        back = op("Reshape", [flat, op("Shape", [x], "shape")], "back")
        total = op("Add", [total, op("Mul", [op("Sub", [back, x], "change"), switch], "switched")], "sum")
    graph.insert_before(node, new)
    node.replace_input_with(0, total)


def simulation_model(model: ir.Model, layers: Sequence[Layer], with_bias: Sequence[Layer],
                     act_blocks: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """A copy of ``model`` whose layer weights are overridable and where each layer in ``with_bias`` is
    followed by ``Add(y, delta)`` with an overridable zero ``delta`` (the bias a calibrated factorization adds).
    ``act_blocks``: layer name -> block sizes whose int8 quantization of the layer's input at run time a
    candidate brings (``_quantized_input``: switched off until an override switches one on)."""
    clone = runtime.copy_model(model)  # keeps where external weights live (a proto round trip forgets the folder)
    graph = clone.graph
    for layer in layers:
        value = graph.initializers[layer.weight]
        if not value.is_graph_input():
            graph.inputs.append(value)
    nodes = list(graph)
    opset = clone.opset_imports.get("", 17)
    for layer in layers:
        blocks = (act_blocks or {}).get(layer.name, ())
        if blocks:
            _quantized_input(graph, nodes[layer.index], layer, sorted(blocks), opset)
    for layer in with_bias:
        node = nodes[layer.index]
        out = node.outputs[0]
        n = layer.matrix.shape[1]
        name = bias_name(layer)
        delta = new_initializer(graph, name, np.zeros(n, np.float32))
        graph.inputs.append(delta)
        added = ir.Value(name=f"{out.name}/budget_biased", type=out.type, shape=out.shape)
        add = ir.node("Add", [out, delta], outputs=[added], name=f"{node.name}/budget_bias")
        graph.insert_after(node, add)
        old_name = out.name
        was_output = out.is_graph_output()
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, added)
        if was_output:
            for i, v in enumerate(graph.outputs):
                if v is out:
                    graph.outputs[i] = added
            out.name = f"{old_name}/budget_raw"
            added.name = old_name
    return clone


class Simulator:
    """One ORT session that computes the model with any layers replaced by reconstructions."""

    def __init__(self, model: ir.Model, layers: Sequence[Layer], with_bias: Sequence[Layer], threads: int | None = None,
                 act_blocks: Mapping[str, Sequence[int]] | None = None) -> None:
        self.model = simulation_model(model, layers, with_bias, act_blocks)
        self.with_bias = {layer.name for layer in with_bias}
        self.act_blocks = {name: set(blocks) for name, blocks in (act_blocks or {}).items()}
        self.overridable = ({layer.weight for layer in layers} | {bias_name(layer) for layer in with_bias}
                            | {switch_name(layer, b) for layer in layers for b in self.act_blocks.get(layer.name, ())})
        self.session = runtime.make_session(self.model, threads=threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._references: dict[int, list[dict[str, np.ndarray]]] = {}

    def override(self, layer: Layer, weight: np.ndarray, delta: np.ndarray | None, act_block: int | None = None) -> Override:
        """The feeds that replace ``layer``'s weight (and bias delta; ``act_block``: its input quantized per row in
        blocks of that size, as the rewritten kernel computes)."""
        feed = {layer.weight: np.ascontiguousarray(weight, np.float32)}
        if act_block is not None:
            if act_block not in self.act_blocks.get(layer.name, ()):
                raise ValueError(f"layer '{layer.name}' has no int8 input switch for blocks of {act_block}")
            feed[switch_name(layer, act_block)] = np.array(1.0, np.float32)
        if delta is not None:
            if layer.name not in self.with_bias:
                raise ValueError(f"layer '{layer.name}' has no bias slot in the simulation model")
            feed[bias_name(layer)] = np.ascontiguousarray(delta, np.float32)
        return feed

    def run(self, feeds: Sequence[Feed], override: Override | None = None) -> list[dict[str, np.ndarray]]:
        extra = override or {}
        return [runtime.run(self.session, {**feed, **extra}, self.output_names) for feed in feeds]

    def references(self, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
        key = id(feeds)
        if key not in self._references:
            outs = self.run(feeds)
            self._references[key] = [{k: v for k, v in o.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"} for o in outs]
        return self._references[key]

    def error(self, feeds: Sequence[Feed], override: Override | None = None, per_sample: bool = True) -> OutputError:
        """The outputs' error against the unmodified session's (``per_sample=False``: ``d`` only)."""
        refs = self.references(feeds)
        outs = self.run(feeds, override)
        return compare(outs, refs, feeds, per_sample)

    def session_with(self, override: Override) -> OverrideSession:
        """An ``InferenceSession`` look-alike computing the model with ``override`` applied: a task's
        ``evaluate`` that runs sessions (``onnxpress.models``' ``run_feeds``) can score a configuration
        without a new model or session (which for MiniLM costs ~1.5 s per configuration)."""
        return OverrideSession(self.session, self.overridable, override)

    def materialize(self, override: Override) -> ir.Model:
        """A standalone model computing the same function: the overrides written into the initializers."""
        clone = runtime.copy_model(self.model)
        graph = clone.graph
        keep = [v for v in graph.inputs if not v.is_initializer()]
        graph.inputs.clear()
        graph.inputs.extend(keep)
        for name, array in override.items():
            value = graph.initializers[name]
            value.const_value = ir.tensor(np.ascontiguousarray(array, np.float32), name=name)
        return clone


class OverrideSession:
    """The simulation session with fixed extra feeds (the overrides): ``get_inputs`` lists the model's own
    inputs only (not the overridable weights), ``run(names, feed)`` adds the overrides to every feed."""

    def __init__(self, session: Any, overridable: set[str], override: Override) -> None:
        self._session = session
        self._overridable = overridable
        self._override = dict(override)

    def get_inputs(self) -> list[Any]:
        return [v for v in self._session.get_inputs() if v.name not in self._overridable]

    def get_outputs(self) -> list[Any]:
        return self._session.get_outputs()

    def run(self, output_names: Any, input_feed: Mapping[str, Any], run_options: Any = None) -> list[Any]:
        return self._session.run(output_names, {**input_feed, **self._override}, run_options)


def output_metrics(model: Any, feeds: Sequence[Feed], references: Sequence[Mapping[str, np.ndarray]], threads: int | None = None) -> OutputError:
    """Compare a real (rewritten) model's float outputs with reference outputs, in ORT (per sample)."""
    session = runtime.make_session(model, threads=threads)
    names = [name for name in references[0]]
    outs = [runtime.run(session, feed, names) for feed in feeds]
    return compare(outs, references, feeds)
