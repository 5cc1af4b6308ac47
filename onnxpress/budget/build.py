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

from onnxpress.budget.layers import Choice, Layer
from onnxpress.passes.graph_utils import node_label


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


def build(model: ir.Model, layers: Sequence[Layer], decisions: dict[str, Choice], calibration: Sequence[dict[str, np.ndarray]]) -> tuple[ir.Model, list[Any]]:
    """Run the passes that realise ``decisions`` (layer name -> choice) on a copy of ``model``.

    Returns the rewritten model and the pass objects (their text is the pipeline). Raises RuntimeError if
    a pass rewrote other layers than planned (the plan and the passes disagree: a bug)."""
    from onnxpress.pass_infra import PassContext
    from onnxpress.passes import qdq as qdq_pass
    from onnxpress.passes.factorize import Factorize
    from onnxpress.passes.qdq import Qdq

    work = ir.from_proto(ir.to_proto(model))
    context = PassContext(calibration=list(calibration))
    passes: list[Any] = []
    by_name = {layer.name: layer for layer in layers}

    def run(p: Any) -> None:
        p.context = context
        p(work)
        passes.append(p)

    # 1. factorize, one pass per ratio (largest first)
    universe = [node_label(n, i) for i, n in enumerate(work.graph) if n.op_type in ("MatMul", "Gemm")]
    done: set[str] = set()
    for ratio in sorted({c.ratio for c in decisions.values() if c.ratio is not None}, reverse=True):
        names = [n for n, c in decisions.items() if c.ratio == ratio]
        for include, exclude in substring_selectors(names, universe, done):
            kwargs: dict[str, Any] = {"ratio": ratio, "calibrated": True, "include": tuple(include)}
            if exclude:
                kwargs["exclude"] = tuple(exclude)
            p = Factorize(**kwargs)
            run(p)
            rewritten = {row["layer"] for row in p.details if "skipped" not in row}
            if rewritten != set(include):
                raise RuntimeError(f"factorize rewrote {sorted(rewritten)}, planned {sorted(include)}")
            done |= set(include)

    # 2. quantize: int4 passes per block size, then int8; factorized layers are quantized as U and V
    def current_names(name: str, choice: Choice) -> list[str]:
        return [f"{name}/factorize_U", f"{name}/factorize_V"] if choice.ratio is not None else [name]

    quants = sorted({c.quant for c in decisions.values() if c.quant is not None}, key=lambda q: (q == "int8", q))
    for quant in quants:
        wanted = [x for n, c in decisions.items() if c.quant == quant for x in current_names(n, c)]
        defaults = qdq_pass.QdqOptions()
        if quant == "int8":
            mode_opts: dict[str, Any] = {"mode": "weight"}
        elif quant.startswith("split/"):
            hot_block, cold_block = (int(x) for x in quant.split("/")[1:])
            mode_opts = {"mode": "int4", "embedding_split": True}
            if hot_block != defaults.embedding_block_size:
                mode_opts["embedding_block_size"] = hot_block
            if cold_block != defaults.embedding_cold_block_size:
                mode_opts["embedding_cold_block_size"] = cold_block
        else:
            block = int(quant.split("/")[1])
            mode_opts = {"mode": "int4"}
            if block != qdq_pass.QdqOptions().block_size:
                mode_opts["block_size"] = block
            if any(by_name[n].op == "Gather" for n, c in decisions.items() if c.quant == quant) and block != qdq_pass.QdqOptions().embedding_block_size:
                mode_opts["embedding_block_size"] = block
        targets, _ = qdq_pass.find_targets(work, qdq_pass.QdqOptions(**{k: v for k, v in mode_opts.items()}))
        target_names = [(t.node.name, t.node.op_type) for t in targets]
        missing = set(wanted) - {n for n, _ in target_names}
        if missing:
            raise RuntimeError(f"qdq({mode_opts}) would not quantize {sorted(missing)}")
        unnamed = [t.label for t in targets if not t.node.name]
        if unnamed:
            raise RuntimeError(f"qdq cannot exclude unnamed nodes {unnamed}")
        excluded = [n for n, _ in target_names if n not in set(wanted)]
        if excluded:
            mode_opts.update(qdq_selection(wanted, excluded, target_names, has_include="include" in {f.name for f in dataclasses.fields(qdq_pass.QdqOptions)}))
        p = Qdq(**mode_opts)
        run(p)
        quantized = {row["layer"] for row in p.details if "skipped" not in row and "bytes_after" in row}
        if quantized != set(wanted):
            raise RuntimeError(f"qdq quantized {sorted(quantized)}, planned {sorted(wanted)}")
    return work, passes
