#!/usr/bin/env bash
# CPython 3.11 for a glibc baseline: built with build/zig_toolchain.sh's zig cc for that
# glibc (default 2.28), so libpython and every lib-dynload module need nothing newer.
# The one-file binary carries the Python that runs PyInstaller; pyenv's and Debian's are
# built against this machine's glibc 2.36 (libpython needed GLIBC_2.35).
#
#   build/python_baseline.sh [BASELINE]   prints the interpreter's path, building it first
#                                          if the cache lacks it (about 15 CPU minutes)
#
# Sources are Debian 12's source packages (apt-get source from the Debian mirror this
# machine uses, through a private apt configuration; hashes pinned below): CPython
# 3.11.2 with Debian's security and crash fixes (its patches from shutdown-deadlock.diff
# on: the ones before change Debian's install layout), OpenSSL 3.0 (shared, beside
# libpython: libssl/libcrypto are one copy for _ssl and _hashlib), and zlib, bzip2,
# xz, libffi and SQLite linked statically into their modules. Not built: readline,
# curses, dbm, tkinter, uuid's libuuid (the bundle uses none of them; uuid falls back
# to Python code).
#
# Kept in $BUILD_BASELINE_CACHE (default ~/.cache/locopilot/baseline)/python-3.11.2-glibcBASELINE
# (its paths are compiled in: it stays there); delete it to build anew. Steps done are
# remembered in the work folder beside it, so an interrupted build goes on where it stopped. Needs uv, make, perl and tclsh
# (OpenSSL's and SQLite's build scripts), dpkg-source. Progress and build logs go to
# stderr and to the work folder's *.log; the path goes to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASELINE="${1:-2.28}"
CACHE="${BUILD_BASELINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/locopilot/baseline}"
TARGET="$CACHE/python-3.11.2-glibc$BASELINE"
say() { echo "python_baseline: $*" >&2; }

if [[ -x "$TARGET/bin/python3.11" ]]; then
    say "cached: $TARGET"
    echo "$TARGET/bin/python3.11"
    exit 0
fi

# Debian 12 (bookworm) source packages: file and sha256.
SOURCES=(
    "python3.11 python3.11_3.11.2.orig.tar.gz 2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849"
    "python3.11 python3.11_3.11.2-6+deb12u8.debian.tar.xz ece2d63c70ac0b7a401fbe6b51b0103be997c294a01a3865549be1862794ba97"
    "openssl openssl_3.0.20.orig.tar.gz c80a01dfc70ece4dc21168932c37739042d404d46ccc81a5986dd75314ecda6f"
    "zlib zlib_1.2.13.dfsg.orig.tar.bz2 71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1"
    "bzip2 bzip2_1.0.8.orig.tar.gz ab5a03176ee106d3f0fa90e381da478ddae405918153cca248e682cd0c4a2269"
    "xz-utils xz-utils_5.4.1.orig.tar.xz 5d9827aa1875b21c288f78864bb26d2650b436ea8d2cad364e4921eb6266a5a5"
    "libffi libffi_3.4.4.orig.tar.gz d66c56ad259a82cf2a9dfc408b32bf5da52371500b84745f7fb8b645712df676"
    "sqlite3 sqlite3_3.40.1.orig.tar.xz aaa776260ab4dc976db34aa7891819484c8676b5b2783123ebc6301e2ca5d655"
)
SRC="$CACHE/src"
mkdir -p "$SRC"
fetch() { # package file sha256
    local package="$1" file="$2" sha="$3"
    if [[ -f "$SRC/$file" ]] && echo "$sha  $SRC/$file" | sha256sum --quiet -c 2>/dev/null; then
        return
    fi
    local apt="$CACHE/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache"
    cat >"$apt/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
EOF
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    compgen -G "$apt/lists/*Sources*" >/dev/null || apt-get "${opts[@]}" update >&2
    (cd "$SRC" && apt-get "${opts[@]}" source --download-only "$package" >&2)
    echo "$sha  $SRC/$file" | sha256sum --quiet -c || { say "$file does not match its pinned hash"; exit 1; }
}
for entry in "${SOURCES[@]}"; do
    # shellcheck disable=SC2086
    fetch $entry
done

TOOLCHAIN="$("$ROOT/build/zig_toolchain.sh" "$BASELINE")"
export CC="$TOOLCHAIN/cc" CXX="$TOOLCHAIN/c++" AR="$TOOLCHAIN/ar" RANLIB="$TOOLCHAIN/ranlib"
JOBS="${BUILD_JOBS:-$(nproc)}"

WORK="$CACHE/build-python-glibc$BASELINE"
DEPS="$WORK/deps"
mkdir -p "$WORK" "$DEPS"
export PKG_CONFIG_LIBDIR="$DEPS/lib/pkgconfig" PKG_CONFIG_PATH=""
STATIC_CFLAGS="-O2 -fPIC"

# step NAME COMMAND...: run once (a stamp file marks it done), output in $WORK/NAME.log.
step() {
    local name="$1"
    shift
    [[ -f "$WORK/$name.done" ]] && return
    say "$name"
    local start=$SECONDS
    # In the background and waited for: errexit is off for a command tested by `if`.
    ("$@") >"$WORK/$name.log" 2>&1 &
    if ! wait $!; then
        tail -n 40 "$WORK/$name.log" >&2
        say "$name failed (log: $WORK/$name.log)"
        exit 1
    fi
    say "$name: $((SECONDS - start)) s"
    touch "$WORK/$name.done"
}
unpack() { # archive folder
    rm -rf "$WORK/$2"
    mkdir -p "$WORK/$2"
    tar -xf "$SRC/$1" -C "$WORK/$2" --strip-components=1
}

build_zlib() {
    unpack zlib_1.2.13.dfsg.orig.tar.bz2 zlib
    cd "$WORK/zlib"
    CFLAGS="$STATIC_CFLAGS" ./configure --static --prefix="$DEPS"
    make -j"$JOBS" install
}
build_bzip2() {
    unpack bzip2_1.0.8.orig.tar.gz bzip2
    cd "$WORK/bzip2"
    make -j"$JOBS" libbz2.a CC="$CC" AR="$AR" RANLIB="$RANLIB" CFLAGS="$STATIC_CFLAGS -D_FILE_OFFSET_BITS=64"
    install -D -m644 libbz2.a "$DEPS/lib/libbz2.a"
    install -D -m644 bzlib.h "$DEPS/include/bzlib.h"
    mkdir -p "$DEPS/lib/pkgconfig"
    printf 'prefix=%s\nName: bzip2\nDescription: bzip2\nVersion: 1.0.8\nLibs: -L${prefix}/lib -lbz2\nCflags: -I${prefix}/include\n' \
        "$DEPS" >"$DEPS/lib/pkgconfig/bzip2.pc"
}
build_xz() {
    unpack xz-utils_5.4.1.orig.tar.xz xz
    cd "$WORK/xz"
    CFLAGS="$STATIC_CFLAGS" ./configure --prefix="$DEPS" --disable-shared --enable-static --with-pic \
        --disable-xz --disable-xzdec --disable-lzmadec --disable-lzmainfo --disable-scripts --disable-doc --disable-nls
    make -j"$JOBS" -C src/liblzma install
}
build_libffi() {
    unpack libffi_3.4.4.orig.tar.gz libffi
    cd "$WORK/libffi"
    # libffi 3.4.4's tramp.c calls a function it declares only later (fixed in 3.4.5),
    # an error in clang 16 and later.
    CFLAGS="$STATIC_CFLAGS -Wno-error=implicit-function-declaration" ./configure --prefix="$DEPS" \
        --libdir="$DEPS/lib" --disable-shared --enable-static \
        --with-pic --disable-docs --disable-multi-os-directory
    make -j"$JOBS" install
}
build_sqlite() {
    unpack sqlite3_3.40.1.orig.tar.xz sqlite
    cd "$WORK/sqlite"
    CFLAGS="$STATIC_CFLAGS -DSQLITE_ENABLE_FTS5 -DSQLITE_ENABLE_JSON1 -DSQLITE_ENABLE_RTREE" ./configure --prefix="$DEPS" \
        --disable-shared --enable-static --with-pic --disable-tcl --disable-readline --disable-editline
    make -j"$JOBS" libsqlite3.la
    install -D -m644 .libs/libsqlite3.a "$DEPS/lib/libsqlite3.a"
    install -D -m644 sqlite3.h "$DEPS/include/sqlite3.h"
    install -D -m644 sqlite3ext.h "$DEPS/include/sqlite3ext.h"
    install -D -m644 sqlite3.pc "$DEPS/lib/pkgconfig/sqlite3.pc"
}
build_openssl() {
    unpack openssl_3.0.20.orig.tar.gz openssl
    cd "$WORK/openssl"
    # Shared, installed beside libpython; no-module: the legacy provider built in
    # instead of loaded from a path fixed at build time.
    ./Configure linux-x86_64 --prefix="$DEPS" --libdir=lib --openssldir=/etc/ssl shared no-module no-tests \
        -Wl,-rpath,"$TARGET/lib"
    make -j"$JOBS" build_libs
    make install_dev
}
build_python() {
    unpack python3.11_3.11.2.orig.tar.gz python
    cd "$WORK/python"
    mkdir debian-patches
    tar -xJf "$SRC/python3.11_3.11.2-6+deb12u8.debian.tar.xz" -C debian-patches
    local series take=0
    while read -r series; do
        [[ "$series" == shutdown-deadlock.diff ]] && take=1
        [[ $take == 1 && -n "$series" && "$series" != \#* ]] || continue
        patch -p1 --forward --no-backup-if-mismatch <"debian-patches/debian/patches/$series"
    done <debian-patches/debian/patches/series
    ((take)) || { echo "shutdown-deadlock.diff is not in Debian's series any more"; exit 1; }
    # One of those fixes makes pyexpat.c include an internal header, which Debian's own
    # module build (a patch left out above) allows with Py_BUILD_CORE_MODULE; upstream
    # 3.11 defines it in the file.
    if grep -q pycore_ceval.h Modules/pyexpat.c && ! grep -q Py_BUILD_CORE_MODULE Modules/pyexpat.c; then
        sed -i '1i #ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif' Modules/pyexpat.c
    fi
    mkdir -p "$TARGET/lib" # configure checks that the OpenSSL rpath exists
    ./configure --prefix="$TARGET" --enable-shared --without-ensurepip --with-openssl="$DEPS" \
        --with-openssl-rpath="$TARGET/lib" --with-system-ffi \
        CPPFLAGS="-I$DEPS/include" LDFLAGS="-L$DEPS/lib -Wl,-rpath,$TARGET/lib" \
        LIBFFI_CFLAGS="-I$DEPS/include" LIBFFI_LIBS="$DEPS/lib/libffi.a"
    # Zig makes -Wdate-time an error (getbuildinfo.c stamps the build's date), and
    # refuses to link libpython3.so, the stable ABI's stub made of libpython3.11.so
    # alone and no object; nothing here needs it (PY3LIBRARY empty: not built).
    local vars=(EXTRA_CFLAGS=-Wno-error=date-time PY3LIBRARY=)
    # setup.py (which builds most modules in 3.11) adds this machine's /usr/include/<multiarch>
    # and /usr/local: their glibc 2.36 headers break Zig's. As a cross build
    # (_PYTHON_HOST_PLATFORM) it leaves /usr/local out; the multiarch folders and the
    # ones it would read from the compiler (this machine's: Zig answers for the host
    # when asked about stdin) go too. Zig's compiler finds its own headers.
    sed -i -E 's/^    def (add_multiarch_paths|add_cross_compiling_paths)\(self\):$/&\n        return/' setup.py
    [[ "$(grep -A1 -E 'def (add_multiarch_paths|add_cross_compiling_paths)' setup.py | grep -c return)" == 2 ]]
    export _PYTHON_HOST_PLATFORM=linux-x86_64
    make -j"$JOBS" "${vars[@]}"
    make install DESTDIR="$WORK/destdir" "${vars[@]}"
}

step zlib build_zlib
step bzip2 build_bzip2
step xz build_xz
step libffi build_libffi
step sqlite build_sqlite
step openssl build_openssl
step python build_python

# DESTDIR held the install under $TARGET's path; libssl/libcrypto join libpython.
rm -rf "$TARGET.tmp"
mv "$WORK/destdir$TARGET" "$TARGET.tmp"
cp -a "$DEPS"/lib/libssl.so* "$DEPS"/lib/libcrypto.so* "$TARGET.tmp/lib/"
rm -rf "$TARGET"
mv "$TARGET.tmp" "$TARGET"
"$TARGET/bin/python3.11" - <<'EOF' >&2 || { say "the built Python lacks modules the bundle needs"; exit 1; }
import ctypes, ssl, hashlib, sqlite3, zlib, bz2, lzma, _decimal, _multiprocessing, _posixshmem
print("python_baseline:", ssl.OPENSSL_VERSION, "sqlite", sqlite3.sqlite_version, "zlib", zlib.ZLIB_VERSION)
EOF
rm -rf "$WORK"
echo "$TARGET/bin/python3.11"
