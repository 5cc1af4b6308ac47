"""Realising a budget's decisions with the real passes, through the planners: the structural planner's
passes first (one option at a time, in the grid's order), then the storage planner's (int4 block sizes, then
int8), each selecting exactly its layers. The passes' own reports are checked against the plan, so the
pipeline text that comes out re-creates the model without a search."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress import runtime
from onnxpress.budget.layers import Choice, Planners
from onnxpress.pass_infra import PassContext


def build(model: ir.Model, decisions: dict[str, Choice], calibration: Sequence[dict[str, np.ndarray]], planners: Planners,
          structure_order: Sequence[str] = ()) -> tuple[ir.Model, list[Any]]:
    """Run the passes that realise ``decisions`` (layer name -> choice) on a copy of ``model``.

    ``structure_order``: the order the structural options run in (others after them, sorted). Returns the
    rewritten model and the pass objects (their text is the pipeline). Raises RuntimeError if a pass
    rewrote other layers than planned (the plan and the passes disagree: a bug)."""
    work = runtime.copy_model(model)  # keeps where external weights live
    context = PassContext(calibration=list(calibration))
    done: list[Any] = []

    def realise(planner: Any, option: str, names: list[str]) -> None:
        rewritten: set[str] = set()
        for p in planner.passes(work, option, names):
            p.context = context
            p(work)
            done.append(p)
            rewritten |= planner.rewritten(p)
        if rewritten != set(names):
            raise RuntimeError(f"{option}: the passes rewrote {sorted(rewritten)}, planned {sorted(names)}")

    structures = {c.structure for c in decisions.values() if c.structure is not None}
    order = [s for s in structure_order if s in structures] + sorted(structures - set(structure_order))
    for option in order:
        realise(planners.structural, option, [n for n, c in decisions.items() if c.structure == option])
    # then storage: int4 passes per block size, then int8; a structural rewrite's products are stored instead
    for option in sorted({c.storage for c in decisions.values() if c.storage is not None}, key=lambda q: (q == "int8", q)):
        chosen = [n for n, c in decisions.items() if c.storage == option]
        wanted = [x for n in chosen for x in (planners.structural.products(n) if decisions[n].structure is not None else [n])]
        realise(planners.storage, option, wanted)
    return work, done
