#!/usr/bin/env bash
# A GPU companion of the engine: ggml's Vulkan or CUDA backend as one dynamically
# loaded library (libggml-vulkan.so, libggml-cuda.so), compiled from the llama.cpp
# sources of the llama-cpp-python sdist that uv.lock pins, so it matches the ggml
# (libggml-base.so.0) that the engine (build/engine_wheel.sh, or the development
# build) carries. The engine is built with GGML_BACKEND_DL; at start the runner loads
# every libggml-*.so it finds beside the binary or in LOCOPILOT_BACKENDS_DIR
# (runner.load_backends), so one binary serves CPU-only and GPU machines and the
# companion stays out of the 60 MB one-file binary.
#
#   build/gpu_backend.sh vulkan|cuda            prints the library's path, building it first if the cache lacks it
#   build/gpu_backend.sh vulkan|cuda --cached   prints the path if cached, else fails (builds nothing)
#
# vulkan   needs glslc and the Vulkan headers and loader
#          (apt-get install glslc libvulkan-dev spirv-headers; on Debian 12 newer headers are
#          fetched, see below; mesa-vulkan-drivers gives lavapipe, a
#          Vulkan device on the CPU, to try it without a GPU). The library needs only
#          libvulkan.so.1 at run time; without a loader or device the runner falls back
#          to the CPU.
# cuda     needs nvcc (CUDA_HOME, default /usr/local/cuda; CUDA 12.x or 13.x) and cuBLAS:
#          when the toolkit lacks it, the `nvidia-cublas` wheel (PyPI) matching nvcc's
#          major version is installed into the cache and used. The library links
#          libcudart, libcublas and libcublasLt (.so.MAJOR) dynamically: a machine that
#          uses it needs those (the CUDA runtime, or the nvidia-* wheels on
#          LD_LIBRARY_PATH) and an NVIDIA driver (libcuda.so.1) of that CUDA major version.
#          BUILD_CUDA_ARCHS: the GPU architectures (CMake's list, default below).
#          nvcc drives this machine's C++ compiler, so the library needs this machine's
#          glibc or newer.
#
# GLIBC_BASELINE (vulkan only) a glibc version (2.28, as `just gpu-backend` passes):
#          compile with build/zig_toolchain.sh's zig cc/c++ for that glibc, libc++ linked
#          statically, as the engine is (build/engine_wheel.sh), so the companion runs
#          wherever the binary does. Unset or `host`: this machine's compiler.
# BUILD_ENGINE_CACHE   where results (and unfinished builds, resumed when run again) are kept (default ${XDG_CACHE_HOME:-~/.cache}/locopilot/engine)
# Compiles run under `nice` (BUILD_NICE, default 10) with BUILD_JOBS
# jobs (default: the number of cores). Progress goes to stderr, the path to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND="${1:-}"
say() { echo "gpu_backend: $*" >&2; }

# sm_80 (A100, A30), sm_86 (RTX 30xx, A10, A40), sm_89 (RTX 40xx, L4, L40S), sm_90
# (H100, H200) as real code; one arch costs about as much compile time as the others.
DEFAULT_CUDA_ARCHS="80-real;86-real;89-real;90-real"
# Where newer Vulkan headers come from when the system's are too old (see below).
VULKAN_HEADERS_SUITE=trixie

FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_BACKEND_DL=ON
    -DGGML_NATIVE=OFF
    -DGGML_CPU=OFF
    -DGGML_OPENMP=OFF
    # The library finds libggml-base.so.0 as the one the engine already loaded, by soname.
    -DCMAKE_SKIP_RPATH=ON
    # llama.cpp's top level (the sdist lacks what ggml's own needs standing alone), ggml only.
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_CURL=OFF
)
case "$KIND" in
    vulkan)
        TARGET_LIB=ggml-vulkan
        FLAGS+=(-DGGML_VULKAN=ON)
        command -v glslc >/dev/null || { say "glslc not found (apt-get install glslc libvulkan-dev spirv-headers)"; exit 1; }
        TOOL_ID="$(glslc --version 2>&1 | sed -n 1p)"  # sed reads it all: head could end glslc by SIGPIPE, which pipefail makes fatal
        BASELINE="${GLIBC_BASELINE:-host}"
        if [[ "$BASELINE" != host ]]; then
            TOOLCHAIN="$("$ROOT/build/zig_toolchain.sh" "$BASELINE")"
            # CMake takes CC/CXX from the environment, and so does the vulkan-shaders-gen
            # helper it builds and runs here (a glibc BASELINE program runs on this newer one).
            export CC="$TOOLCHAIN/cc" CXX="$TOOLCHAIN/c++"
            FLAGS+=("-DCMAKE_AR=$TOOLCHAIN/ar" "-DCMAKE_RANLIB=$TOOLCHAIN/ranlib")
            # CMake learns the multiarch library folder from the compiler, and Zig's clang
            # names none, so FindVulkan is shown the loader it links (libvulkan-dev's).
            loader="$(ldconfig -p | sed -n 's/^\s*libvulkan\.so\.1 (libc6,x86-64) => //p' | sed -n 1p)"
            [[ -n "$loader" ]] || { say "no libvulkan.so.1 (apt-get install libvulkan-dev)"; exit 1; }
            FLAGS+=("-DVulkan_LIBRARY=$loader")
            TOOL_ID="$TOOL_ID glibc$BASELINE"
        fi
        ;;
    cuda)
        TARGET_LIB=ggml-cuda
        CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
        NVCC="$CUDA_HOME/bin/nvcc"
        [[ -x "$NVCC" ]] || { say "nvcc not found at $NVCC (set CUDA_HOME)"; exit 1; }
        ARCHS="${BUILD_CUDA_ARCHS:-$DEFAULT_CUDA_ARCHS}"
        FLAGS+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$NVCC" "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS")
        # ggml's VMM memory pool links the driver (libcuda.so); a toolkit without the driver's
        # link stub (lib64/stubs) builds the library with the legacy pool instead.
        if ! compgen -G "$CUDA_HOME/lib64/stubs/libcuda.so" >/dev/null && ! compgen -G "$CUDA_HOME/lib64/libcuda.so" >/dev/null; then
            say "no libcuda.so link stub in $CUDA_HOME: building without the VMM pool (GGML_CUDA_NO_VMM)"
            FLAGS+=(-DGGML_CUDA_NO_VMM=ON)
        fi
        TOOL_ID="$("$NVCC" --version | tail -1) $ARCHS"
        ;;
    *)
        say "usage: build/gpu_backend.sh vulkan|cuda [--cached]"
        exit 1
        ;;
esac

read -r VERSION SDIST_SHA < <(python3 "$ROOT/build/locked_sdist.py" "$ROOT/uv.lock" llama-cpp-python)
CACHE="${BUILD_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/engine}"
KEY="$(printf '%s\n' "$VERSION" "$SDIST_SHA" "${FLAGS[@]}" "$TOOL_ID" | sha256sum | cut -c1-12)"
TARGET="$CACHE/$TARGET_LIB-$VERSION-$KEY"

if [[ -f "$TARGET/lib$TARGET_LIB.so" ]]; then
    say "cached: $TARGET"
    echo "$TARGET/lib$TARGET_LIB.so"
    exit 0
fi
if [[ "${2:-}" == --cached ]]; then
    say "not cached: $TARGET"
    exit 1
fi

# The build folder is named by the key and kept until the library is done, so a build that
# was stopped (it takes hours for CUDA on two cores) goes on where it was when run again.
mkdir -p "$CACHE"
WORK="$CACHE/build-$TARGET_LIB-$VERSION-$KEY"
mkdir -p "$WORK"
exec 9>"$WORK.lock"
flock -n 9 || { say "another build of $WORK is running"; exit 1; }

sdist="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]] || ! echo "$SDIST_SHA  $sdist" | sha256sum --quiet -c; then
    uvx --from pip pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK/sdist" >&2
    echo "$SDIST_SHA  $WORK/sdist/llama_cpp_python-$VERSION.tar.gz" | sha256sum --quiet -c ||
        { say "the downloaded sdist does not match uv.lock's hash"; exit 1; }
    mv "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" "$sdist"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$SRC/CMakeLists.txt" ]] || tar -xzf "$sdist" -C "$WORK" "llama_cpp_python-$VERSION/vendor/llama.cpp"

# ggml-vulkan needs Vulkan headers newer than Debian 12's (1.3.239 lacks VK_EXT_layer_settings):
# then Debian 13's libvulkan-dev (headers only; the loader stays the system's) is fetched with
# apt from an apt configuration of its own in the cache, leaving the system's sources alone.
if [[ "$KIND" == vulkan ]] && ! grep -qs VK_EXT_layer_settings "${VULKAN_INCLUDE:-/usr/include}/vulkan/vulkan_core.h"; then
    HEADERS="$CACHE/vulkan-headers-$VULKAN_HEADERS_SUITE"
    if ! grep -qs VK_EXT_layer_settings "$HEADERS/usr/include/vulkan/vulkan_core.h"; then
        say "the system's Vulkan headers are too old: fetching libvulkan-dev from Debian $VULKAN_HEADERS_SUITE into $HEADERS"
        apt_dir="$HEADERS.apt"
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $VULKAN_HEADERS_SUITE main" >"$apt_dir/sources.list"
        apt_options=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
        apt-get "${apt_options[@]}" update >&2
        (cd "$apt_dir" && rm -f libvulkan-dev_*.deb && apt-get "${apt_options[@]}" download libvulkan-dev >&2)
        rm -rf "$HEADERS" && dpkg-deb -x "$apt_dir"/libvulkan-dev_*.deb "$HEADERS"
    fi
    FLAGS+=("-DVulkan_INCLUDE_DIR=$HEADERS/usr/include")
fi
# Zig's clang searches only its own headers for a glibc target, not /usr/include (whose glibc
# headers are this machine's): the SPIR-V headers (spirv-headers) are shown to it alone.
if [[ "$KIND" == vulkan && -n "${TOOLCHAIN:-}" ]]; then
    [[ -f /usr/include/spirv/unified1/spirv.hpp ]] || { say "no SPIR-V headers (apt-get install spirv-headers)"; exit 1; }
    mkdir -p "$WORK/include"
    ln -sfn /usr/include/spirv "$WORK/include/spirv"
    FLAGS+=("-DCMAKE_CXX_FLAGS=-I$WORK/include")
fi

if [[ "$KIND" == cuda && ! -e "$CUDA_HOME/include/cublas_v2.h" ]]; then
    major="$("$NVCC" --version | grep -o 'release [0-9]*' | grep -o '[0-9]*$')"
    CUBLAS="$CACHE/nvidia-cublas-cu$major"
    if ! compgen -G "$CUBLAS/nvidia/*/include/cublas_v2.h" >/dev/null && ! compgen -G "$CUBLAS/nvidia/*/*/include/cublas_v2.h" >/dev/null; then
        say "the toolkit has no cuBLAS: installing nvidia-cublas $major.* into $CUBLAS"
        uv pip install --quiet --no-deps --target "$CUBLAS" "nvidia-cublas==$major.*" >&2
    fi
    header="$(find "$CUBLAS" -name cublas_v2.h | head -1)"
    include="$(dirname "$header")"
    lib="$(dirname "$(find "$CUBLAS" -name "libcublas.so.$major" | head -1)")"
    # The wheel has only libcublas.so.MAJOR: the link-time names point at it.
    mkdir -p "$WORK/cublas-lib"
    ln -sf "$lib/libcublas.so.$major" "$WORK/cublas-lib/libcublas.so"
    ln -sf "$lib/libcublasLt.so.$major" "$WORK/cublas-lib/libcublasLt.so"
    FLAGS+=(
        "-DCUDA_cublas_LIBRARY=$WORK/cublas-lib/libcublas.so"
        "-DCUDA_cublasLt_LIBRARY=$WORK/cublas-lib/libcublasLt.so"
        "-DCMAKE_CXX_FLAGS=-I$include"
        "-DCMAKE_CUDA_FLAGS=-I$include"
    )
fi

say "llama-cpp-python $VERSION (ggml $(grep -Eo 'GGML_VERSION_(MAJOR|MINOR|PATCH) [0-9]+' "$SRC/ggml/CMakeLists.txt" | awk '{print $2}' | paste -sd.)), $KIND: $TOOL_ID"
NICE="${BUILD_NICE:-10}"
JOBS="${BUILD_JOBS:-$(nproc)}"
start=$SECONDS
nice -n "$NICE" cmake -S "$SRC" -B "$WORK/cmake" -G Ninja "${FLAGS[@]}" >&2
nice -n "$NICE" cmake --build "$WORK/cmake" --target "$TARGET_LIB" -j "$JOBS" >&2
say "built in $((SECONDS - start)) s"

built="$(find "$WORK/cmake" -name "lib$TARGET_LIB.so" -type f | head -1)"
rm -rf "$WORK/final"
mkdir -p "$WORK/final"
strip --strip-unneeded -o "$WORK/final/lib$TARGET_LIB.so" "$built"
cp "$WORK/cmake/.ninja_log" "$WORK/final/ninja_log" 2>/dev/null || true
# ggml's backend loader entry points; a library without them is not a companion.
nm -D --defined-only "$WORK/final/lib$TARGET_LIB.so" | grep -q ' ggml_backend_init$' ||
    { say "lib$TARGET_LIB.so exports no ggml_backend_init"; exit 1; }
# What it is, for the build log: its size, the libraries it needs, ggml's entry points it exports.
lib="$WORK/final/lib$TARGET_LIB.so"
say "lib$TARGET_LIB.so: $(stat -c %s "$lib") bytes; needs: $(readelf -d "$lib" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | paste -sd' ')"
say "exports: $(nm -D --defined-only "$lib" | awk '$3 ~ /^ggml_/ {print $3}' | paste -sd' ')"
mv "$WORK/final" "$TARGET"
rm -rf "$WORK" "$WORK.lock"
echo "$TARGET/lib$TARGET_LIB.so"
