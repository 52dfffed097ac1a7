#!/usr/bin/env bash
# Build llama.cpp's own llama-bench, llama-batched-bench and llama-server from the
# same llama.cpp that llama-cpp-python 0.3.36 vendors, so the peers run the same
# kernels as our libllama. Output: $LLAMAFLEET_PEERS_DIR (default
# ~/.cache/llamafleet/peers)/bin/{llama-bench,llama-batched-bench,llama-server}.
#
#   bash llamafleet/bench/build_peers.sh            # download the sdist with pip, build
#   SDIST=/tmp/dl/llama_cpp_python-0.3.36.tar.gz bash llamafleet/bench/build_peers.sh
#   JOBS=2 bash llamafleet/bench/build_peers.sh
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${LLAMAFLEET_PEERS_DIR:-$HOME/.cache/llamafleet/peers}"
JOBS="${JOBS:-$(nproc)}"
WORK="$DEST/src"
mkdir -p "$DEST/bin" "$WORK"

TOOLS=(llama-bench llama-batched-bench llama-server)
if [[ -x "$DEST/bin/llama-bench" && -x "$DEST/bin/llama-batched-bench" \
      && -x "$DEST/bin/llama-server" && -z "${FORCE:-}" ]]; then
    echo "peers already built in $DEST/bin (FORCE=1 to rebuild)"
    exit 0
fi

SDIST="${SDIST:-}"
if [[ -z "$SDIST" ]]; then
    SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
fi
if [[ -z "$SDIST" ]]; then
    python3 -m pip download --no-binary :all: --no-deps -d "$WORK" "llama-cpp-python==$VERSION"
    SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
fi
echo "sdist: $SDIST"

SRC="$WORK/llama_cpp_python-$VERSION"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    tar -xzf "$SDIST" -C "$WORK"
fi

CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
            -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF)
case "$(uname -m)" in
    x86_64|amd64)
        # Same as scripts/install.sh: native, but no AMX (a native build
        # crashes in ggml_backend_amx_mul_mat on some CPUs).
        FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
        CMAKE_ARGS+=("-DCMAKE_C_FLAGS=$FLAGS" "-DCMAKE_CXX_FLAGS=$FLAGS")
        ;;
esac
if command -v ninja >/dev/null 2>&1; then CMAKE_ARGS+=(-G Ninja); fi

BUILD="$WORK/build"
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${CMAKE_ARGS[@]}"
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TOOLS[@]}"

for t in "${TOOLS[@]}"; do
    cp "$BUILD/bin/$t" "$DEST/bin/$t"
done
echo "built: ${TOOLS[*]} in $DEST/bin"
