#!/usr/bin/env bash
# The one line `make setup` prints before it installs llama-cpp-python, the one long step of
# a first set-up: nothing when the locked version is installed already, "from the wheel pip
# built earlier" when pip's cache holds it, else that pip compiles llama.cpp now and
# roughly how long that takes on this many cores (measured: ~11 minutes on 2).
#   scripts/llama-cpp-note.sh PYTHON LOCKFILE CORES
set -euo pipefail
py=$1 lock=$2 n=$3
ver=$(sed -n 's/^llama[-_.]cpp[-_.]python==//Ip' "$lock")
have=$("$py" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
if [[ "$have" == "$ver" ]]; then
    exit 0
fi
if "$py" -m pip cache list "llama_cpp_python-$ver-" --format=abspath 2>/dev/null | grep -q .; then
    echo "edge-agent: installing llama-cpp-python $ver from the wheel pip built earlier (seconds)"
else
    echo "edge-agent: installing llama-cpp-python $ver; unless a built wheel is found, pip compiles" \
         "llama.cpp from source now: about $(( n < 11 ? (22 + n - 1) / n : 2 )) minutes on $n cores, once per machine"
fi
