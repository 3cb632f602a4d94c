"""Inference runtimes: which llama.cpp and ONNX Runtime builds the device has.

On the live system `llama_cpp` and `onnxruntime` are imported inside `probe_runtimes()`
only, never when this module is imported. Under a tree the live system is never probed:
the tree's captured `RUNTIMES_JSON` (a `RuntimeInfo` as JSON) is read instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from typing import Any

from agent.hardware.devroot import CAPTURE_DIR, DeviceRoot
from registry.profile import RuntimeInfo

RUNTIMES_JSON = f"{CAPTURE_DIR}/runtimes.json"

_LLAMA_BACKENDS = {"cuda": "cuda", "metal": "metal", "vulkan": "vulkan", "rocm": "rocm",
                   "hip": "rocm", "sycl": "sycl", "opencl": "opencl", "cann": "cann",
                   "musa": "musa", "kompute": "kompute"}


def _llama_backends(system_info: str) -> tuple[str, ...]:
    found: set[str] = set()
    for m in re.finditer(r"(?:^|\|)\s*([A-Za-z]+)\s*(:|=\s*1)", system_info):
        if (name := _LLAMA_BACKENDS.get(m.group(1).lower())) is not None:
            found.add(name)
    return tuple(sorted(found))


# llama.cpp's CPU feature names (its system info) → the CPU's, as CpuInfo.features names
# them. ARM_FMA, SVE_CNT, LLAMAFILE, OPENMP, REPACK and the like are not instructions.
_LLAMA_CPU_FEATURES = {
    "SSE3": "sse3", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2",
    "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8", "NEON": "neon", "FP16_VA": "fp16", "DOTPROD": "dotprod",
    "MATMUL_INT8": "i8mm", "SVE": "sve", "SME": "sme",
}


def llama_cpu_features(system_info: str) -> tuple[str, ...]:
    """The CPU features llama.cpp's CPU backend was compiled for, from its system info
    (`CPU : SSE3 = 1 | AVX = 1 | ...`; other backends' sections are skipped). A build made
    with -march=native on one machine uses them anywhere; on a CPU without one it stops
    with SIGILL. A build with runtime CPU variants reports the variant it loaded."""
    found: set[str] = set()
    section = ""
    for part in system_info.split("|"):
        head, colon, rest = part.partition(":")
        if colon and "=" not in head:  # "CPU : SSE3 = 1": a backend's section starts
            section, part = head.strip().upper(), rest
        name, eq, value = part.partition("=")
        if section == "CPU" and eq and value.strip() == "1" and \
                (feature := _LLAMA_CPU_FEATURES.get(name.strip().upper())) is not None:
            found.add(feature)
    return tuple(sorted(found))


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # missing, or a wheel whose native library will not load
        return None


def probe_runtimes() -> RuntimeInfo:
    """Import llama_cpp and onnxruntime here and ask each what it was built with."""
    fields: dict[str, Any] = {}
    if (llama := _import("llama_cpp")) is not None:
        fields["llama_cpp_version"] = str(getattr(llama, "__version__", "")) or None
        with contextlib.suppress(Exception):
            fields["llama_gpu_offload"] = bool(llama.llama_supports_gpu_offload())
        with contextlib.suppress(Exception):
            raw = llama.llama_print_system_info()
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            fields["llama_backends"] = _llama_backends(text)
            fields["llama_cpu_features"] = llama_cpu_features(text)
    if (ort := _import("onnxruntime")) is not None:
        fields["onnxruntime_version"] = str(getattr(ort, "__version__", "")) or None
        with contextlib.suppress(Exception):
            fields["onnx_providers"] = tuple(str(p) for p in ort.get_available_providers())
    return RuntimeInfo(**fields)


def captured_runtimes(dev: DeviceRoot) -> RuntimeInfo:
    """The tree's `RUNTIMES_JSON`; empty when absent or not a valid `RuntimeInfo`."""
    text = dev.read_text(RUNTIMES_JSON)
    if not text:
        return RuntimeInfo()
    try:
        return RuntimeInfo.model_validate(json.loads(text))
    except ValueError:  # bad JSON, or pydantic's ValidationError (a ValueError)
        return RuntimeInfo()


def detect_runtimes(dev: DeviceRoot) -> RuntimeInfo:
    """Probe the live system's runtimes; read a tree's capture (never the live system)."""
    return probe_runtimes() if dev.is_live else captured_runtimes(dev)
