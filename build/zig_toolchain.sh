#!/usr/bin/env bash
# A C/C++ toolchain whose output needs no glibc newer than a baseline: Zig's `zig cc` /
# `zig c++` (clang with glibc stubs of any version 2.17+, and its own libc++/libunwind,
# linked statically into each C++ library so no libstdc++ is needed), from the
# `ziglang` wheel on PyPI.
#
#   build/zig_toolchain.sh [BASELINE]   prints a folder holding cc, c++, ar, ranlib
#                                        (default BASELINE 2.28), making it first if needed
#
# TARGET_ARCH  x86_64 (default) or aarch64 (a cross toolchain: build/arm64.sh)
#
# The wrappers run `zig cc -target TARGET_ARCH-linux-gnu.BASELINE`. Kept in
# $BUILD_ENGINE_CACHE/../baseline (default ~/.cache/locopilot/baseline), beside
# Zig's own compile cache. Needs uv. Progress goes to stderr, the path to stdout.
set -euo pipefail

ZIG_VERSION=0.14.1
BASELINE="${1:-2.28}"
[[ "$BASELINE" =~ ^2\.[0-9]+$ ]] || { echo "zig_toolchain: baseline '$BASELINE' is not 2.N" >&2; exit 1; }
[[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]] || { echo "zig_toolchain: x86-64 Linux only" >&2; exit 1; }
ARCH="${TARGET_ARCH:-x86_64}"
[[ "$ARCH" == x86_64 || "$ARCH" == aarch64 ]] || { echo "zig_toolchain: TARGET_ARCH '$ARCH' is not x86_64 or aarch64" >&2; exit 1; }

CACHE="${BUILD_BASELINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/baseline}"
ENV="$CACHE/zig-$ZIG_VERSION"
BIN="$ENV/glibc-$BASELINE"
[[ "$ARCH" == x86_64 ]] || BIN="$ENV/$ARCH-glibc-$BASELINE"
if [[ ! -x "$BIN/c++" ]] || ! grep -q soname "$BIN/c++"; then
    if [[ ! -x "$ENV/bin/python" ]] || ! "$ENV/bin/python" -c 'import ziglang' 2>/dev/null; then
        echo "zig_toolchain: installing ziglang $ZIG_VERSION into $ENV" >&2
        uv venv --quiet --allow-existing "$ENV" >&2
        VIRTUAL_ENV="$ENV" uv pip install --quiet "ziglang==$ZIG_VERSION" >&2
    fi
    zig="$("$ENV/bin/python" -c 'import ziglang, pathlib; print(pathlib.Path(ziglang.__file__).parent / "zig")')"
    mkdir -p "$BIN.tmp"
    # -fno-sanitize=undefined: zig cc turns UBSan on for unoptimized compiles (configure
    # tests, -O0 objects), which would then need its runtime at link time.
    # ZIG_GLOBAL_CACHE_DIR: compiled libc stubs and libc++ land there, outside the repository.
    # Zig 0.14 rejects a versioned target when the input is stdin ("-": compilers'
    # probes such as waf's `cc -dM -E -`): those get the unversioned one, which only
    # changes what is preprocessed, not what is linked. -mevex512 with -mavx512*: Zig
    # names every feature of its baseline CPU, evex512 off among them, and clang 19 then
    # refuses 512-bit intrinsics (ggml's AVX-512 variants) without it. -Wl,-hNAME
    # (CPython's way to name libpython's soname) is -soname to Zig's linker.
    # -march=armv8.2-a+dotprod+fp16 (ggml's aarch64 variants) is a CPU name to Zig: it
    # becomes -mcpu=generic+v8_2a+dotprod+fullfp16, Zig's spelling of the same features.
    for tool in cc c++; do
        cat >"$BIN.tmp/$tool" <<EOF
#!/bin/sh
export ZIG_GLOBAL_CACHE_DIR="\${ZIG_GLOBAL_CACHE_DIR:-$CACHE/zig-cache}"
export ZIG_LOCAL_CACHE_DIR="\${ZIG_LOCAL_CACHE_DIR:-$CACHE/zig-cache}"
target=$ARCH-linux-gnu.$BASELINE
extra=
for arg do
    shift
    case "\$arg" in
        -) target=$ARCH-linux-gnu ;;
        -mavx512*) extra=-mevex512 ;;
        -Wl,-h*) arg="-Wl,-soname,\${arg#-Wl,-h}" ;;
        -march=armv*) arg="-mcpu=\$(echo "\${arg#-march=}" | sed -e 's/^armv8-a/generic/' \\
            -e 's/^armv\([0-9]\)\.\([0-9]\)-a/generic+v\1_\2a/' -e 's/+fp16/+fullfp16/g' -e 's/+nosve/-sve/g')" ;;
    esac
    set -- "\$@" "\$arg"
done
exec "$zig" $tool -target "\$target" -fno-sanitize=undefined \$extra "\$@"
EOF
    done
    for tool in ar ranlib; do
        printf '#!/bin/sh\nexec "%s" %s "$@"\n' "$zig" "$tool" >"$BIN.tmp/$tool"
    done
    chmod +x "$BIN.tmp"/*
    echo 'int main(void) { return 0; }' >"$BIN.tmp/check.c"
    "$BIN.tmp/cc" -O2 "$BIN.tmp/check.c" -o "$BIN.tmp/check" >&2
    rm "$BIN.tmp/check.c" "$BIN.tmp/check"
    rm -rf "$BIN"
    mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
