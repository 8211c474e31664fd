"""What this CPU's integer instructions compute exactly.

x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake) multiply u8 by s8 with `vpmaddubsw`, which adds
each pair of products in saturating 16-bit arithmetic: 255 · 127 · 2 = 64770 > 2¹⁵ − 1. ONNX Runtime has an
exact U8U8 path for those CPUs (`runtime.engine.session_options`); OpenVINO's CPU plugin has none, so its
int8 convolutions there move W8A8 outputs by tens of quantization steps (`runtime.openvino`). VNNI
(`vpdpbusd`, AVX-512 VNNI or AVX-VNNI) and AMX accumulate in 32 bits and are exact.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

EXACT_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int8_saturates() -> bool:
    """Whether this is an x86 CPU whose u8·s8 instructions saturate: known flags, none of `EXACT_INT8`.
    Other architectures, and CPUs whose flags cannot be read, are taken to be exact."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    flags = cpu_flags()
    return x86 and bool(flags) and not flags & set(EXACT_INT8)
