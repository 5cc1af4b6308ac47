"""Realising a budget's decisions with the real passes: ``factorize`` per ratio, then ``qdq`` per
quantization, each selecting exactly its layers with an ``include`` or ``exclude`` list (whichever is
shorter). The passes' own reports are checked against the plan, so the pipeline text that comes out
re-creates the model without a search."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress import runtime
from onnxpress.budget.layers import Choice, Layer
from onnxpress.pass_infra import PassContext
from onnxpress.passes.factorize import Factorize
from onnxpress.passes.graph_utils import node_label
from onnxpress.passes.qdq import Qdq, QdqOptions, find_targets


def substring_selectors(intended: Sequence[str], universe: Sequence[str], done: Iterable[str] = ()) -> list[tuple[list[str], list[str]]]:
    """(include, exclude) pairs for options that select by substring (``factorize``) such that each pair
    selects exactly its include names among ``universe`` minus ``done`` (names already handled), and the
    pairs together cover ``intended``. One pair unless a name is a substring of another one that must be
    excluded and that itself contains... (then the names are split across pairs)."""
    done = set(done)
    todo = [n for n in intended]
    out: list[tuple[list[str], list[str]]] = []
    while todo:
        group = list(todo)
        while True:
            selected = {u for u in universe if u not in done and any(g in u for g in group)}
            exclude = sorted(selected - set(group))
            blocked = [g for g in group if any(e in g for e in exclude)]
            if not blocked:
                break
            group = [g for g in group if g not in blocked]
            if not group:
                group = [todo[0]]  # alone, a name is never inside an excluded (longer) name
                exclude = sorted(u for u in universe if u not in done and group[0] in u and u != group[0])
                break
        out.append((group, exclude))
        done |= set(group)
        todo = [t for t in todo if t not in group]
    return out


def compress_names(names: Sequence[str], targets: Sequence[tuple[str, str]]) -> list[str]:
    """Replace the names of every target of an op type by the op type (qdq's include/exclude take both)."""
    chosen = set(names)
    by_op: dict[str, list[str]] = {}
    for name, op in targets:
        by_op.setdefault(op, []).append(name)
    out: list[str] = []
    covered: set[str] = set()
    for op, members in by_op.items():
        if all(n in chosen for n in members):
            out.append(op)
            covered |= set(members)
    out.extend(n for n in names if n not in covered)
    return out


def qdq_selection(wanted: Sequence[str], excluded: Sequence[str], targets: Sequence[tuple[str, str]], has_include: bool = True) -> dict[str, tuple[str, ...]]:
    """qdq's ``include=`` or ``exclude=`` option, whichever is shorter as text, selecting exactly ``wanted``
    among ``targets`` (name, op type); op types stand for all their targets."""
    by_exclude = tuple(compress_names(excluded, targets))
    if not has_include:
        return {"exclude": by_exclude}
    by_include = tuple(compress_names(wanted, targets))
    return {"include": by_include} if len(",".join(by_include)) < len(",".join(by_exclude)) else {"exclude": by_exclude}


def qdq_mode_options(quant: str, gather: bool) -> dict[str, Any]:
    """The ``qdq`` options (only those that differ from its defaults) that quantize as ``quant``:
    ``int8`` (weight mode), ``int4/B`` (``gather``: an embedding table is among the layers), ``split/H/C``."""
    defaults = QdqOptions()
    if quant == "int8":
        return {"mode": "weight"}
    if quant.startswith("split/"):
        hot_block, cold_block = (int(x) for x in quant.split("/")[1:])
        options: dict[str, Any] = {"mode": "int4", "embedding_split": True}
        if hot_block != defaults.embedding_block_size:
            options["embedding_block_size"] = hot_block
        if cold_block != defaults.embedding_cold_block_size:
            options["embedding_cold_block_size"] = cold_block
        return options
    block = int(quant.split("/")[1])
    options = {"mode": "int4"}
    if block != defaults.block_size:
        options["block_size"] = block
    if gather and block != defaults.embedding_block_size:
        options["embedding_block_size"] = block
    return options


class _Builder:
    """The passes run so far on one working copy, with the shared calibration context."""

    def __init__(self, model: ir.Model, calibration: Sequence[dict[str, np.ndarray]]) -> None:
        self.work = runtime.copy_model(model)  # keeps where external weights live
        self.context = PassContext(calibration=list(calibration))
        self.passes: list[Any] = []

    def run(self, p: Any) -> None:
        p.context = self.context
        p(self.work)
        self.passes.append(p)

    def factorize(self, decisions: dict[str, Choice]) -> None:
        """One ``factorize`` per ratio (largest first), each selecting exactly its layers by substring."""
        universe = [node_label(n, i) for i, n in enumerate(self.work.graph) if n.op_type in ("MatMul", "Gemm")]
        done: set[str] = set()
        for ratio in sorted({c.ratio for c in decisions.values() if c.ratio is not None}, reverse=True):
            names = [n for n, c in decisions.items() if c.ratio == ratio]
            for include, exclude in substring_selectors(names, universe, done):
                kwargs: dict[str, Any] = {"ratio": ratio, "calibrated": True, "include": tuple(include)}
                if exclude:
                    kwargs["exclude"] = tuple(exclude)
                p = Factorize(**kwargs)
                self.run(p)
                rewritten = {row["layer"] for row in p.details if "skipped" not in row}
                if rewritten != set(include):
                    raise RuntimeError(f"factorize rewrote {sorted(rewritten)}, planned {sorted(include)}")
                done |= set(include)

    def quantize(self, quant: str, wanted: Sequence[str], gather: bool) -> None:
        """One ``qdq`` that quantizes exactly the weights of ``wanted`` (current node names) as ``quant``."""
        mode_opts = qdq_mode_options(quant, gather)
        targets, _ = find_targets(self.work, QdqOptions(**mode_opts))
        target_names = [(t.node.name, t.node.op_type) for t in targets]
        missing = set(wanted) - {n for n, _ in target_names}
        if missing:
            raise RuntimeError(f"qdq({mode_opts}) would not quantize {sorted(missing)}")
        unnamed = [t.label for t in targets if not t.node.name]
        if unnamed:
            raise RuntimeError(f"qdq cannot exclude unnamed nodes {unnamed}")
        excluded = [n for n, _ in target_names if n not in set(wanted)]
        if excluded:
            mode_opts.update(qdq_selection(wanted, excluded, target_names, has_include="include" in {f.name for f in dataclasses.fields(QdqOptions)}))
        p = Qdq(**mode_opts)
        self.run(p)
        quantized = {row["layer"] for row in p.details if "skipped" not in row and "bytes_after" in row}
        if quantized != set(wanted):
            raise RuntimeError(f"qdq quantized {sorted(quantized)}, planned {sorted(wanted)}")


def build(model: ir.Model, layers: Sequence[Layer], decisions: dict[str, Choice], calibration: Sequence[dict[str, np.ndarray]]) -> tuple[ir.Model, list[Any]]:
    """Run the passes that realise ``decisions`` (layer name -> choice) on a copy of ``model``.

    Returns the rewritten model and the pass objects (their text is the pipeline). Raises RuntimeError if
    a pass rewrote other layers than planned (the plan and the passes disagree: a bug)."""
    builder = _Builder(model, calibration)
    builder.factorize(decisions)
    # then quantize: int4 passes per block size, then int8; factorized layers are quantized as U and V
    ops = {layer.name: layer.op for layer in layers}
    for quant in sorted({c.quant for c in decisions.values() if c.quant is not None}, key=lambda q: (q == "int8", q)):
        chosen = [n for n, c in decisions.items() if c.quant == quant]
        wanted = [x for n in chosen for x in ([f"{n}/factorize_U", f"{n}/factorize_V"] if decisions[n].ratio is not None else [n])]
        builder.quantize(quant, wanted, gather=any(ops[n] == "Gather" for n in chosen))
    return builder.work, builder.passes
