"""`make setup` as a newcomer reads it: one line before the long step (llama.cpp's
compile) saying what happens and for how long, and no warnings of the project's own in
the log (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTE = ROOT / "scripts" / "llama-cpp-note.sh"
LOCK = ROOT / "requirements.lock"


def note(python: str, lock: Path, cores: int, **env: str) -> str:
    out = subprocess.run([str(NOTE), python, str(lock), str(cores)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin", **env})
    return out.stdout.strip()


def test_the_setup_says_before_the_long_step_what_it_does_and_how_long(tmp_path: Path) -> None:
    locked = re.search(r"^llama[-_.]cpp[-_.]python==(\S+)", LOCK.read_text(), re.M | re.I)
    assert locked is not None
    # Installed at the locked version: nothing to say.
    assert note(sys.executable, LOCK, 2) == ""
    # Another version locked, nothing in pip's cache: it compiles, ~11 minutes on 2 cores.
    other = tmp_path / "requirements.lock"
    other.write_text("llama-cpp-python==0.0.1\n")
    empty = tmp_path / "cache"
    said = note(sys.executable, other, 2, PIP_CACHE_DIR=str(empty))
    assert "pip compiles llama.cpp from source now: about 11 minutes on 2 cores" in said, said
    assert "about 6 minutes on 4 cores" in note(sys.executable, other, 4,
                                                PIP_CACHE_DIR=str(empty))
    # The wheel pip built earlier is in its cache: seconds.
    wheels = empty / "wheels" / "ab" / "cd"
    wheels.mkdir(parents=True)
    (wheels / "llama_cpp_python-0.0.1-py3-none-linux_x86_64.whl").write_bytes(b"PK")
    assert note(sys.executable, other, 2, PIP_CACHE_DIR=str(empty)) == (
        "edge-agent: installing llama-cpp-python 0.0.1 from the wheel pip built earlier "
        "(seconds)")
    # The Makefile says it first, then installs llama-cpp-python alone, with pip's progress.
    recipe = (ROOT / "Makefile").read_text()
    said_at = recipe.index("scripts/llama-cpp-note.sh $(PY) requirements.lock")
    install = re.search(r"^\t\$\(PY\) -m pip install (?P<args>[^\n]*llama\[-_\.\]cpp[^\n]*)$",
                        recipe, re.M)
    assert install is not None and install.start() > said_at
    assert "--quiet" not in install["args"]


def test_the_build_logs_no_warning_of_the_projects_own(tmp_path: Path) -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(meta["license"], str)  # an SPDX expression (PEP 639)
    assert not any(c.startswith("License ::") for c in meta.get("classifiers", []))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, check=False, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    warnings = re.findall(r"\w*Warning: [^\n]*", built.stdout + built.stderr)
    assert warnings == [], warnings
