#!/usr/bin/env bash
# The Linux arm64 (aarch64) one-file binary, dist/locopilot-aarch64, built on this x86-64
# machine: what is compiled is cross-compiled with build/zig_toolchain.sh's Zig for
# aarch64-linux-gnu.2.28, and PyInstaller, which must run on the architecture it packs
# for, runs under qemu-aarch64 user emulation in an arm64 Debian 12 root.
#
#   build/arm64.sh [build]    dist/locopilot-aarch64 (each part below, from the cache when it has it)
#   build/arm64.sh root       prints the arm64 Debian 12 root's path, making it first
#   build/arm64.sh engine     prints the cross-compiled engine wheel's path, building it first
#   build/arm64.sh binfmt     registers qemu-aarch64-static with binfmt_misc (what the others need)
#
# The parts:
# - root: `debootstrap --foreign --arch=arm64` of Debian 12 (minbase plus python3.11,
#   libpython3.11, pip's wheel and binutils: PyInstaller needs the shared libpython, the
#   spec readelf and strip; not python3.11-venv, whose python3.11-distutils is a virtual
#   package that debootstrap cannot resolve), its second stage run under qemu (about 30
#   minutes here under a load of 20). Kept in $ARM64_CACHE/bookworm-root. The venv in it (/opt/venv) gets the
#   locked dependencies as aarch64 wheels from PyPI (pip in the root, --only-binary:
#   nothing is compiled under emulation) and the two wheels below.
# - engine: llama-cpp-python at uv.lock's version from its sdist, cross-compiled (CMake
#   with CMAKE_SYSTEM_PROCESSOR=aarch64) with ggml's aarch64 CPU variants as runtime-
#   chosen libraries (GGML_CPU_ALL_VARIANTS: ggml picks the best one the CPU's HWCAPs
#   allow), libc++ linked into each library, ggml's thread pool instead of OpenMP (as
#   the x86 GLIBC_BASELINE build). llama.cpp's "common" library (and cpp-httplib) is
#   not built: llama_cpp does not load it and the spec does not bundle it; it was half
#   the compile. Kept beside build/engine_wheel.sh's wheels.
# - PyInstaller: build/pyinstaller_wheel.sh with TARGET_ARCH=aarch64 (the patched
#   bootloader cross-compiled with Zig, zlib linked in).
# - Python: Debian 12's arm64 python3.11 (3.11.2, the version of the x86 baseline
#   build) and the Debian libraries PyInstaller bundles with it, so the binary needs
#   glibc 2.36 (Debian 12, Ubuntu 23.04+, Fedora 37+): libexpat and libstdc++ need
#   GLIBC_2.36, libpython 2.35 (the audit at the end prints what each file needs). What
#   is compiled here (engine, bootloader) needs no more than 2.27 and the PyPI wheels
#   2.28; a Python for aarch64 built as build/python_baseline.sh builds the x86 one is
#   what a 2.28 arm64 binary lacks.
#
# ARM64_CPU_VARIANTS  ggml's aarch64 variants to build (default below; "all" for the
#                     eight of ggml's list). Each is a full compile of ggml-cpu.
# ARM64_CACHE         where the root is kept (default ${XDG_CACHE_HOME:-~/.cache}/locopilot/arm64)
# BUILD_ENGINE_CACHE  where the wheels are kept (as build/engine_wheel.sh)
#
# Needs root (debootstrap, chroot, mounts, binfmt_misc), debootstrap, Debian's
# qemu-user-static, cmake, ninja, uv. Progress goes to stderr; paths to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "arm64: $*" >&2; }
BASELINE=2.28

# ggml's aarch64 list (ggml/src/CMakeLists.txt), and which CPUs pick which:
#   armv8.0_1  any ARMv8-A (NEON): Raspberry Pi 3/4 (Cortex-A53/A72): the floor, never dropped
#   armv8.2_2  dot product and FP16 arithmetic: Raspberry Pi 5 (A76), AWS Graviton2 and
#              Ampere Altra (Neoverse N1), Apple M1-M4 in Linux VMs (they lack SVE)
#   armv8.6_1  SVE and int8 matmul: Graviton3/4, Neoverse V1/V2/N2 (Grace, Cobalt 100)
# Left out: armv8.2_1 (dot product without FP16: few CPUs), armv8.2_3 (SVE without
# i8mm), armv8.6_2 (SVE2: takes 8.6_1 otherwise), armv9.2_1/2 (SME: few servers yet).
DEFAULT_VARIANTS="armv8.0_1 armv8.2_2 armv8.6_1"
ALL_ARM="armv8.0_1 armv8.2_1 armv8.2_2 armv8.2_3 armv8.6_1 armv8.6_2 armv9.2_1 armv9.2_2"
VARIANTS="${ARM64_CPU_VARIANTS:-$DEFAULT_VARIANTS}"
[[ "$VARIANTS" == all ]] && VARIANTS="$ALL_ARM"
for v in $VARIANTS; do
    [[ " $ALL_ARM " == *" $v "* ]] || { say "unknown aarch64 variant '$v' (known: $ALL_ARM)"; exit 1; }
done

ENGINE_CACHE="${BUILD_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/engine}"
ARM64_CACHE="${ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/arm64}"
QEMU=/usr/bin/qemu-aarch64-static

# binfmt_misc: aarch64 ELF executables run through qemu-aarch64-static. F (fix
# binary): the kernel opens qemu now, so it works inside the root too (chroot) without
# a copy there. Kept registered (the smoke test's SMOKE_ARM64 step uses it as well).
binfmt() {
    [[ -x "$QEMU" ]] || { say "$QEMU is missing (apt-get install qemu-user-static)"; exit 1; }
    local dir=/proc/sys/fs/binfmt_misc
    [[ -e "$dir/register" ]] || mount -t binfmt_misc binfmt_misc "$dir"
    local entry
    for entry in "$dir"/*; do
        [[ -f "$entry" ]] && grep -q '^magic 7f454c460201010000000000000000000200b700' "$entry" &&
            grep -q '^enabled' "$entry" && grep -q '^flags: .*F' "$entry" && return 0
    done
    echo ':locopilot-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':F' \
        >"$dir/register"
    say "registered $dir/locopilot-aarch64 ($QEMU)"
}

engine() {
    local flags=(
        cmake.define.CMAKE_SYSTEM_NAME=Linux
        cmake.define.CMAKE_SYSTEM_PROCESSOR=aarch64
        cmake.define.GGML_NATIVE=OFF
        cmake.define.GGML_BACKEND_DL=ON
        cmake.define.GGML_CPU_ALL_VARIANTS=ON
        cmake.define.GGML_OPENMP=OFF
        cmake.define.CMAKE_INSTALL_BINDIR=llama_cpp/lib
        cmake.define.LLAVA_BUILD=OFF
    )
    local version sdist_sha key target
    read -r version sdist_sha < <(python3 "$ROOT/build/locked_sdist.py" "$ROOT/uv.lock" llama-cpp-python)
    key="$(printf '%s\n' "$version" "$sdist_sha" "${flags[@]}" no-common $VARIANTS | sha256sum | cut -c1-12)"
    target="$ENGINE_CACHE/llama-cpp-python-$version-$key-aarch64-glibc$BASELINE"
    if compgen -G "$target/*.whl" >/dev/null; then
        say "engine cached: $target"
        ls "$target"/*.whl
        return
    fi
    local toolchain
    toolchain="$(TARGET_ARCH=aarch64 "$ROOT/build/zig_toolchain.sh" "$BASELINE")"
    flags+=(cmake.define.CMAKE_AR="$toolchain/ar" cmake.define.CMAKE_RANLIB="$toolchain/ranlib")
    mkdir -p "$ENGINE_CACHE"
    local work
    work="$(mktemp -d "$ENGINE_CACHE/build-aarch64-$version-XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    say "llama-cpp-python $version for aarch64, CPU variants: $VARIANTS"
    local sdist="$ENGINE_CACHE/llama_cpp_python-$version.tar.gz"
    if [[ ! -f "$sdist" ]] || ! echo "$sdist_sha  $sdist" | sha256sum --quiet -c; then
        uvx --from pip pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work/sdist" >&2
        echo "$sdist_sha  $work/sdist/llama_cpp_python-$version.tar.gz" | sha256sum --quiet -c ||
            { say "the downloaded sdist does not match uv.lock's hash"; exit 1; }
        mv "$work/sdist/llama_cpp_python-$version.tar.gz" "$sdist"
    fi
    tar -xzf "$sdist" -C "$work"
    local src="$work/llama_cpp_python-$version"
    # Only the chosen variants (as build/engine_wheel.sh does for x86), each once.
    local list="$src/vendor/llama.cpp/ggml/src/CMakeLists.txt" v n want
    for v in $ALL_ARM; do
        [[ " $VARIANTS " == *" $v "* ]] ||
            sed -i -E "s/^([[:space:]]*)(ggml_add_cpu_backend_variant\($v[[:space:])])/\1# left out by build\/arm64.sh: \2/" "$list"
    done
    for v in $ALL_ARM; do
        n="$(grep -Ec "^[[:space:]]*ggml_add_cpu_backend_variant\($v[[:space:])]" "$list" || true)"
        want=0
        [[ " $VARIANTS " == *" $v "* ]] && want=1
        ((n == want)) || { say "$list: $n lines for variant $v, expected $want"; exit 1; }
    done
    # llama-cpp-python forces LLAMA_BUILD_COMMON on; nothing bundled uses it.
    sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)/set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)/' \
        "$src/CMakeLists.txt"
    grep -q 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)' "$src/CMakeLists.txt" ||
        { say "llama-cpp-python's CMakeLists.txt no longer forces LLAMA_BUILD_COMMON as expected"; exit 1; }
    local args=(-C "build-dir=$work/cmake") f start=$SECONDS
    for f in "${flags[@]}"; do args+=(-C "$f"); done
    # _PYTHON_HOST_PLATFORM: the wheel's platform tag (linux_aarch64), not this machine's.
    (cd "$work" && CC="$toolchain/cc" CXX="$toolchain/c++" _PYTHON_HOST_PLATFORM=linux-aarch64 \
        uv build --no-config --wheel --out-dir "$work/dist" "${args[@]}" "$src") >&2
    say "engine built in $((SECONDS - start)) s"
    local wheel
    wheel="$(ls "$work"/dist/*.whl)"
    python3 - "$wheel" $VARIANTS <<'EOF'
import subprocess, sys, tempfile, zipfile
archive = zipfile.ZipFile(sys.argv[1])
names = {n.rsplit("/", 1)[-1]: n for n in archive.namelist()}
missing = [v for v in sys.argv[2:] if f"libggml-cpu-{v}.so" not in names]
if missing:
    sys.exit(f"arm64: the wheel lacks libggml-cpu-{{{','.join(missing)}}}.so")
with tempfile.NamedTemporaryFile() as f:
    f.write(archive.read(names["libllama.so"]))
    f.flush()
    header = subprocess.run(["readelf", "-h", f.name], capture_output=True, text=True, check=True).stdout
if "AArch64" not in header:
    sys.exit("arm64: the wheel's libllama.so is not an AArch64 library")
EOF
    mkdir -p "$work/final"
    mv "$wheel" "$work/final/"
    cp "$work/cmake/.ninja_log" "$work/final/ninja_log" 2>/dev/null || true
    mv "$work/final" "$target"
    ls "$target"/*.whl
}

# The arm64 Debian 12 root, made once: debootstrap's first stage here, its second
# stage inside the root under qemu.
ROOTFS="$ARM64_CACHE/bookworm-root"
root() {
    binfmt
    if [[ ! -f "$ROOTFS/etc/locopilot-arm64-root" ]]; then
        command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
        mkdir -p "$ARM64_CACHE"
        rm -rf "$ROOTFS.tmp"
        local start=$SECONDS
        say "debootstrap --arch=arm64 bookworm (first stage)"
        debootstrap --foreign --arch=arm64 --variant=minbase \
            --include=python3.11,libpython3.11,python3-pip-whl,binutils,ca-certificates \
            bookworm "$ROOTFS.tmp" "${ARM64_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$ARM64_CACHE/debootstrap.log" 2>&1 ||
            { tail -n 20 "$ARM64_CACHE/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
        say "second stage under qemu-aarch64"
        chroot "$ROOTFS.tmp" /debootstrap/debootstrap --second-stage >>"$ARM64_CACHE/debootstrap.log" 2>&1 ||
            { tail -n 20 "$ARM64_CACHE/debootstrap.log" >&2; say "debootstrap's second stage failed"; exit 1; }
        chroot "$ROOTFS.tmp" python3.11 -c 'import platform; print(platform.machine())' | grep -qx aarch64
        touch "$ROOTFS.tmp/etc/locopilot-arm64-root"
        mv "$ROOTFS.tmp" "$ROOTFS"
        say "root made in $((SECONDS - start)) s"
    fi
    echo "$ROOTFS"
}

# in_root COMMAND...: run COMMAND in the root, in a mount namespace of its own (/proc,
# /dev, a fresh /tmp, this repository at /src, $ARM64_CACHE at /cache: all gone when it
# ends), with this machine's DNS settings and nothing of its environment.
in_root() {
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    mkdir -p "$ROOTFS/src" "$ROOTFS/cache"
    unshare -m bash -c 'set -e; root="$1" repo="$2" cache="$3"; shift 3
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev"
        mount -t tmpfs -o size=2g tmpfs "$root/tmp"
        mount --bind "$repo" "$root/src"
        mount --bind "$cache" "$root/cache"
        exec chroot "$root" env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp LANG=C.UTF-8 "$@"' \
        in_root "$ROOTFS" "$ROOT" "$ARM64_CACHE" "$@"
}

# /opt/venv in the root: the locked runtime dependencies (aarch64 wheels, downloaded
# here with uv.lock's hashes) and PyInstaller's own at uv.lock's versions, made anew
# when those change; then the two wheels built here (the engine and PyInstaller),
# installed anew when either changes.
#   venv [ENGINE_WHEEL PYINSTALLER_WHEEL]
venv() {
    local inputs="$ARM64_CACHE/venv-inputs" key
    # Wheels already downloaded stay (pip download keeps a file it has): pip installs
    # only what the pinned requirements name.
    mkdir -p "$inputs/wheels"
    (cd "$ROOT" && uv export --quiet --frozen --no-dev --no-emit-project --no-emit-package llama-cpp-python \
        --format requirements-txt) >"$inputs/requirements.txt"
    # PyInstaller's dependencies (a dev group, not exported above) at their locked versions.
    python3 -c '
import sys, tomllib
packages = {p["name"]: p for p in tomllib.load(open(sys.argv[1], "rb"))["package"]}
for dep in packages["pyinstaller"]["dependencies"]:
    if "marker" not in dep:
        print(dep["name"] + "==" + packages[dep["name"]]["version"])
' "$ROOT/uv.lock" >"$inputs/pyinstaller-requirements.txt"
    # pip run from Debian's wheel of it (python3-pip-whl), with nothing from the network.
    local pip_wheel
    pip_wheel="$(cd "$ROOTFS" && ls usr/share/python-wheels/pip-*.whl | head -n 1)"
    # --no-compile: byte-compiling under emulation is slow, and PyInstaller compiles what it bundles.
    local pip=(/opt/venv/bin/python "/$pip_wheel/pip" install --quiet --no-index --no-deps --no-compile --disable-pip-version-check
        --find-links /cache/venv-inputs/wheels)
    key="$(cat "$inputs"/*requirements.txt | sha256sum | cut -c1-12)"
    if [[ "$(cat "$ROOTFS/opt/venv/.locopilot-deps" 2>/dev/null)" == "$key" ]]; then
        say "venv's dependencies cached: $ROOTFS/opt/venv"
    else
        # The wheels for the root's Python (CPython 3.11, glibc 2.36, aarch64), fetched
        # here: pip's resolver and downloads under emulation are many times slower.
        local tags=() minor
        for minor in $(seq 17 36); do tags+=(--platform "manylinux_2_${minor}_aarch64"); done
        tags+=(--platform manylinux2014_aarch64 --platform linux_aarch64)
        say "downloading aarch64 wheels"
        local list
        for list in requirements.txt pyinstaller-requirements.txt; do
            uvx --from pip pip download --quiet --only-binary=:all: --no-deps --python-version 3.11 \
                --implementation cp "${tags[@]}" -d "$inputs/wheels" -r "$inputs/$list" >&2
        done
        local start=$SECONDS
        say "installing them into the root's /opt/venv (under qemu)"
        rm -rf "$ROOTFS/opt/venv"
        in_root python3.11 -m venv --without-pip /opt/venv >&2
        # Two runs: pip checks every hash or none, and only the exported list has them.
        in_root "${pip[@]}" -r /cache/venv-inputs/requirements.txt >&2
        in_root "${pip[@]}" -r /cache/venv-inputs/pyinstaller-requirements.txt >&2
        say "venv's dependencies installed in $((SECONDS - start)) s"
        echo "$key" >"$ROOTFS/opt/venv/.locopilot-deps"
    fi
    (($# == 2)) || return 0
    key="$(cat "$1" "$2" | sha256sum | cut -c1-12)"
    if [[ "$(cat "$ROOTFS/opt/venv/.locopilot-wheels" 2>/dev/null)" == "$key" ]]; then
        say "venv's engine and PyInstaller cached"
        return
    fi
    cp "$1" "$2" "$inputs/wheels/"
    in_root "${pip[@]}" --force-reinstall "/cache/venv-inputs/wheels/$(basename "$1")" \
        "/cache/venv-inputs/wheels/$(basename "$2")" >&2
    echo "$key" >"$ROOTFS/opt/venv/.locopilot-wheels"
}

build() {
    local engine_wheel pyinstaller_wheel
    engine_wheel="$(engine)"
    pyinstaller_wheel="$(TARGET_ARCH=aarch64 GLIBC_BASELINE="$BASELINE" "$ROOT/build/pyinstaller_wheel.sh")"
    root >/dev/null
    venv "$engine_wheel" "$pyinstaller_wheel"
    local start=$SECONDS
    say "PyInstaller under qemu-aarch64"
    rm -rf "$ROOT/build/work/aarch64" "$ROOT/build/work/dist-aarch64"
    in_root bash -c 'cd /src && exec python -m PyInstaller --noconfirm --log-level WARN \
        --workpath build/work/aarch64 --distpath build/work/dist-aarch64 build/locopilot.spec' >&2
    mkdir -p "$ROOT/dist"
    mv "$ROOT/build/work/dist-aarch64/locopilot" "$ROOT/dist/locopilot-aarch64"
    say "PyInstaller: $((SECONDS - start)) s; dist/locopilot-aarch64: $(stat -c %s "$ROOT/dist/locopilot-aarch64") bytes"
    # What glibc it needs: the audit's table, at the root's glibc (2.36) as the ceiling.
    "$ROOT/.venv/bin/python" "$ROOT/build/glibc_audit.py" --quiet --baseline 2.36 "$ROOT/dist/locopilot-aarch64" >&2
}

case "${1:-build}" in
    binfmt) binfmt ;;
    root) root ;;
    venv) root >/dev/null && venv ;;
    engine) engine ;;
    build) build ;;
    *) say "build/arm64.sh [build|root|venv|engine|binfmt], not '$1'"; exit 1 ;;
esac
