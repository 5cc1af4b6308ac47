"""The pass base class: a thin layer over ``onnx_ir.passes.InPlacePass``.

What it adds to onnx-ir's pass infrastructure (which runs, composes and checks passes):
- ``name``: the token used in pipeline text; ``Options``: a frozen dataclass whose fields are the pipeline
  keys (types are enforced when text is parsed; ``metadata["help"]`` is the ``--help`` text);
- per-pass statistics (time, nodes, initializer bytes and parameters before/after, ``modified``) recorded
  by ``__call__`` around onnx-ir's own checks;
- optional verification after the pass (onnx checker + strict shape inference), skipped when the pass
  reports that it changed nothing;
- ``details``: per-layer rows a lossy pass fills in (what it cost: error metrics, size before/after).
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.errors import UsageError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


def option(default: Any, help: str) -> Any:  # noqa: A002 - 'help' is the natural name here
    """A pass option: a dataclass field with its --help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("options must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class PassContext:
    """What a pipeline run gives every pass: calibration feeds (one dict of input arrays per batch)."""

    calibration: list[dict[str, np.ndarray]] | None = None


@dataclasses.dataclass
class GraphCounts:
    nodes: int
    initializer_bytes: int
    parameters: int

    @classmethod
    def of(cls, model: ir.Model) -> GraphCounts:
        nbytes = params = 0
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                nbytes += tensor.nbytes
                params += tensor.size
        nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        return cls(nodes, nbytes, params)


@dataclasses.dataclass
class PassStats:
    """What one pass did: recorded by ``Pass.__call__``."""

    name: str
    text: str
    seconds: float
    modified: bool
    before: GraphCounts
    after: GraphCounts
    verified: bool | None = None  # None: verification not requested or skipped (no change)
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pass(ir.passes.InPlacePass):
    """Base class of every onnxpress pass (see the module docstring)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    lossless: ClassVar[bool] = True
    # The default-domain (ai.onnx) opset the pass needs, e.g. 13 for per-axis DequantizeLinear: an int, or a
    # function of the pass's options. The pipeline raises an older model to it first with an `upgrade-opset`
    # step (onnx.version_converter, checked in onnxruntime), so the pass itself never converts.
    min_opset: ClassVar[Any] = None
    # A lossy pass that takes part in the budget search names its planner class here (the interface is
    # ``onnxpress.passes.planning.Planner``); the search makes one instance per search.
    planner: ClassVar[type | None] = None
    # Deployment targets (onnxpress.targets) this pass tunes itself for: target name -> {option: value}, filled
    # in by ``--target`` unless the pipeline text sets the option; target_reasons: target -> option -> why
    # (every default needs one). Read-only on the base class, so no pass can mutate what others inherit.
    target_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = types.MappingProxyType({})
    target_reasons: ClassVar[Mapping[str, Mapping[str, str]]] = types.MappingProxyType({})

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an Options object or keyword options, not both")
        if options is None:
            try:
                options = self.Options(**kwargs)
            except TypeError as exc:
                raise UsageError(f"{self.name}: {exc}") from None
        elif not isinstance(options, self.Options):
            raise TypeError(f"{self.name} expects {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        # Keys the user set, in the order given: str() prints these, so text round-trips unchanged.
        self.explicit: tuple[str, ...] = tuple(kwargs) if kwargs else tuple(
            f.name for f in dataclasses.fields(options) if getattr(options, f.name) != f.default
        )
        self.context = PassContext()
        self.verify = False
        self.details: list[dict[str, Any]] = []
        self.stats: PassStats | None = None
        validate = getattr(options, "validate", None)
        if callable(validate):
            try:
                validate()
            except ValueError as exc:
                raise UsageError(f"{self.name}: {exc}") from None

    def required_opset(self) -> int | None:
        """The default-domain opset this pass needs with its options (None: any)."""
        need = type(self).min_opset
        return need(self.options) if callable(need) else need

    # -- text form -------------------------------------------------------------------------------
    def __str__(self) -> str:
        if not self.explicit:
            return self.name
        args = ",".join(f"{key}={format_value(getattr(self.options, key))}" for key in self.explicit)
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    # -- running ---------------------------------------------------------------------------------
    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        model = model_or_result.model if isinstance(model_or_result, ir.passes.PassResult) else model_or_result
        self.details = []
        before = GraphCounts.of(model)
        start = time.perf_counter()
        result = super().__call__(model)
        seconds = time.perf_counter() - start
        verified = None
        if self.verify and result.modified:
            verify_model(result.model)
            verified = True
        self.stats = PassStats(
            name=self.name,
            text=str(self),
            seconds=seconds,
            modified=result.modified,
            before=before,
            after=GraphCounts.of(result.model),
            verified=verified,
            details=list(self.details),
        )
        return result


def verify_model(model: ir.Model) -> None:
    """onnx checker (full) and strict shape inference; raises on the first problem."""
    proto = ir.to_proto(model)
    if proto.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(proto, full_check=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


# -- option values <-> text ---------------------------------------------------------------------
def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    text = str(value)
    if any(ch in text for ch in ",()[]=\" ") or text == "":
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_describe_type(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def convert_value(raw: Any, tp: Any, where: str) -> Any:
    """Convert a parsed token (str, or list of str for [a,b]) to the option's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if raw == "none" and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(raw, arg, where)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(f"{where}: expected {_describe_type(tp)}, got '{raw}'")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        items = raw if isinstance(raw, list) else [raw]
        return tuple(convert_value(item, item_tp, where) for item in items)
    if isinstance(raw, list):
        raise UsageError(f"{where}: expected {_describe_type(tp)}, got a list")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise UsageError(f"{where}: '{raw}' is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"{where}: expected true or false, got '{raw}'")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{where}: expected an integer, got '{raw}'") from None
    if tp is float:
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"{where}: expected a number, got '{raw}'") from None
        if not np.isfinite(value):
            raise UsageError(f"{where}: expected a finite number, got '{raw}'")
        return value
    if tp is str:
        return raw
    raise TypeError(f"unsupported option type {tp!r}")


def option_types(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def describe_options(pass_cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every option: the source of `onnxpress passes` and --help."""
    hints = option_types(pass_cls.Options)
    rows = []
    for field in dataclasses.fields(pass_cls.Options):
        rows.append((field.name, _describe_type(hints[field.name]), format_value(field.default), field.metadata.get("help", "")))
    return rows


def make_pass(pass_cls: type[Pass], raw_options: Sequence[tuple[str, Any]]) -> Pass:
    """Build a pass from (key, raw value) pairs parsed from text, with typed conversion and clear errors."""
    hints = option_types(pass_cls.Options)
    valid = [f.name for f in dataclasses.fields(pass_cls.Options)]
    kwargs: dict[str, Any] = {}
    for key, raw in raw_options:
        if key not in hints:
            listing = ", ".join(valid) if valid else "none"
            raise UsageError(f"{pass_cls.name}: unknown option '{key}' (valid options: {listing})")
        if key in kwargs:
            raise UsageError(f"{pass_cls.name}: option '{key}' given twice")
        kwargs[key] = convert_value(raw, hints[key], f"{pass_cls.name}({key}=...)")
    return pass_cls(**kwargs)
