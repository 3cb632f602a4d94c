"""A llama.cpp build made for another CPU: refused with a reason, never a SIGILL.

`make setup` (and a wheelhouse's build host) compiles llama.cpp with -march=native, so a
wheel from a Sapphire Rapids build host uses AVX-512 and AMX anywhere; on a Meteor Lake
or an Atom device it would load, then die with SIGILL in its first matrix kernel, and
systemd would restart it into the same death. The CPUs here are the real captures under
tests/fixtures/hw/; the build is this machine's own llama-cpp-python.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ModelLoadFailed
from agent.hardware import detect
from agent.hardware.runtimes import llama_cpu_features, probe_runtimes
from agent.runtime import llama as llama_runtime
from agent.runtime.llama import LlamaBackend, cpu_features_missing
from registry.profile import HardwareProfile, MemoryInfo, RuntimeInfo, llama_features_missing
from registry.selection import SelectionPolicy, select
from registry.types import VariantSpec

HW = Path(__file__).parent / "fixtures" / "hw"
GiB = 1 << 30
METEOR_LAKE = "intel-core-ultra-9-185h-geekom-gt1"  # AVX2 and AVX-VNNI, no AVX-512
ICE_LAKE = "x86-xeon-gold-6326-vmware-vm"  # AVX-512, no AVX-VNNI, BF16 or AMX
PI5 = "raspberry-pi-5"

# What llama.cpp prints on machines of other kinds (its format; a Jetson's CUDA build
# leads with the CUDA section, whose keys are no CPU features).
JETSON_INFO = ("CUDA : ARCHS = 870 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
               "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | MATMUL_INT8 = 1 | "
               "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
X86_64_V3_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
                  "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def tree(slug: str) -> HardwareProfile:
    if not (HW / slug).is_dir():
        pytest.skip(f"hardware fixture {slug} is not present")
    return detect(HW / slug, probe_runtimes=False)


def this_build() -> RuntimeInfo:
    return probe_runtimes()


def test_the_system_info_sections_are_read_per_backend() -> None:
    assert llama_cpu_features(JETSON_INFO) == ("dotprod", "fp16", "i8mm", "neon")
    assert llama_cpu_features(X86_64_V3_INFO) == (
        "avx", "avx2", "bmi2", "f16c", "fma", "sse3", "ssse3")
    assert llama_cpu_features("") == ()
    assert llama_cpu_features("CPU : AVX512 = 0 | AVX2 = 1 |") == ("avx2",)


def test_this_build_names_its_cpu_features_and_this_cpu_has_them() -> None:
    build = this_build()
    assert build.llama_cpu_features, "this build's system info names no CPU feature"
    live = detect(Path("/"), probe_runtimes=False).cpu
    assert llama_features_missing(live, build) == ()
    assert cpu_features_missing() == ()  # models load here (every other test shows it)


def test_a_build_for_another_cpu_is_found_out_on_the_captured_cpus() -> None:
    meteor, pi = tree(METEOR_LAKE).cpu, tree(PI5).cpu
    v3 = RuntimeInfo(llama_cpu_features=llama_cpu_features(X86_64_V3_INFO))
    assert llama_features_missing(meteor, v3) == ()  # a portable x86-64-v3 build runs there
    jetson = RuntimeInfo(llama_cpu_features=llama_cpu_features(JETSON_INFO))
    assert llama_features_missing(pi, jetson) == ("i8mm",)  # Cortex-A76 has no i8mm
    build = this_build()
    if "avx512f" not in build.llama_cpu_features:
        pytest.skip("this machine's build uses no AVX-512: nothing a Meteor Lake lacks")
    missing = llama_features_missing(meteor, build)
    assert "avx512f" in missing and "avx2" not in missing
    if "amx_int8" in build.llama_cpu_features:  # a Sapphire Rapids build on an Ice Lake
        ice = llama_features_missing(tree(ICE_LAKE).cpu, build)
        assert "amx_int8" in ice and "avx512f" not in ice, ice
    # a CPU whose features are unknown (a capture without cpuinfo) is not judged
    assert llama_features_missing(meteor.model_copy(update={"features": ()}), build) == ()


def test_selection_passes_over_gguf_on_a_cpu_the_build_does_not_fit() -> None:
    build = this_build()
    if "avx512f" not in build.llama_cpu_features:
        pytest.skip("this machine's build uses no AVX-512")
    profile = tree(METEOR_LAKE).model_copy(update={
        "runtimes": build.model_copy(update={"onnx_providers": ("CPUExecutionProvider",),
                                             "backends": ("gguf", "onnx")}),
        "memory": MemoryInfo(total_bytes=16 * GiB, available_bytes=16 * GiB)})
    specs = (
        VariantSpec(model_alias="m", name="gguf-q4_k_m-cpu", format="gguf",
                    quantization="Q4_K_M", target="cpu", file_size=800_000_000),
        VariantSpec(model_alias="m", name="onnx-int4-cpu", format="onnx",
                    quantization="int4", target="cpu", file_size=900_000_000),
    )
    sel = select(specs, profile, SelectionPolicy(), model_alias="m")
    assert sel.chosen.name == "onnx-int4-cpu"
    why = {c.variant.name: c.explanation for c in sel.candidates}["gguf-q4_k_m-cpu"]
    assert "SIGILL" in why and "avx512f" in why, why
    # the same device with a build made for it keeps its GGUF choice
    # and `device info` says so on the llama.cpp line
    from agent.hardware.profile import summary

    line = next(x for x in summary(profile).splitlines() if x.startswith("llama.cpp:"))
    assert "NOT USABLE" in line and "avx512f" in line, line
    fits = profile.model_copy(update={"runtimes": profile.runtimes.model_copy(
        update={"llama_cpu_features": llama_cpu_features(X86_64_V3_INFO)})})
    assert select(specs, fits, SelectionPolicy(), model_alias="m").chosen.name == "gguf-q4_k_m-cpu"


@pytest.mark.slow
def test_a_load_on_a_cpu_the_build_does_not_fit_is_refused_before_llama_cpp_runs(
    smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load's own check, for a variant that reaches the loader anyway (pinned, or
    selected under a captured tree): the Meteor Lake's captured CPU against this build."""
    build = this_build()
    missing = llama_features_missing(tree(METEOR_LAKE).cpu, build)
    if not missing:
        pytest.skip("this machine's build runs on a Meteor Lake")
    monkeypatch.setattr(llama_runtime, "cpu_features_missing", lambda: missing)
    from test_runtime_llama import resolved

    with pytest.raises(ModelLoadFailed, match="SIGILL") as err:
        LlamaBackend.load(resolved(smollm2_gguf), threads=2, n_ctx=256)
    assert "smollm2: cannot load variant gguf-q4_1-cpu" in str(err.value)
    assert ", ".join(missing) in str(err.value)
