"""The options of the ``prune`` pass (pipeline keys and their help) and the include/exclude selection."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from onnxpress.pass_infra import option


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: Literal["magnitude", "nm", "structured"] = option("magnitude", "magnitude: zero single weights; nm: N:M semi-structured along the reduction axis; structured: remove whole hidden units (MLP units, Conv channels)")
    sparsity: float = option(0.5, "magnitude: share of each layer's weights zeroed; structured: share of each block's hidden units removed")
    scope: Literal["output", "layer", "global"] = option("output", "magnitude: comparison group of the scores: each output unit (as Wanda), each layer, or all selected layers together")
    n: int = option(2, "nm: weights kept in every group")
    m: int = option(4, "nm: group size along the reduction axis")
    calibrated: bool = option(False, "score with calibration data: |w| * input channel norm (Wanda) for magnitude/nm; activation spread * ||W2 row|| for structured, with the removed units' mean moved into the next bias")
    update: bool = option(False, "calibrated: also re-fit the surviving weights to the calibration outputs (magnitude/nm: see solver; structured MLP: least-squares W2 rows)")
    solver: Literal["refit", "sparsegpt"] = option("refit", "update of magnitude/nm: refit = exact least squares of each output on its kept inputs (best measured, slower); sparsegpt = SparseGPT's one-pass update, mask chosen on the way")
    sequential: bool = option(False, "calibrated: calibrate each layer on the model pruned so far (one onnxruntime run per depth level instead of one in all; less accumulated error)")
    skip_padding: bool = option(True, "calibrated: leave out padding tokens (rows of [batch, sequence, ...] activations where a rank-2 0/1 input named '*mask*' is 0)")
    damping: float = option(0.1, "update: ridge added to the input second moment, as a fraction of its mean diagonal (0.1 measured best on MiniLM: 0.01 overfits the few calibration tokens)")
    min_size: int = option(4096, "layers whose weight has fewer parameters are left alone")
    include: tuple[str, ...] = option((), "only layers whose label (node name, else output name) or weight name contains one of these substrings (empty: all)")
    exclude: tuple[str, ...] = option((), "skip layers whose label (node name, else output name) or weight name contains one of these substrings")

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError("sparsity must be in (0, 1)")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise ValueError("nm needs 0 < n < m")
        if self.update and not self.calibrated:
            raise ValueError("update=true needs calibrated=true (the re-fit uses calibration data)")
        if self.sequential and not self.calibrated:
            raise ValueError("sequential=true needs calibrated=true")
        if self.sequential and self.scope == "global" and self.method == "magnitude":
            raise ValueError("sequential=true prunes layer by layer: use scope=output or scope=layer")
        if self.damping < 0.0:
            raise ValueError("damping must be >= 0")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")


def selection(o: PruneOptions, texts: Sequence[str]) -> tuple[bool, bool]:
    """(included, excluded) by the include/exclude substrings over the node and weight names."""
    included = not o.include or any(sub in t for sub in o.include for t in texts if t)
    excluded = any(sub in t for sub in o.exclude for t in texts if t)
    return included, excluded
