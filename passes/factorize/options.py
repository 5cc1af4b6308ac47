"""The options of ``factorize``: one frozen dataclass whose fields are the pipeline keys."""

from __future__ import annotations

import dataclasses
from typing import Literal

from onnxpress.pass_infra import option


@dataclasses.dataclass(frozen=True)
class FactorizeOptions:
    rank: int | None = option(None, "fixed rank r of every factorized layer")
    ratio: float | None = option(None, "fraction of each layer's parameters kept, in (0, 1) (allocation=global: of all selected layers together)")
    energy: float | None = option(None, "fraction of the squared singular values kept, in (0, 1] (calibrated: of the output energy)")
    error: float | None = option(None, "per-layer relative error budget (plain: weight Frobenius error; calibrated: output error on the calibration data)")
    calibrated: bool = option(False, "data-aware: use each layer's input second moment from calibration data so the truncation minimises the output error")
    allocation: Literal["layer", "global"] = option("layer", "ratio: every layer keeps the ratio (layer) or ranks are spread across layers to minimise total error (global)")
    share: bool = option(False, "layers reading the same input (attention Q, K, V) share one U and are budgeted as one layer (best with calibrated=true)")
    center: bool = option(True, "calibrated: truncate on the input covariance and carry the mean error in a bias (folded into an existing bias Add/Gemm C, else one Add)")
    damping: float = option(0.01, "calibrated: ridge added to the input second moment, as a fraction of its mean diagonal")
    min_size: int = option(4096, "layers whose weight has fewer parameters are left alone")
    conv: bool = option(False, "also factorize Conv (group 1): a KxK conv with r filters, then a 1x1 conv back to the output channels (plain SVD of the [O, C*kh*kw] filter matrix)")
    include: tuple[str, ...] = option((), "only nodes whose label (node name, else output name) contains one of these substrings (empty: all)")
    exclude: tuple[str, ...] = option((), "skip nodes whose label (node name, else output name) contains one of these substrings")

    def validate(self) -> None:
        given = [k for k in ("rank", "ratio", "energy", "error") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank=, ratio=, energy=, error= (got {', '.join(given) or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError("ratio must be in (0, 1)")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError("energy must be in (0, 1]")
        if self.error is not None and not 0.0 <= self.error < 1.0:
            raise ValueError("error must be in [0, 1)")
        if self.allocation == "global" and self.ratio is None:
            raise ValueError("allocation=global needs ratio=")
        if self.damping < 0.0:
            raise ValueError("damping must be >= 0")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")
