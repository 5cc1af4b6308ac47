"""Pipelines: text <-> pass objects, and running them on onnx-ir's PassManager.

Grammar (whitespace is ignored outside quotes)::

    pipeline := pass ("," pass)*
    pass     := NAME [ "(" [ option ("," option)* ] ")" ]
    option   := KEY "=" value
    value    := WORD | '"' chars '"' | "[" [ value ("," value)* ] "]"

``str(Pipeline.parse(text)) == text`` for canonical text, and ``Pipeline.parse(str(p)) == p`` always.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import onnx_ir as ir

from onnxpress.errors import PassFailedError, UsageError
from onnxpress.pass_infra import Pass, PassContext, PassStats, make_pass
from onnxpress.registry import get_pass_class


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> UsageError:
        return UsageError(f"pipeline text, column {self.pos + 1}: {message} in '{self.text}'")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = self.peek() or "end of text"
            raise self.error(f"expected '{ch}', found '{found}'")
        self.pos += 1

    def word(self, what: str) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-.+:/*|<>%"):
            self.pos += 1
        if start == self.pos:
            found = self.text[self.pos] if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found '{found}'")
        return self.text[start : self.pos]

    def value(self) -> Any:
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        if ch == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error("unterminated string")
            self.pos += 1
            return "".join(out)
        return self.word("a value")


def parse_pipeline(text: str) -> list[Pass]:
    lexer = _Lexer(text)
    passes: list[Pass] = []
    if not text.strip():
        return passes
    while True:
        name = lexer.word("a pass name")
        cls = get_pass_class(name)
        raw: list[tuple[str, Any]] = []
        if lexer.peek() == "(":
            lexer.pos += 1
            if lexer.peek() != ")":
                while True:
                    key = lexer.word("an option name")
                    lexer.expect("=")
                    raw.append((key, lexer.value()))
                    if lexer.peek() == ",":
                        lexer.pos += 1
                        continue
                    break
            lexer.expect(")")
        passes.append(make_pass(cls, raw))
        if lexer.peek() == "":
            return passes
        lexer.expect(",")


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    stats: list[PassStats]


class Pipeline:
    """An ordered list of passes; the Python form of pipeline text."""

    def __init__(self, passes: Iterable[Pass] = ()) -> None:
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"not an onnxpress pass: {p!r}")

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        return cls(parse_pipeline(text))

    @classmethod
    def coerce(cls, value: Pipeline | str | Sequence[Pass] | None, default: str = "") -> Pipeline:
        if value is None:
            return cls.parse(default)
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls(value)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)

    @property
    def lossless(self) -> bool:
        return all(p.lossless for p in self.passes)

    def run(
        self,
        model: ir.Model,
        *,
        context: PassContext | None = None,
        verify_each: bool = False,
        on_pass_start=None,
        on_pass_end=None,
    ) -> PipelineResult:
        """Run the passes in order on ``model`` (in place). Errors name the failing pass and those before it."""
        context = context or PassContext()
        passes = with_prerequisite_steps(self.passes, model)
        for p in passes:
            p.context = context
            p.verify = verify_each
        if not passes:
            return PipelineResult(model, False, [])
        hooked = [_Hooked(p, on_pass_start, on_pass_end) for p in passes]
        try:
            result = ir.passes.PassManager(hooked, steps=1)(model)
        except Exception as exc:  # onnx-ir wraps the failure; report the root cause in one line
            failed = next((h.inner for h in hooked if h.running), None)
            before = [str(h.inner) for h in hooked[: hooked.index(next(h for h in hooked if h.running))]] if failed else []
            raise PassFailedError(
                f"pass '{failed}' failed after [{', '.join(before)}]: {_root_cause(exc)}"
            ) from exc
        return PipelineResult(result.model, result.modified, [p.stats for p in passes if p.stats is not None])


def with_prerequisite_steps(passes: list[Pass], model: ir.Model) -> list[Pass]:
    """``passes`` with the steps some passes need first, each a pass of its own (own statistics row):

    - ``upgrade-opset(opset=N)`` before a pass that needs a newer default-domain opset than the model will have
      by then (``Pass.required_opset``); a user-written ``upgrade-opset`` counts, nothing is inserted after it.
    - ``lift-constants`` before the first lossy pass when weights are Constant nodes (paddle2onnx, spox):
      lossy passes rewrite weights, which they find as initializers.
    """
    from onnxpress.opset import default_opset

    current = default_opset(model)
    upgrade_cls = get_pass_class("upgrade-opset")
    lift_cls = get_pass_class("lift-constants")
    lift_pending = lift_cls.applies(model)  # type: ignore[attr-defined]
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, upgrade_cls) and current is not None:
            current = max(current, p.options.opset)
        if isinstance(p, lift_cls):
            lift_pending = False
        if lift_pending and not p.lossless:
            out.append(lift_cls())
            lift_pending = False
        need = p.required_opset()
        if need is not None and current is not None and current < need:
            out.append(upgrade_cls(opset=need))
            current = need
        out.append(p)
    return out


class _Hooked(ir.passes.InPlacePass):
    """Wraps a pass to report progress and to know which pass was running when an error came up."""

    def __init__(self, inner: Pass, on_start, on_end) -> None:
        self.inner = inner
        self.on_start = on_start
        self.on_end = on_end
        self.running = False

    def __str__(self) -> str:
        return str(self.inner)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.running = True
        if self.on_start:
            self.on_start(self.inner)
        result = self.inner(model)
        self.running = False
        if self.on_end:
            self.on_end(self.inner)
        return result


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}"[:500]


def stamp_metadata(model: ir.Model, pipeline: str) -> None:
    """Store the pipeline text and the onnxpress version in the model's metadata: any result can be re-created."""
    from onnxpress import __version__

    model.metadata_props.update({"onnxpress.pipeline": pipeline, "onnxpress.version": __version__})
