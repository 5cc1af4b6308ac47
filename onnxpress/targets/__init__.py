"""Deployment targets: ``cpu``, ``cuda`` and ONNX Runtime Mobile (``mobile``).

A target says where the rewritten model will run and therefore
- which execution provider validates it (``Target.provider``, a key of ``runtime.PROVIDERS``);
- which pass options it implies (``Target.pass_defaults``: pass name -> option overrides; an option the
  user set in the pipeline text always wins, see ``apply_target``). Each pass declares its own, with the
  reason for each, in ``Pass.target_defaults`` / ``Pass.target_reasons``; a target collects them from
  every registered pass (``onnxpress.registry``), so the knowledge stays with the pass it is about.

The rest of the package, re-exported here:
- ``cuda``: ``check_cuda`` says precisely what is missing for CUDA validation; ``ep_assignment``;
- ``mobile``: per mobile execution provider coverage (``ep_coverage``);
- ``export``: ORT-format conversion and the mobile artefacts (``export_mobile``, ``check_mobile``).
Imports go one way: ``__init__`` -> ``export`` -> ``mobile`` -> ``ort_output``; ``cuda`` -> ``ort_output``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from onnxpress.errors import UsageError
from onnxpress.pass_infra import Pass
from onnxpress.pipeline import Pipeline
from onnxpress.registry import registry
from onnxpress.targets.cuda import CudaStatus, check_cuda, cuda_status, ep_assignment, probe_cuda
from onnxpress.targets.export import (
    STYLES,
    MobilePaths,
    MobileReport,
    OptimizationStyle,
    check_mobile,
    convert_to_ort,
    export_mobile,
    mobile_paths,
    required_ops,
)
from onnxpress.targets.mobile import XNNPACK_OPS, EpCoverage, ep_coverage

__all__ = [
    "STYLES", "TARGETS", "XNNPACK_OPS", "CudaStatus", "EpCoverage", "MobilePaths", "MobileReport", "OptimizationStyle",
    "PassOptions", "Target", "apply_target", "check_cuda", "check_mobile", "collect_pass_options", "convert_to_ort",
    "cuda_status", "ep_assignment", "ep_coverage", "export_mobile", "get_target", "mobile_paths", "probe_cuda",
    "required_ops",
]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the model will run: the provider that validates it and the pass options it implies."""

    name: str
    provider: str  # key of runtime.PROVIDERS: validation runs on this execution provider
    description: str

    @property
    def pass_defaults(self) -> Mapping[str, Mapping[str, Any]]:
        """Pass name -> {option: value}, as the registered passes declare for this target."""
        return _declared_by_passes()[self.name].defaults

    @property
    def reasons(self) -> Mapping[str, str]:
        """``"pass.option"`` -> why this target sets it."""
        return _declared_by_passes()[self.name].reasons


TARGETS: Mapping[str, Target] = MappingProxyType({
    "cpu": Target("cpu", "cpu", "ONNX Runtime CPU (x86/ARM servers and desktops): the pass defaults are tuned for it"),
    "cuda": Target("cuda", "cuda", "ONNX Runtime with CUDAExecutionProvider (onnxruntime-gpu and an NVIDIA GPU)"),
    "mobile": Target(
        "mobile", "cpu",
        "ONNX Runtime Mobile (.ort format; NNAPI on Android, CoreML on iOS, XNNPACK, or the CPU provider)",
    ),
})


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """What the passes declare for one target."""

    defaults: Mapping[str, Mapping[str, Any]]  # pass name -> {option: value}
    reasons: Mapping[str, str]  # "pass.option" -> why


def collect_pass_options(pass_classes: Iterable[type[Pass]]) -> Mapping[str, PassOptions]:
    """Target name -> the options the passes declare for it (``Pass.target_defaults``) and why
    (``Pass.target_reasons``). A pass naming a target that does not exist raises ``RuntimeError``."""
    defaults: dict[str, dict[str, Mapping[str, Any]]] = {name: {} for name in TARGETS}
    reasons: dict[str, dict[str, str]] = {name: {} for name in TARGETS}
    for cls in pass_classes:
        declared, why = cls.target_defaults, cls.target_reasons
        unknown = sorted((set(declared) | set(why)) - set(TARGETS))
        if unknown:  # a misspelt target name would silently drop its constraints
            raise RuntimeError(f"pass '{cls.name}' declares options for unknown target(s) {', '.join(unknown)} (targets: {', '.join(TARGETS)})")
        for target, options in declared.items():
            if options:
                defaults[target][cls.name] = MappingProxyType(dict(options))
        for target, options in why.items():
            reasons[target].update((f"{cls.name}.{option}", text) for option, text in options.items())
    return MappingProxyType({
        name: PassOptions(MappingProxyType(defaults[name]), MappingProxyType(reasons[name])) for name in TARGETS
    })


@functools.cache
def _declared_by_passes() -> Mapping[str, PassOptions]:
    return collect_pass_options(registry().values())


def get_target(target: str | Target) -> Target:
    if isinstance(target, Target):
        return target
    key = str(target).lower()
    if key not in TARGETS:
        raise UsageError(f"unknown target '{target}' (valid: {', '.join(TARGETS)})")
    return TARGETS[key]


def apply_target(pipeline: Any, target: str | Target) -> Pipeline:
    """The pipeline with the target's option defaults filled in; options set in the pipeline text win.

    ``pipeline``: a Pipeline, pipeline text or a list of passes. Returns a new ``Pipeline`` whose text shows
    the effective options (e.g. ``qdq(per_channel=false,...)``), so reports say what really ran.
    """
    t = get_target(target)
    pipe = Pipeline.coerce(pipeline)
    passes = []
    for p in pipe:
        overrides = t.pass_defaults.get(p.name)
        if not overrides:
            passes.append(p)
            continue
        fields = {f.name for f in dataclasses.fields(p.Options)}
        unknown = sorted(set(overrides) - fields)
        if unknown:  # a renamed option must not silently drop a target constraint
            raise UsageError(f"target {t.name}: pass '{p.name}' has no option {', '.join(unknown)}")
        kwargs = {k: getattr(p.options, k) for k in p.explicit}
        for key, value in overrides.items():
            kwargs.setdefault(key, value)
        passes.append(type(p)(**kwargs))
    return Pipeline(passes)
