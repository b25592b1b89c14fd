#!/usr/bin/env bash
# PyInstaller, at the version uv.lock pins, built from its sdist with
# build/pyinstaller-bootloader.patch applied to its bootloader (the sdist holds no Linux
# bootloader, so building the wheel compiles one: about 15 CPU seconds).
#
#   build/pyinstaller_wheel.sh     prints the wheel's path, building it first if the cache lacks it
#
# Why: the one-file bootloader unpacks into the first of $TMPDIR, $TEMP, $TMP, /tmp,
# /var/tmp, /usr/tmp where it can create a folder, and then dies with "libz.so.1:
# failed to map segment from shared object" (exit 127) when that file system is
# mounted noexec, as /tmp is on many hardened servers. The patch skips a noexec
# candidate, tries ~/.cache/locopilot last, and if nothing is left says what to do.
# PyInstaller's own remedy, the runtime_tmpdir option, hard-codes one path into the
# executable. The patch also gives the unpacking 1 MiB write and 256 KiB read buffers
# (stdio's default made it one write() per 4 KiB, 25,000 for the bundle) and checks the
# last write at fclose(). And it keeps what it unpacked for later starts, which check it and
# use it instead of unpacking again (bootloader/src/pyi_locopilot_cache.c in the patch; the
# spec gives each build its key). The bootloader built here links against this machine's glibc, which the
# bundle needs anyway (its Python comes from here too).
#
# GLIBC_BASELINE (e.g. 2.28): compile the bootloader with build/zig_toolchain.sh's
# zig cc for that glibc, with PyInstaller's own zlib linked in (PYI_STATIC_ZLIB=1; the
# system libz is this machine's). Unset: this machine's compiler and libz.
#
# TARGET_ARCH=aarch64 (with GLIBC_BASELINE; build/arm64.sh): the bootloader for Linux
# aarch64 (PyInstaller/bootloader/Linux-64bit-arm), cross-compiled with Zig and
# stripped with Debian's binutils-aarch64-linux-gnu.
#
# Cached like build/engine_wheel.sh's wheel, in $BUILD_ENGINE_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/locopilot/engine), under a name made of the version, the
# sdist's hash and the patch's hash. Needs a C compiler, zlib headers, uv and python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PATCH="$ROOT/build/pyinstaller-bootloader.patch"
say() { echo "pyinstaller_wheel: $*" >&2; }

read -r VERSION SDIST_SHA < <(python3 "$ROOT/build/locked_sdist.py" "$ROOT/uv.lock" pyinstaller)

CACHE="${BUILD_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/engine}"
KEY="$( (echo "$VERSION $SDIST_SHA"; cat "$PATCH") | sha256sum | cut -c1-12)"
BASELINE="${GLIBC_BASELINE:-}"
ARCH="${TARGET_ARCH:-x86_64}"
case "$ARCH" in
    x86_64) ;;
    aarch64)
        [[ -n "$BASELINE" ]] || { say "TARGET_ARCH=aarch64 needs GLIBC_BASELINE (a Zig cross build)"; exit 1; }
        export PYI_PLATFORM=Linux-64bit-arm PYINSTALLER_BOOTLOADER_WAF_ARGS=--target-arch=64bit-arm
        # waf strips the bootloader; this machine's strip cannot read aarch64 files.
        export STRIP="${STRIP:-aarch64-linux-gnu-strip}"
        command -v "$STRIP" >/dev/null || { say "$STRIP is missing (apt-get install binutils-aarch64-linux-gnu)"; exit 1; }
        ;;
    *) say "TARGET_ARCH '$ARCH' is not x86_64 or aarch64"; exit 1 ;;
esac
SUFFIX=""
[[ "$ARCH" == x86_64 ]] || SUFFIX="-$ARCH"
TARGET="$CACHE/pyinstaller-$VERSION-$KEY$SUFFIX${BASELINE:+-glibc$BASELINE}"
if compgen -G "$TARGET/*.whl" >/dev/null; then
    say "cached: $TARGET"
    ls "$TARGET"/*.whl
    exit 0
fi

if [[ -n "$BASELINE" ]]; then
    TOOLCHAIN="$(TARGET_ARCH="$ARCH" "$ROOT/build/zig_toolchain.sh" "$BASELINE")"
    export CC="$TOOLCHAIN/cc" PYI_STATIC_ZLIB=1
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build-pyinstaller-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
sdist="$CACHE/pyinstaller-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]] || ! echo "$SDIST_SHA  $sdist" | sha256sum --quiet -c; then
    uvx --from pip pip download --quiet --no-binary :all: --no-deps "pyinstaller==$VERSION" -d "$WORK/sdist" >&2
    echo "$SDIST_SHA  $WORK/sdist/pyinstaller-$VERSION.tar.gz" | sha256sum --quiet -c ||
        { say "the downloaded sdist does not match uv.lock's hash"; exit 1; }
    mv "$WORK/sdist/pyinstaller-$VERSION.tar.gz" "$sdist"
fi
tar -xzf "$sdist" -C "$WORK"
SRC="$WORK/pyinstaller-$VERSION"
patch -d "$SRC" -p1 --forward --quiet <"$PATCH" >&2
(cd "$WORK" && uv build --no-config --wheel --out-dir "$WORK/dist" "$SRC") >&2
wheel="$(ls "$WORK"/dist/*.whl)"
python3 - "$wheel" <<'EOF' || { say "the wheel has no Linux bootloader"; exit 1; }
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not any(re.fullmatch(r"PyInstaller/bootloader/Linux-[^/]+/run", n) for n in names))
EOF
mkdir -p "$WORK/final"
mv "$wheel" "$WORK/final/"
mv "$WORK/final" "$TARGET"
ls "$TARGET"/*.whl
