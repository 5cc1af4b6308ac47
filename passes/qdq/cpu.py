"""Which 8-bit weight type suits the CPU running the pass (``weight_type=auto``)."""

from __future__ import annotations

import functools

from onnxpress.passes.qdq.options import QdqOptions


@functools.cache  # asked once per quantized layer; the CPU does not change within a process
def cpu_has_int8_dot() -> bool:
    """Whether this CPU multiplies u8 x s8 without int16 saturation: x86 with VNNI/AMX, or any non-x86 CPU."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return True  # unknown: the portable, fast default


def resolved_weight_type(o: QdqOptions) -> str:
    if o.weight_type != "auto":
        return o.weight_type
    return "int8" if (o.reduce_range or cpu_has_int8_dot()) else "uint8"
