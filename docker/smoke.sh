#!/usr/bin/env bash
# Smoke test of the image, with buildah alone (no docker daemon, no registry needed):
# build it, run it against a fake vLLM on this host, stream one chat completion through it,
# then stop it with SIGTERM; the same with GATEWAY_SERVER=uvicorn, and with GATEWAY_WORKERS=2.
# Prints one PASS/FAIL line per check; exits 1 if any failed.
#
#   docker/smoke.sh                                # local Debian base (built once if missing)
#   BASE=python:3.11-slim docker/smoke.sh          # where a registry is reachable
#
# Environment: BASE, IMAGE, PYTHON (a Python with the repo's deps, default .venv/bin/python,
# made by `make install` if missing), PIP_CA (CA bundle handed to the build's pip as a secret;
# default the host's $PIP_CERT or system bundle, empty for none), NO_CACHE=1 (cold build).
# Needs root, buildah and curl. With --isolation chroot the container shares the host's
# network, so the gateway inside reaches the fake on 127.0.0.1 and curl reaches the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE=localhost/vllm-gateway-base:bookworm
BASE=${BASE:-$LOCAL_BASE}
IMAGE=${IMAGE:-localhost/vllm-gateway:dev}
PYTHON=${PYTHON:-.venv/bin/python}
PIP_CA=${PIP_CA-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
RUN=(buildah run --isolation chroot)

tmp=$(mktemp -d /tmp/vllm-gateway-smoke.XXXXXX)
fake_pid=
gateway_pid=
uvicorn_pid=
workers_pid=
ctr=
hc_ctr=
containers=()
failures=0

pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# Every process of a tree we started, leaves first, by pid: nothing is ended by name.
tree() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
    echo "$1"
}
stop_tree() {
    local pids
    pids=$(tree "$1")
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}
cleanup() {
    if [[ -n $gateway_pid ]]; then stop_tree "$gateway_pid"; fi
    if [[ -n $uvicorn_pid ]]; then stop_tree "$uvicorn_pid"; fi
    if [[ -n $workers_pid ]]; then stop_tree "$workers_pid"; fi
    if [[ -n $fake_pid ]]; then stop_tree "$fake_pid"; fi
    local ctr
    for ctr in "${containers[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() {  # wait_for SECONDS CMD...: poll CMD every 0.2 s
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# sigterm_gateway RUN_PID SECONDS: SIGTERM the vllm-gateway process (with several workers,
# the supervisor) under the `buildah run` RUN_PID, as a container runtime's stop would, and
# wait for the run to end. On failure, says why in $stop_problem.
stop_problem=
sigterm_gateway() {
    local pid target=
    for pid in $(tree "$1"); do
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == vllm-gateway ]]; then target=$pid; fi
    done
    if [[ -z $target ]]; then
        stop_problem="process not found under buildah run ($1)"
        return 1
    fi
    kill -TERM "$target"
    run_gone() { ! kill -0 "$1" 2>/dev/null; }
    if ! wait_for "$2" run_gone "$1"; then
        stop_problem="still running $2 s after SIGTERM"
        return 1
    fi
}

# --- prerequisites ---------------------------------------------------------------------------
if [[ $BASE == "$LOCAL_BASE" ]]; then
    docker/build-local-base.sh
fi
if ! "$PYTHON" -c 'import orjson, uvloop' 2>/dev/null; then
    make install
fi

# --- build -----------------------------------------------------------------------------------
build=(buildah bud --isolation chroot --format docker --layers --force-rm
       --build-arg "BASE=$BASE" -f docker/Dockerfile -t "$IMAGE")
[[ -n $PIP_CA ]] && build+=(--secret "id=pip_ca,src=$PIP_CA")
[[ ${NO_CACHE:-} == 1 ]] && build+=(--no-cache)
echo "build: ${build[*]} ."
previous=$(buildah images --quiet --no-trunc "$IMAGE" 2>/dev/null || true)
start=$(date +%s.%N)
if "${build[@]}" . >"$tmp/build.log" 2>&1; then
    # The image the tag pointed at before is untagged now: drop it, not to pile them up.
    # (--layers keeps a build cache besides; `buildah rmi --prune` clears it.)
    if [[ -n $previous && $previous != "$(buildah images --quiet --no-trunc "$IMAGE")" ]]; then
        buildah rmi "$previous" >/dev/null 2>&1 || true
    fi
    seconds=$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$start" "$(date +%s.%N)")
    size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)
    pass "image builds: $IMAGE from $BASE in ${seconds}s, $size"
else
    tail -n 40 "$tmp/build.log"
    fail "image builds"
    exit 1
fi

# --- image config ----------------------------------------------------------------------------
buildah inspect --type image "$IMAGE" >"$tmp/inspect.json"
"$PYTHON" - "$tmp/inspect.json" >"$tmp/config.txt" <<'EOF'
import json, sys
image = json.load(open(sys.argv[1]))
oci, docker = image["OCIv1"]["config"], image["Docker"]["config"]
print("user", oci.get("User", ""))
print("entrypoint", json.dumps(oci.get("Entrypoint")))
print("stopsignal", oci.get("StopSignal", ""))
print("port", " ".join(oci.get("ExposedPorts", {})))
print("healthcheck", json.dumps((docker.get("Healthcheck") or {}).get("Test")))
EOF
config() { sed -n "s/^$1 //p" "$tmp/config.txt"; }
expect_config() {  # expect_config KEY VALUE: that line of the image's config, exactly
    local got
    got=$(config "$1")
    if [[ $got == "$2" ]]; then pass "image $1: $2"; else fail "image $1: '$got', want '$2'"; fi
}
expect_config user 10001:10001
expect_config entrypoint '["vllm-gateway"]'
expect_config stopsignal SIGTERM
expect_config port 8080/tcp
# The OCI format has no HEALTHCHECK: buildah keeps it only with --format docker.
if [[ $(config healthcheck) == '["CMD", "python3", '* ]]; then
    pass "image healthcheck: python3 urllib on /health"
else
    fail "image healthcheck: '$(config healthcheck)'"
fi

new_container() {  # new_container VAR: not run in $(...), so cleanup sees it in $containers
    local id
    id=$(buildah from --pull=never "$IMAGE")
    containers+=("$id")
    printf -v "$1" %s "$id"
}

# --- the command -----------------------------------------------------------------------------
new_container ctr
if "${RUN[@]}" "$ctr" -- vllm-gateway --help >"$tmp/help.txt" 2>&1 \
    && grep -q GATEWAY_BACKENDS "$tmp/help.txt"; then
    pass "vllm-gateway --help in the container lists GATEWAY_BACKENDS"
else
    fail "vllm-gateway --help: $(head -c 500 "$tmp/help.txt")"
fi
uid=$("${RUN[@]}" "$ctr" -- python3 -c 'import os; print(os.getuid())' 2>&1 || true)
if [[ $uid == 10001 ]]; then pass "process uid in the container: 10001"; else fail "process uid: $uid"; fi

# --- serve -----------------------------------------------------------------------------------
"$PYTHON" bench/fake_vllm.py --port 0 --model tiny-a >"$tmp/fake.log" 2>&1 &
fake_pid=$!
if wait_for 20 grep -q 'listening on' "$tmp/fake.log"; then
    backend=$(sed -n 's/^fake_vllm listening on //p' "$tmp/fake.log")
    pass "fake vLLM up at $backend"
else
    fail "fake vLLM did not start: $(cat "$tmp/fake.log")"
    exit 1
fi

port=$(free_port)
gateway=http://127.0.0.1:$port
"${RUN[@]}" --env "GATEWAY_BACKENDS=$backend" --env "GATEWAY_PORT=$port" \
    --env GATEWAY_HOST=127.0.0.1 --env GATEWAY_HEALTH_INTERVAL_S=1 \
    "$ctr" -- vllm-gateway >"$tmp/gateway.log" 2>&1 &
gateway_pid=$!

ready() { curl -sf -o /dev/null "$gateway/ready"; }
if wait_for 30 ready; then
    pass "container gateway ready on $gateway"
else
    fail "container gateway not ready within 30 s; log:"
    tail -n 30 "$tmp/gateway.log"
    exit 1
fi

new_container hc_ctr
mapfile -t healthcheck < <("$PYTHON" -c \
    'import json, sys; print("\n".join(json.loads(sys.argv[1])[1:]))' \
    "$(config healthcheck)")
if "${RUN[@]}" --env "GATEWAY_PORT=$port" "$hc_ctr" -- "${healthcheck[@]}" >"$tmp/hc.txt" 2>&1; then
    pass "HEALTHCHECK command succeeds in the image"
else
    fail "HEALTHCHECK command: $(tail -n 3 "$tmp/hc.txt")"
fi

if curl -sf "$gateway/v1/models" >"$tmp/models.json" && grep -q '"id":"tiny-a"' "$tmp/models.json"; then
    pass "GET /v1/models lists tiny-a"
else
    fail "GET /v1/models: $(head -c 300 "$tmp/models.json")"
fi

chat='{"model":"tiny-a","stream":true,"messages":[{"role":"user","content":"hi"}]}'
stream() {
    curl -sfN --max-time 30 "$1/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "$chat"
}
stream "$gateway" >"$tmp/via-gateway.sse" || true
stream "$backend" >"$tmp/direct.sse" || true
chunks=$(grep -c '"chat.completion.chunk"' "$tmp/via-gateway.sse" || true)
# Byte for byte the fake's own stream, but for its per-second `created` stamp.
strip_created() { sed 's/"created":[0-9]*/"created":0/' "$1"; }
if [[ $(tail -n 2 "$tmp/via-gateway.sse") == "data: [DONE]" ]] && ((chunks > 0)) \
    && cmp -s <(strip_created "$tmp/via-gateway.sse") <(strip_created "$tmp/direct.sse"); then
    pass "streamed chat completion: $chunks chunks and [DONE], same bytes as the backend's"
else
    fail "streamed chat completion ($chunks chunks): $(head -c 300 "$tmp/via-gateway.sse")"
fi

# --- stop ------------------------------------------------------------------------------------
if sigterm_gateway "$gateway_pid" 15; then
    pass "gateway exits on SIGTERM"
    gateway_pid=
else
    fail "gateway: $stop_problem"
fi

# --- the second server -----------------------------------------------------------------------
# One variable switches the image to uvicorn: its log names the server, its process has
# uvicorn's C parser (httptools) loaded, and a stream passes as under hypercorn.
port=$(free_port)
gateway=http://127.0.0.1:$port
"${RUN[@]}" --env "GATEWAY_BACKENDS=$backend" --env "GATEWAY_PORT=$port" \
    --env GATEWAY_HOST=127.0.0.1 --env GATEWAY_HEALTH_INTERVAL_S=1 --env GATEWAY_SERVER=uvicorn \
    "$ctr" -- vllm-gateway >"$tmp/uvicorn.log" 2>&1 &
uvicorn_pid=$!
if wait_for 30 ready; then
    served_by=
    for pid in $(tree "$uvicorn_pid"); do
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == vllm-gateway ]] \
            && grep -q httptools "/proc/$pid/maps" 2>/dev/null; then served_by=$pid; fi
    done
    stream "$gateway" >"$tmp/via-uvicorn.sse" || true
    if grep -q ', server uvicorn$' "$tmp/uvicorn.log" && [[ -n $served_by ]] \
        && cmp -s <(strip_created "$tmp/via-uvicorn.sse") <(strip_created "$tmp/direct.sse"); then
        pass "GATEWAY_SERVER=uvicorn: served by uvicorn (httptools loaded in pid $served_by), same stream"
    else
        fail "GATEWAY_SERVER=uvicorn: log '$(grep -o 'server [a-z]*$' "$tmp/uvicorn.log")'," \
            "httptools pid '$served_by', stream $(head -c 200 "$tmp/via-uvicorn.sse")"
    fi
    if sigterm_gateway "$uvicorn_pid" 15; then
        pass "GATEWAY_SERVER=uvicorn: exits on SIGTERM"
        uvicorn_pid=
    else
        fail "GATEWAY_SERVER=uvicorn: $stop_problem"
    fi
else
    fail "GATEWAY_SERVER=uvicorn: not ready within 30 s; log:"
    tail -n 30 "$tmp/uvicorn.log"
fi

# --- several workers -------------------------------------------------------------------------
port=$(free_port)
gateway=http://127.0.0.1:$port
"${RUN[@]}" --env "GATEWAY_BACKENDS=$backend" --env "GATEWAY_PORT=$port" \
    --env GATEWAY_HOST=127.0.0.1 --env GATEWAY_HEALTH_INTERVAL_S=1 --env GATEWAY_WORKERS=2 \
    "$ctr" -- vllm-gateway >"$tmp/workers.log" 2>&1 &
workers_pid=$!
# Each worker answers /ready on its own once its first health pass is in; the kernel picks
# the worker per connection, so wait until a run of fresh connections all find one ready.
all_ready() { for _ in 1 2 3 4 5 6 7 8; do ready || return 1; done; }
if wait_for 30 all_ready; then
    # Each worker stamps X-Request-Id with a prefix of its own; one connection per request.
    for _ in $(seq 32); do
        curl -sf -o /dev/null -D - "$gateway/v1/chat/completions" \
            -H 'Content-Type: application/json' -d "$chat" |
            sed -n 's/^x-request-id: \(gw-[0-9a-f]*\)-.*/\1/p'
    done | sort -u >"$tmp/prefixes.txt"
    if [[ $(wc -l <"$tmp/prefixes.txt") == 2 ]]; then
        pass "GATEWAY_WORKERS=2: two worker processes answered 32 connections"
    else
        fail "GATEWAY_WORKERS=2: request-id prefixes seen: $(tr '\n' ' ' <"$tmp/prefixes.txt")"
    fi
    if sigterm_gateway "$workers_pid" 20; then
        pass "GATEWAY_WORKERS=2: supervisor and workers exit on SIGTERM"
        workers_pid=
    else
        fail "GATEWAY_WORKERS=2: $stop_problem"
    fi
else
    fail "GATEWAY_WORKERS=2: not ready within 30 s; log:"
    tail -n 30 "$tmp/workers.log"
fi

if ((failures)); then
    echo "smoke: $failures check(s) failed; gateway log:"
    tail -n 20 "$tmp/gateway.log"
    exit 1
fi
echo "smoke: all checks passed"
