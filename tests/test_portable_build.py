"""A wheelhouse for older CPUs: `LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF scripts/build-wheelhouse.sh`
compiles llama.cpp for x86-64-v3 instead of this machine's CPU.

It compiles llama.cpp (~11 minutes on 2 cores), so it runs only when asked:
EDGE_AGENT_TEST_PORTABLE_BUILD=1 (a flag for the long form, as the crash loops and the
soak have). What it shows: the wheel's llama.cpp needs no CPU feature that the captured
Core Ultra 9 185H lacks (the native build here needs AVX-512 and AMX), and it generates.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.hardware import detect

ROOT = Path(__file__).parent.parent
CORE_ULTRA = ROOT / "tests" / "fixtures" / "hw" / "intel-core-ultra-9-185h-geekom-gt1"

pytestmark = [
    pytest.mark.skipif(os.environ.get("EDGE_AGENT_TEST_PORTABLE_BUILD") != "1",
                       reason="compiles llama.cpp (~11 min): EDGE_AGENT_TEST_PORTABLE_BUILD=1"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86-64-v3 flags"),
]

PROBE = """
import json, sys
import llama_cpp
from agent.hardware.runtimes import llama_cpu_features
info = llama_cpp.llama_print_system_info().decode()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
print(json.dumps({"file": llama_cpp.__file__, "features": llama_cpu_features(info),
                  "text": out["choices"][0]["text"]}))
"""


@pytest.mark.timeout(1800)
def test_a_portable_wheelhouse_runs_on_a_cpu_the_native_build_does_not(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    out = tmp_path / "wheelhouse"
    env = {**os.environ, "LLAMA_CMAKE_ARGS": "-DGGML_NATIVE=OFF",
           "EDGE_AGENT_WHEEL_CACHE": "none", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
    built = subprocess.run([str(ROOT / "scripts" / "build-wheelhouse.sh"), str(out)], env=env,
                           capture_output=True, text=True, timeout=1700)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "compiling llama_cpp_python==" in built.stderr.replace("-", "_"), built.stderr
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    run = subprocess.run([sys.executable, "-c", PROBE, str(smollm2_gguf)], capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), got["file"]  # the wheel's, not the venv's
    assert set(got["features"]) == {"sse3", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2"}
    assert set(got["features"]) <= set(detect(CORE_ULTRA, probe_runtimes=False).cpu.features)
    assert got["text"].strip(), got
    # Not only what it says: no AVX-512 (zmm) or AMX (tmm) register in its machine code,
    # where the native build here has tens of thousands.
    if shutil.which("objdump"):
        for lib in sorted((site / "llama_cpp" / "lib").glob("*.so")):
            code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)],
                                  capture_output=True, text=True, check=True).stdout
            assert not re.search(r"%[zt]mm\d", code), f"{lib.name} uses AVX-512 or AMX"
    print(f"\nportable wheel {wheel.name}: {wheel.stat().st_size >> 20} MiB, features "
          f"{got['features']}; SmolLM2: {got['text']!r}")
