"""CUDA for ``--target cuda``: what is missing, and which provider runs which nodes.

``check_cuda`` says precisely what is missing, onnxruntime-gpu or a visible GPU or its CUDA libraries,
instead of letting onnxruntime fall back to the CPU silently. Whether the CUDA provider is compiled in, and
whether a session really runs on it, are ``onnxpress.runtime``'s checks; this module adds the probe (a CUDA
session on a one-node model) and the diagnosis of why it did not start.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from onnxpress import runtime
from onnxpress.errors import ValidationError
from onnxpress.targets.ort_output import native_stderr, one_line

CUDA_PROVIDER = runtime.PROVIDERS["cuda"]


@dataclasses.dataclass
class CudaStatus:
    """What this machine offers for ``--target cuda``; ``problem`` names what is missing (None: usable)."""

    onnxruntime: str
    packages: list[str]  # installed onnxruntime distributions, e.g. ["onnxruntime-gpu 1.32.0"]
    providers: list[str]  # ort.get_available_providers()
    problem: str | None = None
    detail: str = ""  # what onnxruntime said when the CUDA provider did not start

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def probe_cuda() -> tuple[bool, str]:
    """Start a CUDA session on a one-node model; (True, "") when CUDA really runs it, else (False, reason)."""
    import onnxruntime as ort

    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Add", ["x", "x"], ["y"])], "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    so = ort.SessionOptions()
    so.log_severity_level = 2  # warnings: why the CUDA provider did not load is logged, not raised
    error = ""
    with native_stderr() as native, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "provider not in available provider names": the result says it
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA_PROVIDER, "CPUExecutionProvider"], enable_fallback=0)
            ok = runtime.runs_on(session, CUDA_PROVIDER)
            if ok:
                session.run(None, {"x": np.ones(2, np.float32)})
        except Exception as exc:  # an EP error: CUDA libraries missing, no device
            ok, error = False, " ".join(str(exc).split())
    log = " ".join(" ".join(native).split())
    return ok, (error + " " + log).strip()


_LIB_PATTERN = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file|(\w+\.dll)[^.]*(?:not found|could not be loaded)", re.I)
_NO_DEVICE = ("no cuda-capable device", "cudaerrornodevice", "cuda failure 100", "cuda_error_no_device", "no gpu",
              "cuda driver version is insufficient", "found no nvidia driver")


def cuda_status(
    available: Sequence[str] | None = None,
    packages: Sequence[str] | None = None,
    probe: bool | Callable[[], tuple[bool, str]] = True,
) -> CudaStatus:
    """Check CUDA validation here: provider compiled in, GPU visible, libraries loadable.

    ``available``/``packages``/``probe`` replace what is read from onnxruntime (tests, dry runs);
    ``probe=False`` skips starting a CUDA session (the check is then only "onnxruntime-gpu is installed").
    """
    import onnxruntime as ort

    providers = list(ort.get_available_providers() if available is None else available)
    pkgs = list(runtime.installed_ort_packages() if packages is None else packages)
    status = CudaStatus(ort.__version__, pkgs, providers)
    if CUDA_PROVIDER not in providers:
        status.problem = runtime.cuda_provider_missing(providers, pkgs)
        return status
    if probe is False:
        return status
    ok, detail = (probe if callable(probe) else probe_cuda)()
    status.detail = detail[:600]
    if not ok:
        gpu_package = next((p for p in pkgs if p.startswith("onnxruntime-gpu")), f"onnxruntime {ort.__version__}")
        status.problem = _why_cuda_did_not_start(detail, gpu_package)
    return status


def _why_cuda_did_not_start(detail: str, gpu_package: str) -> str:
    """The problem line for a CUDA provider that is installed but did not run the probe; ``detail``: what
    onnxruntime said."""
    low = detail.lower()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    lib = _LIB_PATTERN.search(detail)
    if lib:
        return (
            f"{gpu_package} is installed but its CUDA provider cannot load {lib.group(1) or lib.group(2)} (CUDA/cuDNN runtime "
            "libraries missing or of the wrong major version); fix: install the CUDA and cuDNN versions this onnxruntime-gpu "
            "was built for, e.g. `pip install onnxruntime-gpu[cuda,cudnn]`"
        )
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        problem = f"{gpu_package} is installed but no GPU is visible: CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    elif any(s in low for s in _NO_DEVICE) or (sys.platform.startswith("linux") and not os.path.exists("/dev/nvidia0")):
        problem = f"{gpu_package} is installed but no GPU is visible (no CUDA device found by the driver)"
    else:
        problem = f"{gpu_package} is installed but CUDAExecutionProvider did not start"
    return problem + (f"; onnxruntime said: {detail[:300]}" if detail else "")


def check_cuda(
    available: Sequence[str] | None = None,
    packages: Sequence[str] | None = None,
    probe: bool | Callable[[], tuple[bool, str]] = True,
) -> list[str]:
    """The provider list for CUDA validation (as ``runtime.resolve_providers("cuda")``), or a
    ``ValidationError`` naming what is missing: onnxruntime-gpu, a visible GPU, or its CUDA libraries."""
    status = cuda_status(available, packages, probe)
    if status.problem:
        raise ValidationError(status.problem)
    return runtime.resolve_providers("cuda", status.providers)  # one provider list for CUDA, runtime's


def ep_assignment(model: Any, provider: str = "cpu") -> dict[str, dict[str, int]]:
    """Which execution provider runs which nodes once onnxruntime has partitioned the graph:
    ``{provider name: {op type: node count}}`` (CUDA: the ops that fall back to the CPU provider)."""
    import onnxruntime as ort

    providers = check_cuda() if provider == "cuda" else runtime.resolve_providers(provider)
    so = runtime.session_options()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    with runtime.model_source(model) as source:
        try:
            session = ort.InferenceSession(source, so, providers=providers)
        except Exception as exc:
            raise ValidationError(f"onnxruntime cannot load the model: {one_line(exc)}") from None
    out: dict[str, Counter] = {}
    for sub in session.get_provider_graph_assignment_info():
        counts = out.setdefault(sub.ep_name, Counter())
        for node in sub.get_nodes():
            counts[node.op_type] += 1
    return {ep: dict(sorted(c.items())) for ep, c in out.items()}
