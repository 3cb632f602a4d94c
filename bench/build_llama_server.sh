#!/bin/sh
# Build llama.cpp's llama-server from the sources vendored in the pinned llama-cpp-python
# sdist, outside the repository (never committed): the baseline of bench/concurrency.py.
#   bench/build_llama_server.sh [DIR]      (default: ../llama-server-build) → DIR/build/bin/llama-server
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/../llama-server-build}
version=$(sed -n 's/.*llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/pyproject.toml" | head -1)
mkdir -p "$dir"
cd "$dir"
[ -f "llama_cpp_python-$version.tar.gz" ] || \
  "$here/.venv/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
[ -d "llama_cpp_python-$version" ] || tar xzf "llama_cpp_python-$version.tar.gz"
cmake -S "llama_cpp_python-$version/vendor/llama.cpp" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >/dev/null
ninja -C build llama-server
echo "$dir/build/bin/llama-server"
