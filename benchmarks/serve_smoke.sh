#!/usr/bin/env bash
# Smoke test of `megacontext serve` on the embedded models, offline: start, create a session, append, generate
# (whole and streamed), chat, SIGKILL + restart, check the session is exactly as acknowledged, try bad input,
# stop. Exits 0 only when every step did what it should; prints one line per step.
#
#   benchmarks/serve_smoke.sh            # uses `python` from PATH (the venv with the serve extra)
#   PYTHON=.venv/bin/python benchmarks/serve_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TMP=$(mktemp -d)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
export MEGACONTEXT_TOKEN="smoke-$(date +%s)-$RANDOM-token"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s)
FAILED=0
PID=""

cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

step() {  # step NAME CONDITION-RESULT(0/1) [detail]
    if [ "$2" = 0 ]; then echo "PASS  $1"; else echo "FAIL  $1 ${3:-}"; FAILED=1; fi
}

start_server() {
    $PY -m megacontext.cli serve --data-root "$TMP/data" --port "$PORT" --device cpu --max-new-tokens 64 \
        --max-body-bytes 1048576 >>"$TMP/server.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 600); do
        curl -sf "$URL/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

call() {  # call METHOD PATH [JSON] -> status on stdout, body in $TMP/body
    local auth=(-H "Authorization: Bearer $MEGACONTEXT_TOKEN")
    [ "${NOAUTH:-}" = 1 ] && auth=()
    if [ $# -ge 3 ]; then
        curl -s -o "$TMP/body" -w '%{http_code}' -X "$1" "${auth[@]}" -H 'Content-Type: application/json' \
            --data-binary "$3" "$URL$2"
    else
        curl -s -o "$TMP/body" -w '%{http_code}' -X "$1" "${auth[@]}" "$URL$2"
    fi
}

field() {  # field PYTHON-EXPR-ON-d -> prints it (d = the last JSON body)
    $PY -c "import json,sys; d=json.load(open('$TMP/body')); print($1)" 2>/dev/null
}

one_line_error() {  # the last body is {"error": {"message": <one line>, ...}} and holds no traceback
    $PY -c "
import json,sys
raw=open('$TMP/body').read(); d=json.loads(raw); m=d['error']['message']
sys.exit(0 if m and '\n' not in m and 'Traceback' not in raw else 1)" 2>/dev/null
}

# ---------------------------------------------------------------------------- up, create, append, generate
start_server; step "server starts on the embedded models ($(($(date +%s) - T0))s)" $?
s=$(call POST /v1/sessions '{"id": "smoke", "config": {"focus": "lexical", "wc": {"w_max": 512}}}')
[ "$s" = 201 ] && [ "$(field 'd["config"]["focus"]')" = lexical ]; step "create session (201)" $? "$s"
for i in 1 2 3; do
    s=$(call POST /v1/sessions/smoke/append "{\"text\": \"User: note $i: the locker code is 47$i$i.\\nAssistant: noted.\\n\"}")
    [ "$s" = 200 ] || break
done
[ "$s" = 200 ] && [ "$(field 'd["num_tokens"] > 30')" = True ]; step "append 3 turns" $? "$s"
s=$(call POST /v1/sessions/smoke/generate '{"prompt": "User: what is the locker code?\nAssistant:", "max_new_tokens": 16}')
[ "$s" = 200 ] && [ "$(field 'd["generated_tokens"] >= 1')" = True ]; step "generate" $? "$s"
curl -sN -X POST -H "Authorization: Bearer $MEGACONTEXT_TOKEN" -H 'Content-Type: application/json' \
    --data-binary '{"prompt": "User: again?\nAssistant:", "max_new_tokens": 8, "stream": true}' \
    "$URL/v1/sessions/smoke/generate" >"$TMP/stream"
grep -q '^event: token' "$TMP/stream" && grep -q '^event: done' "$TMP/stream"; step "generate streamed (SSE)" $?
s=$(call POST /v1/chat/completions '{"user": "smoke", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}')
[ "$s" = 200 ] && [ "$(field 'd["object"]')" = chat.completion ]; step "chat completion" $? "$s"
s=$(call GET "/v1/sessions/smoke/text?tokens=65536"); cp "$TMP/body" "$TMP/before.json"
BEFORE=$(field 'd["end"]')
[ "$s" = 200 ] && [ -n "$BEFORE" ]; step "read the transcript ($BEFORE tokens)" $? "$s"

# ---------------------------------------------------------------------------- SIGKILL and restart
kill -9 "$PID"; wait "$PID" 2>/dev/null; PID=""
start_server; step "restart after SIGKILL" $?
s=$(call GET /v1/sessions/smoke)
[ "$s" = 200 ] && [ "$(field 'd["num_tokens"]')" = "$BEFORE" ]; step "session holds every acknowledged token ($BEFORE)" $? "$s"
s=$(call GET "/v1/sessions/smoke/text?tokens=65536")
[ "$s" = 200 ] && cmp -s "$TMP/body" "$TMP/before.json"; step "transcript identical after the restart" $? "$s"
s=$(call POST /v1/sessions/smoke/append '{"text": "User: still here.\n"}')
[ "$s" = 200 ]; step "append after the restart" $? "$s"

# ---------------------------------------------------------------------------- bad input
s=$(NOAUTH=1 call GET /v1/sessions); [ "$s" = 401 ] && one_line_error; step "no token -> 401" $? "$s"
s=$(call POST /v1/sessions '{"id": "../escape"}'); [ "$s" = 400 ] && one_line_error; step "traversal id -> 400" $? "$s"
s=$(call GET /v1/sessions/..%2f..%2fetc); [ "$s" = 400 ] || [ "$s" = 404 ]; step "traversal path -> 4xx" $? "$s"
$PY -c "import json; print(json.dumps({'text': 'x' * 2_000_000}))" >"$TMP/big.json"
s=$(call POST /v1/sessions/smoke/append "@$TMP/big.json"); [ "$s" = 413 ] && one_line_error; step "oversized body -> 413" $? "$s"
s=$(call POST /v1/sessions/smoke/generate '{"max_new_tokens": 100000}'); [ "$s" = 400 ] && one_line_error
step "max_new_tokens over the limit -> 400" $? "$s"
s=$(call POST /v1/sessions/smoke/append '{not json'); [ "$s" = 400 ] && one_line_error; step "malformed JSON -> 400" $? "$s"
s=$(call POST /v1/sessions/nobody/append '{"text": "x"}'); [ "$s" = 404 ] && one_line_error; step "unknown session -> 404" $? "$s"
s=$(call GET /v1/sessions/smoke); [ "$s" = 200 ]; step "server still healthy" $? "$s"

# ---------------------------------------------------------------------------- stop
kill -TERM "$PID"; wait "$PID" 2>/dev/null; PID=""
grep -q "Application shutdown complete" "$TMP/server.log"; step "clean shutdown on SIGTERM" $?
! grep -q "Traceback" "$TMP/server.log"; step "no traceback in the server log" $?
echo "serve smoke: $([ $FAILED = 0 ] && echo OK || echo FAILED) in $(($(date +%s) - T0))s"
[ $FAILED = 0 ] || { echo "--- server log (tail) ---"; tail -40 "$TMP/server.log"; }
exit $FAILED
