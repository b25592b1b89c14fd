#!/usr/bin/env bash
# The release engine: llama-cpp-python, at the version uv.lock pins, built from its
# sdist with ggml's CPU code as runtime-dispatched variants, one
# libggml-cpu-<variant>.so per x86 instruction-set level next to libllama in
# llama_cpp/lib. At start the runner has ggml load the best one this CPU can run
# (runner.load_backends), so the one-file binary runs on any x86-64 and still uses
# AVX2 or AVX-512 where the CPU has them. The development build (pyproject.toml)
# has one AVX2-level variant and dies with "Illegal instruction" on older CPUs.
#
#   build/engine_wheel.sh            prints the wheel's path, building it first if the cache lacks it
#   build/engine_wheel.sh --cached   prints the path if the cache has the wheel, else fails (builds nothing)
#
# BUILD_CPU_VARIANTS   space-separated x86 variants to build (default below), or "all"
#                          for ggml's whole list (14; each is a full compile of ggml-cpu)
# GLIBC_BASELINE a glibc version (2.28): compile with build/zig_toolchain.sh's
#                          zig cc/c++ for that glibc, libc++ linked statically into each
#                          library (no libstdc++ or libgcc_s needed), and ggml's own thread
#                          pool instead of OpenMP (Zig has no libgomp; the system one is
#                          built for this machine's glibc). Unset: this machine's compiler.
# BUILD_ENGINE_CACHE   where wheels are kept (default ${XDG_CACHE_HOME:-~/.cache}/locopilot/engine)
#
# A wheel is kept under a name made of the version, the sdist's hash, the flags and
# the variant list, so a change of any of them builds anew; the build happens in the
# cache folder (outside the repository, so nothing built can be committed) and only
# a complete wheel gets its final name. Needs cmake, a C++ compiler, uv and python3
# (for `uvx --from pip pip download`). Progress goes to stderr, the path to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Why this subset of ggml's 14 x86 variants (ggml/src/CMakeLists.txt), oldest first:
# each variant is a full compile of ggml-cpu (17 files at -O3) and 1.0-1.4 MB in
# llama_cpp/lib (0.36-0.5 MB compressed in the binary), and a CPU runs the best
# variant whose instructions it has, so a missing variant costs a CPU only the
# instructions between it and the next one down.
#   x64          any x86-64 (SSE2): the floor, never dropped
#   sse42        Nehalem-era and current low-end Atom/Celeron/Pentium Silver without AVX (NAS boxes)
#   sandybridge  AVX: Sandy/Ivy Bridge (ivybridge adds only F16C), AMD Bulldozer/Piledriver
#   haswell      AVX2 FMA F16C BMI2: most CPUs since 2013, AMD Zen 1-3
#   alderlake    AVX2 + AVX-VNNI: Intel client CPUs since 12th gen (no AVX-512 there), faster int8 dots
#   skylakex     AVX-512: Skylake-SP servers (many cloud VMs); cascadelake adds VNNI
#   icelake      AVX-512 VBMI VNNI: Ice Lake and later Intel servers; cannonlake is nearly unsold
#   zen4         AVX-512 VBMI VNNI BF16: AMD Zen 4/5; Sapphire Rapids picks it too
# Left out: ivybridge, piledriver, cannonlake, cascadelake, cooperlake (each a step of
# one extension over a kept variant, on CPUs from before 2020), sapphirerapids (AMX
# for int8 matmul on Intel servers since 2023: add it for such hosts).
DEFAULT_VARIANTS="x64 sse42 sandybridge haswell alderlake skylakex icelake zen4"
ALL_X86="x64 sse42 sandybridge ivybridge piledriver haswell skylakex cannonlake cascadelake icelake cooperlake zen4 alderlake sapphirerapids"
VARIANTS="${BUILD_CPU_VARIANTS:-$DEFAULT_VARIANTS}"
[[ "$VARIANTS" == all ]] && VARIANTS="$ALL_X86"

# The flags of the development build (pyproject.toml) plus GGML_CPU_ALL_VARIANTS.
# CMAKE_INSTALL_BINDIR: the variant libraries are MODULE targets installed to the
# "bin" folder, which must be llama_cpp/lib, where ggml_backend_load_all_from_path looks.
FLAGS=(
    cmake.define.GGML_NATIVE=OFF
    cmake.define.GGML_BACKEND_DL=ON
    cmake.define.GGML_CPU_ALL_VARIANTS=ON
    cmake.define.CMAKE_INSTALL_BINDIR=llama_cpp/lib
    cmake.define.LLAVA_BUILD=OFF
)

say() { echo "engine_wheel: $*" >&2; }

BASELINE="${GLIBC_BASELINE:-}"
if [[ -n "$BASELINE" ]]; then
    TOOLCHAIN="$("$ROOT/build/zig_toolchain.sh" "$BASELINE")"
    export CC="$TOOLCHAIN/cc" CXX="$TOOLCHAIN/c++"
    FLAGS+=(
        cmake.define.GGML_OPENMP=OFF
        cmake.define.CMAKE_AR="$TOOLCHAIN/ar"
        cmake.define.CMAKE_RANLIB="$TOOLCHAIN/ranlib"
    )
fi

[[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]] || {
    say "the variant list is for x86-64 Linux; elsewhere use the development build"
    exit 1
}
for v in $VARIANTS; do
    [[ " $ALL_X86 " == *" $v "* ]] || {
        say "unknown x86 variant '$v' (known: $ALL_X86)"
        exit 1
    }
done

# Version and sdist hash from uv.lock, so the release engine is the locked one.
read -r VERSION SDIST_SHA < <(python3 "$ROOT/build/locked_sdist.py" "$ROOT/uv.lock" llama-cpp-python)

CACHE="${BUILD_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/engine}"
KEY="$(printf '%s\n' "$VERSION" "$SDIST_SHA" "${FLAGS[@]}" $VARIANTS | sed "s|$HOME|~|g" | sha256sum | cut -c1-12)"
TARGET="$CACHE/llama-cpp-python-$VERSION-$KEY${BASELINE:+-glibc$BASELINE}"

if compgen -G "$TARGET/*.whl" >/dev/null; then
    say "cached: $TARGET"
    ls "$TARGET"/*.whl
    exit 0
fi
if [[ "${1:-}" == --cached ]]; then
    say "not cached: $TARGET"
    exit 1
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build-$VERSION-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

say "llama-cpp-python $VERSION, CPU variants: $VARIANTS"
sdist="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]] || ! echo "$SDIST_SHA  $sdist" | sha256sum --quiet -c; then
    uvx --from pip pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK/sdist" >&2
    echo "$SDIST_SHA  $WORK/sdist/llama_cpp_python-$VERSION.tar.gz" | sha256sum --quiet -c ||
        { say "the downloaded sdist does not match uv.lock's hash"; exit 1; }
    mv "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" "$sdist"
fi
tar -xzf "$sdist" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"

# Build only the chosen variants: comment out the others' lines in ggml's x86 list.
LIST="$SRC/vendor/llama.cpp/ggml/src/CMakeLists.txt"
for v in $ALL_X86; do
    if [[ " $VARIANTS " != *" $v "* ]]; then
        sed -i -E "s/^([[:space:]]*)(ggml_add_cpu_backend_variant\($v[[:space:])])/\1# left out by build\/engine_wheel.sh: \2/" "$LIST"
    fi
done
# Each kept variant once, each left-out one gone: a llama.cpp that renamed or added
# variants stops here instead of building something else.
for v in $ALL_X86; do
    n="$(grep -Ec "^[[:space:]]*ggml_add_cpu_backend_variant\($v[[:space:])]" "$LIST" || true)"
    want=0
    [[ " $VARIANTS " == *" $v "* ]] && want=1
    ((n == want)) || { say "$LIST: $n lines for variant $v, expected $want"; exit 1; }
done

args=(-C "build-dir=$WORK/cmake")
for f in "${FLAGS[@]}"; do args+=(-C "$f"); done
start=$SECONDS
# --no-config: this project's own [tool.uv] settings are not for this build.
(cd "$WORK" && uv build --no-config --wheel --out-dir "$WORK/dist" "${args[@]}" "$SRC") >&2
say "built in $((SECONDS - start)) s"

wheel="$(ls "$WORK"/dist/*.whl)"
python3 - "$wheel" $VARIANTS <<'EOF'
import sys, zipfile
names = {n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(sys.argv[1]).namelist()}
missing = [v for v in sys.argv[2:] if f"libggml-cpu-{v}.so" not in names]
if missing:
    sys.exit(f"engine_wheel: the wheel lacks libggml-cpu-{{{','.join(missing)}}}.so")
EOF
mkdir -p "$WORK/final"
mv "$wheel" "$WORK/final/"
# Ninja's log (start and end of each compile, in ms) shows what each variant costs.
cp "$WORK/cmake/.ninja_log" "$WORK/final/ninja_log" 2>/dev/null || true
mv "$WORK/final" "$TARGET"
ls "$TARGET"/*.whl
