#!/usr/bin/env bash
# Build the wheelhouse the Ansible role installs devices from (no index on the device):
#   every pin of requirements-runtime.lock as a wheel for THIS machine's CPU architecture
#   and Python, llama-cpp-python included (compiled here once, ~11 min on 2 cores, or taken
#   from pip's wheel cache), the controller's PostgreSQL driver (pinned in
#   requirements.lock), and edge-agent's own wheel (pure Python).
#
#   scripts/build-wheelhouse.sh [OUT]      default OUT: var/wheelhouse/$(uname -m)
#
# It also writes OUT.tar (reproducible: sorted, fixed times and owners) and OUT.tar.sha256:
# the role sends that one file to a device, and only when its checksum differs from the one
# the device last unpacked.
#
# Run it on a machine of the devices' architecture and Python minor version (for another
# architecture, ansible/playbooks/wheelhouse.yml runs it on a build host of that
# architecture and fetches the result). The third-party wheels are rebuilt only when the
# lock changes (OUT/.lock-sha256); edge-agent's wheel is rebuilt every time, reproducibly
# (SOURCE_DATE_EPOCH), so an unchanged tree gives a byte-identical wheel and the role
# reinstalls the agent only when its code changed.
#
# llama.cpp is compiled for THIS machine's CPU (-march=native) unless LLAMA_CMAKE_ARGS says
# otherwise: a wheel built on a Xeon with AVX-512 and AMX cannot run on a Core Ultra or an
# Atom (the agent refuses GGUF there, naming the missing features). For a fleet of older
# CPUs: LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF" builds for x86-64-v3 (AVX2, FMA, F16C, BMI2),
# add "-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF" for
# x86-64-v2; on arm64 "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" (a
# Cortex-A76/A78) or "=armv8-a" (any). That wheel is compiled here with pip's cache off
# (pip keys its cache by the sdist, not by the flags) and kept per flag set.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=${1:-$root/var/wheelhouse/$(uname -m)}
lock=$root/requirements-runtime.lock
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The controller's extra: psycopg for a PostgreSQL database (pins from the full lock).
grep -iE '^psycopg(-binary)?==' "$root/requirements.lock" > "$out/controller.lock"
cp "$lock" "$out/requirements-runtime.lock"

llama_args=${LLAMA_CMAKE_ARGS:-}
want=$( (cat "$lock" "$out/controller.lock"; echo "llama: $llama_args") | sha256sum | cut -d' ' -f1)
# The third-party wheels depend only on the lock, the architecture and the Python: kept per
# user beside pip's cache too, so a fresh clone (CI, a second checkout) copies them instead
# of asking pip again (~20 s). EDGE_AGENT_WHEEL_CACHE=none turns that off.
pyver=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cache_root=${EDGE_AGENT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent/wheelhouse}
cache=$cache_root/$(uname -m)-$pyver-$want
if [[ "$(cat "$out/.lock-sha256" 2>/dev/null)" != "$want" ]]; then
    find "$out" -maxdepth 1 -name '*.whl' ! -name 'edge_agent-*' -delete
    if [[ "$cache_root" != none && -f "$cache/.complete" ]]; then
        echo "build-wheelhouse: third-party wheels for $(uname -m) from $cache" >&2
        cp "$cache"/*.whl "$out"/
    else
        echo "build-wheelhouse: third-party wheels for $(uname -m) into $out" >&2
        if [[ -n "$llama_args" ]]; then
            llama=$(grep -iE '^llama[-_.]cpp[-_.]python==' "$lock")
            echo "build-wheelhouse: compiling $llama with CMAKE_ARGS=$llama_args" >&2
            CMAKE_ARGS="$llama_args" "$py" -m pip wheel --quiet --no-deps --no-cache-dir \
                --no-binary llama-cpp-python --wheel-dir "$out" "$llama"
            grep -viE '^llama[-_.]cpp[-_.]python==' "$out/requirements-runtime.lock" \
                > "$out/.others.lock"
            "$py" -m pip wheel --quiet --no-deps --wheel-dir "$out" \
                -r "$out/.others.lock" -r "$out/controller.lock"
            rm -f "$out/.others.lock"
        else
            "$py" -m pip wheel --quiet --no-deps --wheel-dir "$out" \
                -r "$out/requirements-runtime.lock" -r "$out/controller.lock"
        fi
        if [[ "$cache_root" != none ]] && mkdir -p "$cache_root" 2>/dev/null; then
            part=$(mktemp -d "$cache_root/.part-XXXXXX")
            find "$out" -maxdepth 1 -name '*.whl' ! -name 'edge_agent-*' -exec cp {} "$part"/ \;
            touch "$part/.complete"
            mv -T "$part" "$cache" 2>/dev/null || rm -rf "$part"  # another run got there first
        fi
    fi
    echo "$want" > "$out/.lock-sha256"
fi

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$tmp" "$root"
for wheel in "$tmp"/edge_agent-*.whl; do
    name=$(basename "$wheel")
    if ! cmp -s "$wheel" "$out/$name"; then
        find "$out" -maxdepth 1 -name 'edge_agent-*.whl' -delete
        cp "$wheel" "$out/$name"
    fi
done
# One archive for the role to send: byte-identical as long as the wheels are.
tar --sort=name --mtime=@"$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --exclude=./.lock-sha256 -C "$out" -cf "$tmp/wheelhouse.tar" .
if ! cmp -s "$tmp/wheelhouse.tar" "$out.tar"; then
    mv "$tmp/wheelhouse.tar" "$out.tar"
fi
sha256sum "$out.tar" | cut -d' ' -f1 > "$out.tar.sha256"
echo "$out"
