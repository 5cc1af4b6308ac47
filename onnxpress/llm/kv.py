"""KV-cache aware inputs for any causal-LM ONNX decoder: which inputs are the past, what their dims are,
and feeds made from token ids (a prefill with an empty past, then decode steps that feed ``present`` back).

Recognised layouts (onnxruntime-genai's builder, optimum, torch exports):
- inputs ``input_ids`` [batch, seq], optional ``attention_mask`` [batch, total] and ``position_ids`` [batch, seq];
- per layer ``past_key_values.N.key`` / ``.value`` (or ``past_key_N`` / ``past_value_N``, ``past.N.key``)
  [batch, kv_heads, past, head_dim], and outputs ``present.N.key`` / ``.value`` [batch, kv_heads, total, head_dim];
- output ``logits`` [batch, seq, vocab].

The kv-head count and head size come from the past inputs' static dims when they have them; otherwise from
the attention node that reads the past: ``GroupQueryAttention``'s ``kv_num_heads`` attribute, and the head
size from its packed QKV projection (``(num_heads + 2 kv_num_heads) * head_size`` columns) or its rotary cos
cache. The sequence dims are named from the input shapes, so ``symbolic_dims`` gives the values of every
symbolic dim of the graph for a (batch, seq, past) case with ``total = past + seq``; ``past = 0`` is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.errors import UsageError

_PAST = [
    re.compile(r"^past_key_values\.(\d+)\.(key|value)$"),
    re.compile(r"^past_(key|value)_(\d+)$"),
    re.compile(r"^past\.(\d+)\.(key|value)$"),
    re.compile(r"^past_key_values_(\d+)_(key|value)$"),
]
_PRESENT = [
    re.compile(r"^present\.(\d+)\.(key|value)$"),
    re.compile(r"^present_(key|value)_(\d+)$"),
    re.compile(r"^present_key_values\.(\d+)\.(key|value)$"),
    re.compile(r"^present_(\d+)_(key|value)$"),
]


def _layer_kind(name: str, patterns: Sequence[re.Pattern[str]]) -> tuple[int, str] | None:
    for pattern in patterns:
        m = pattern.match(name)
        if m:
            a, b = m.groups()
            return (int(a), b) if a.isdigit() else (int(b), a)
    return None


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """What a causal-LM graph expects: input names, the cache layout and the names of its symbolic dims."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    past: tuple[tuple[str, str], ...]  # per layer (key input, value input)
    present: tuple[tuple[str, str], ...]  # per layer (key output, value output)
    kv_heads: int
    head_dim: int
    cache_dtype: Any  # numpy dtype of the cache tensors
    ids_dtype: Any
    # names of symbolic dims in the graph's input shapes -> which quantity they stand for
    dim_roles: tuple[tuple[str, str], ...] = ()

    @property
    def layers(self) -> int:
        return len(self.past)

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.cache_dtype) for pair in self.past for name in pair}


@dataclasses.dataclass(frozen=True)
class _Value:
    """A graph input/output as both an ir.Value and an onnxruntime NodeArg can describe it."""

    name: str
    shape: tuple[Any, ...] | None  # int for static dims, str for named symbolic dims, None for unknown
    dtype: str  # "float", "float16", "int64", ...


_IR_TYPES = {ir.DataType.FLOAT: "float", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
             ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}


def _from_ir(value: ir.Value) -> _Value:
    shape = None
    if value.shape is not None:
        shape = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape)
    return _Value(value.name, shape, _IR_TYPES.get(value.dtype, str(value.dtype)))


def _from_node_arg(arg: Any) -> _Value:
    shape = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
    return _Value(arg.name, shape, arg.type.removeprefix("tensor(").removesuffix(")"))


def kv_spec(model: ir.Model | str | os.PathLike) -> KVSpec:
    """The KV layout of a causal-LM decoder; ``UsageError`` naming what is missing when it is not one."""
    if not isinstance(model, ir.Model):
        from onnxpress.io import load

        model = load(model)
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    return _spec([_from_ir(v) for v in graph.inputs], [_from_ir(v) for v in graph.outputs], lambda name: _from_attention(graph, by_name[name]))


def spec_from_session(session: Any) -> KVSpec:
    """The KV layout from an onnxruntime session (or look-alike): needs the past inputs' head dims to be
    static; for a graph whose head size is symbolic (onnxruntime-genai's ``kv_cache_dim``) use ``kv_spec``
    on the model."""
    return _spec([_from_node_arg(a) for a in session.get_inputs()], [_from_node_arg(a) for a in session.get_outputs()], None)


def _spec(input_list: list[_Value], output_list: list[_Value], attention) -> KVSpec:
    inputs = {v.name: v for v in input_list}
    outputs = {v.name: v for v in output_list}
    if "input_ids" not in inputs:
        raise UsageError(f"not a causal-LM decoder: no 'input_ids' input (inputs: {', '.join(list(inputs)[:8])})")
    if "logits" not in outputs:
        raise UsageError(f"not a causal-LM decoder: no 'logits' output (outputs: {', '.join(list(outputs)[:8])})")
    past = _pairs(inputs, _PAST, "past")
    present = _pairs(outputs, _PRESENT, "present")
    if not past:
        raise UsageError("not a decoder with a KV cache: no past_key_values.N.key/value inputs")
    if len(present) != len(past):
        raise UsageError(f"{len(past)} past layers but {len(present)} present layers in the outputs")
    first = inputs[past[0][0]]
    kv_heads, head_dim = _static_dim(first, 1), _static_dim(first, 3)
    if (kv_heads is None or head_dim is None) and attention is not None:
        attn_heads, attn_dim = attention(first.name)
        kv_heads = kv_heads or attn_heads
        head_dim = head_dim or attn_dim
    if not kv_heads or not head_dim:
        where = "no static dims and no GroupQueryAttention reads it" if attention else "its dims are symbolic; use kv_spec(model) (it reads the attention nodes)"
        raise UsageError(f"cannot tell the KV heads / head size of '{first.name}' (shape {first.shape}): {where}")
    return KVSpec(
        input_ids="input_ids",
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        position_ids="position_ids" if "position_ids" in inputs else None,
        logits="logits",
        past=tuple(past),
        present=tuple(present),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        cache_dtype=np.dtype(np.float16 if first.dtype == "float16" else np.float32),
        ids_dtype=np.dtype(np.int32 if inputs["input_ids"].dtype == "int32" else np.int64),
        dim_roles=tuple(sorted(_dim_roles(inputs, past).items())),
    )


def _pairs(values: dict[str, _Value], patterns, what: str) -> list[tuple[str, str]]:
    found: dict[int, dict[str, str]] = {}
    for name in values:
        hit = _layer_kind(name, patterns)
        if hit:
            found.setdefault(hit[0], {})[hit[1]] = name
    layers = sorted(found)
    if layers and layers != list(range(len(layers))):
        raise UsageError(f"{what} layers are not numbered 0..{len(layers) - 1}: {layers}")
    for layer in layers:
        if set(found[layer]) != {"key", "value"}:
            raise UsageError(f"{what} layer {layer} has {sorted(found[layer])}, needs key and value")
    return [(found[i]["key"], found[i]["value"]) for i in layers]


def _static_dim(value: _Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _from_attention(graph: ir.Graph, past: ir.Value) -> tuple[int | None, int | None]:
    """(kv heads, head size) from the GroupQueryAttention node that reads ``past``."""
    for use in past.uses():
        node = use.node
        if node.op_type != "GroupQueryAttention":
            continue
        heads = node.attributes.get_int("num_heads")
        kv_heads = node.attributes.get_int("kv_num_heads")
        head_dim = None
        query = node.inputs[0]
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        producer = query.producer() if query is not None else None
        if packed and heads and kv_heads and producer is not None and producer.op_type == "MatMul":
            weight = producer.inputs[1]
            if weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
                columns = weight.const_value.shape[1]
                if columns % (heads + 2 * kv_heads) == 0:
                    head_dim = columns // (heads + 2 * kv_heads)
        if head_dim is None and node.attributes.get_int("do_rotary", 0) and len(node.inputs) > 7 and node.inputs[7] is not None:
            cos = node.inputs[7].const_value
            if cos is not None and len(cos.shape) == 2:
                head_dim = 2 * cos.shape[1]  # full rotary: the cache holds head_size / 2 frequencies
        return kv_heads, head_dim
    return None, None


def _dim_roles(inputs: dict[str, _Value], past: list[tuple[str, str]]) -> dict[str, str]:
    roles: dict[str, str] = {}

    def name(value: _Value | None, axis: int, role: str) -> None:
        if value is None or value.shape is None or len(value.shape) <= axis:
            return
        dim = value.shape[axis]
        if isinstance(dim, str) and dim:
            roles.setdefault(dim, role)

    ids = inputs["input_ids"]
    name(ids, 0, "batch")
    name(ids, 1, "seq")
    first = inputs[past[0][0]]
    name(first, 0, "batch")
    name(first, 1, "kv_heads")
    name(first, 2, "past")
    name(first, 3, "head_dim")
    name(inputs.get("attention_mask"), 1, "total")
    name(inputs.get("position_ids"), 1, "seq")
    return roles


def symbolic_dims(spec: KVSpec, batch: int = 1, seq: int = 1, past: int = 0) -> dict[str, int]:
    """Values of the graph's symbolic input dims for one case (``total = past + seq``)."""
    values = {"batch": batch, "seq": seq, "past": past, "total": past + seq, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim}
    return {dim: values[role] for dim, role in spec.dim_roles}


def prefill_feeds(spec: KVSpec, token_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Feeds of a prefill: the tokens ([seq] or [batch, seq]) with an empty past."""
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UsageError(f"token ids must be [seq] or [batch, seq] with seq >= 1, got shape {ids.shape}")
    return _step_feeds(spec, ids, spec.empty_past(ids.shape[0]), 0)


def decode_feeds(spec: KVSpec, token_ids: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds of the next step: ``token_ids`` [batch, n] after the step whose outputs (with ``present``) are given."""
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[:, None]
    past = {}
    for (k_in, v_in), (k_out, v_out) in zip(spec.past, spec.present):
        past[k_in], past[v_in] = outputs[k_out], outputs[v_out]
    return _step_feeds(spec, ids, past, outputs[spec.present[0][0]].shape[2])


def _step_feeds(spec: KVSpec, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    feeds = {spec.input_ids: ids.astype(spec.ids_dtype)}
    if spec.attention_mask:
        feeds[spec.attention_mask] = np.ones((batch, past_len + seq), spec.ids_dtype)
    if spec.position_ids:
        feeds[spec.position_ids] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=spec.ids_dtype), (batch, seq)).copy()
    feeds.update(past)
    return feeds


def run_step(session: Any, spec: KVSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decoder step on any session-like object (``run(names, feeds)``): logits and every present."""
    names = [spec.logits] + [n for pair in spec.present for n in pair]
    return dict(zip(names, session.run(names, feeds)))


def kv_feeds(
    spec: KVSpec,
    sequences: Iterable[Sequence[int] | np.ndarray],
    decode_steps: int = 0,
    session: Any = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Calibration/evaluation feeds from token ids: per sequence a prefill with an empty past and then
    ``decode_steps`` single-token steps whose past is the previous step's ``present``.

    Decode steps need the model's own cache, so they need ``session`` (any object with ``run``); the step's
    token is the sequence's next token when there is one (teacher forcing), else the greedy choice.
    With ``decode_steps > 0`` the prefill takes the sequence minus its last ``decode_steps`` tokens.
    """
    if decode_steps and session is None:
        raise UsageError("decode steps feed back the model's present K/V: pass session=")
    for seq in sequences:
        ids = np.asarray(seq, np.int64).reshape(-1)
        cut = max(1, len(ids) - decode_steps) if decode_steps else len(ids)
        feeds = prefill_feeds(spec, ids[:cut])
        yield feeds
        for step in range(decode_steps):
            out = run_step(session, spec, feeds)
            position = cut + step
            token = ids[position] if position < len(ids) else int(np.argmax(out[spec.logits][0, -1]))
            feeds = decode_feeds(spec, np.array([[token]]), out)
            yield feeds
