#!/bin/bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx-supervisor: PID 1 of the nginx container                           │
# └──────────────────────────────────────────────────────────────────────────┘
# Started by the entrypoint (settings validated and rendered, certificate installed),
# it runs nginx as its child and, once a second (UPSTREAM_WATCH_INTERVAL):
#
# 1. error log: nginx's stderr (and this script's) goes to a FIFO read by
#    error-log.awk, the only writer of the container's stderr: one JSON object per line.
# 2. replicas: resolves APP_UPSTREAM's host (Docker/Swarm/Kubernetes DNS, any number of
#    A records), probes GET /readyz on each address, and when the set of ready addresses
#    changes renders `server ip:port;` lines into the upstream, `nginx -t`, graceful
#    reload: one per change (replicas started together join together, JOIN_WAIT). Never an empty upstream: with none ready the last set stays; at first start
#    with none ready, every resolved address (warning). `nginx-upstreams` prints the set.
# 3. certificate: when TLS_CERT/TLS_KEY change (content), installs them with
#    nginx-certificate (a bad pair is refused, the old one keeps serving) and reloads.
#
# Signals: TERM, QUIT, INT → graceful stop of nginx (QUIT), wait, exit with its code;
# HUP → graceful reload (`nginx -s reload` without a pid file); USR1 → reopen logs.
# If nginx exits on its own, this exits non-zero: the restart policy takes over.
# Orphans are reaped by bash (it waits for any child).
# https://nginx.org/en/docs/control.html
# https://nginx.org/en/docs/http/ngx_http_upstream_module.html#server
set -uo pipefail

: "${APP_UPSTREAM:?is set by the entrypoint}" "${UPSTREAM_WATCH_INTERVAL:?is set by the entrypoint}"
: "${TLS_CERT:?is set by the entrypoint}" "${TLS_KEY:?is set by the entrypoint}"

RUN_DIR=/tmp/nginx
UPSTREAM_CONF=$RUN_DIR/settings/upstream-server.conf
UPSTREAMS_FILE=$RUN_DIR/upstreams   # what nginx runs with, read by nginx-upstreams
TLS_DIR=$RUN_DIR/tls                # the installed copy (nginx-certificate)
ERROR_FIFO=$RUN_DIR/error-log.fifo
ERROR_LOG_AWK=/usr/local/lib/nginx/error-log.awk
READY_PATH=/readyz
# A ready app answers /readyz in milliseconds; one that takes longer is not ready.
# With the interval, this bounds how long a draining replica keeps getting new requests
# (tests/static/test_contract.py: < the app's SHUTDOWN_DELAY).
PROBE_TIMEOUT=1
RELOAD_TIMEOUT=10  # seconds to wait for the new workers of a reload
# Replicas started together (a scale-up, a deploy) join in one reload: a ready new one
# waits at most this long for its siblings that resolve but are not ready yet. Each
# reload closes nginx's idle client keep-alive connections, and a client that sends on
# one at that instant gets no answer (HTTP/1.1 has no way to warn it; README "Scaling").
# Removals are never held back (a draining replica must leave within SHUTDOWN_DELAY).
JOIN_WAIT=3

UPSTREAM_HOST=${APP_UPSTREAM%:*}
UPSTREAM_PORT=${APP_UPSTREAM##*:}

nginx_pid=""
converter_pid=""
stopping=""
reload_requested=""
current=()        # addresses in the running upstream
waiting_since=""  # set while no address is ready (logged once, on the change)
joining_since=""  # set while a ready new address waits for its starting siblings
rendered=""       # the upstream file has been written once
ever_ready=""     # some address has answered /readyz since start
cert_seen=""      # content hash of the pair last looked at
cert_pending=""   # a changed hash, acted on when it holds still for one more turn

# ── logging: one JSON object per line ───────────────────────────────────────
json() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    printf '%s' "${s//$'\t'/\\t}"
}
json_list() {  # ["a","b"]
    local out="" item
    for item; do out+="${out:+,}\"$(json "$item")\""; done
    printf '[%s]' "$out"
}
log() {  # LEVEL EVENT [,"extra":…]
    printf '{"timestamp":"%s","level":"%s","logger":"nginx.supervisor","event":"%s","pid":%s%s}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)" "$1" "$(json "$2")" "$$" "${3:-}" >&2
}

# ── 1. the error log converter ──────────────────────────────────────────────
start_converter() {
    rm -f "$ERROR_FIFO"
    mkfifo -m 0600 "$ERROR_FIFO" || { log error "cannot create $ERROR_FIFO"; exit 70; }
    # Signals are for nginx, not for the converter: it must read to the last line.
    # mawk (Debian's awk) reads a pipe in blocks unless told it is interactive.
    local -a interactive=()
    [[ $(awk -W version 2>&1) == mawk* ]] && interactive=(-W interactive)
    (
        trap '' HUP INT QUIT TERM USR1 USR2 WINCH
        LC_ALL=C exec awk "${interactive[@]}" -v tz="$(date +%:z)" -f "$ERROR_LOG_AWK" \
            <"$ERROR_FIFO" >&2
    ) &
    converter_pid=$!
    exec 9>&2 2>"$ERROR_FIFO"  # from here on, our stderr and nginx's go through it
}

stop_converter() {  # nginx is gone: close our end, let it drain, at most 3 s
    local dir pid comm state ppid i
    # Workers left behind by a master that died (SIGKILL, crash) hold the FIFO open.
    for dir in /proc/[0-9]*; do
        read -r pid comm state ppid _ <"$dir/stat" 2>/dev/null || continue
        [[ $ppid == 1 && $comm == "(nginx)" ]] && kill -KILL "$pid" 2>/dev/null
    done
    exec 2>&- 1>&-
    for ((i = 0; i < 30; i++)); do
        kill -0 "$converter_pid" 2>/dev/null || return 0
        sleep 0.1
    done
}

# ── 2. nginx ────────────────────────────────────────────────────────────────
nginx_workers() {  # pids of the master's children (workers, old and new)
    local dir pid comm state ppid
    for dir in /proc/[0-9]*; do
        read -r pid comm state ppid _ <"$dir/stat" 2>/dev/null || continue
        [[ $ppid == "$nginx_pid" ]] && printf '%s ' "$pid"
    done
}

# reload REASON: `nginx -t`, then SIGHUP, then wait until a new worker runs.
reload() {
    if ! nginx -t -q -e stderr; then
        log error "nginx -t failed: not reloaded ($1)"
        return 1
    fi
    local before pid deadline=$((SECONDS + RELOAD_TIMEOUT))
    before=" $(nginx_workers)"
    kill -HUP "$nginx_pid" || return 1
    while ((SECONDS < deadline)); do
        for pid in $(nginx_workers); do
            [[ $before == *" $pid "* ]] || return 0
        done
        sleep 0.05
    done
    log warn "reload ($1): no new worker after ${RELOAD_TIMEOUT}s"
    return 1
}

# ── 3. replicas ─────────────────────────────────────────────────────────────
resolve() {  # the host's IPv4 addresses, sorted, one per line
    local ip _rest
    local -A seen=()
    while read -r ip _rest; do seen[$ip]=1; done < <(getent ahostsv4 "$UPSTREAM_HOST" 2>/dev/null)
    ((${#seen[@]})) && printf '%s\n' "${!seen[@]}" | sort -t. -k1,1n -k2,2n -k3,3n -k4,4n
}

# probe IP: GET /readyz over bash's /dev/tcp, ready on 200 within PROBE_TIMEOUT.
probe() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout "$PROBE_TIMEOUT" bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$4" >&3
        read -r _proto status _reason <&3 && [[ $status == 200 ]]' \
        probe "$1" "$UPSTREAM_PORT" "$READY_PATH" "$UPSTREAM_HOST" 2>/dev/null
}

ready_addresses() {  # ADDRESS...: probes them all at once; prints the ready ones
    local -a ips=("$@") pids=()
    local i rc
    for i in "${!ips[@]}"; do
        probe "${ips[$i]}" &
        pids[i]=$!
    done
    for i in "${!ips[@]}"; do
        # a trapped signal interrupts `wait` (status > 128): wait again for the real one
        while wait "${pids[$i]}"; rc=$?; ((rc > 128)) && kill -0 "${pids[$i]}" 2>/dev/null; do :; done
        ((rc == 0)) && printf '%s\n' "${ips[$i]}"
    done
}

# render ADDRESS...: the upstream's server lines (nginx/conf/proxy/upstream.conf
# includes them; keepalive and the rest stay there).
render() {
    local addr
    {
        for addr; do printf 'server %s:%s;\n' "$addr" "$UPSTREAM_PORT"; done
        # Nothing resolves yet (first start only): nginx needs a server; requests get a
        # JSON 502 until the app appears.
        (($#)) || printf 'server 127.0.0.1:%s down;\n' "$UPSTREAM_PORT"
    } >"$UPSTREAM_CONF.new" && mv -f "$UPSTREAM_CONF.new" "$UPSTREAM_CONF"
}

# apply ADDRESS...: render, reload (when nginx runs), publish, log what changed.
apply() {
    local -a added=() removed=()
    local addr
    for addr; do [[ " ${current[*]} " == *" $addr "* ]] || added+=("$addr:$UPSTREAM_PORT"); done
    for addr in "${current[@]}"; do [[ " $* " == *" $addr "* ]] || removed+=("$addr:$UPSTREAM_PORT"); done
    cp -p "$UPSTREAM_CONF" "$UPSTREAM_CONF.prev" 2>/dev/null
    render "$@"
    if [[ -n $nginx_pid ]] && ! reload "upstream change"; then
        mv -f "$UPSTREAM_CONF.prev" "$UPSTREAM_CONF"
        return 1
    fi
    current=("$@")
    rendered=1
    for addr; do printf '%s:%s\n' "$addr" "$UPSTREAM_PORT"; done >"$UPSTREAMS_FILE.new"
    mv -f "$UPSTREAMS_FILE.new" "$UPSTREAMS_FILE"
    local -a servers=()
    for addr; do servers+=("$addr:$UPSTREAM_PORT"); done
    log info "upstream app: ${#servers[@]} server(s)" \
        ",\"upstream\":\"$(json "$APP_UPSTREAM")\",\"servers\":$(json_list "${servers[@]}"),\"added\":$(json_list "${added[@]}"),\"removed\":$(json_list "${removed[@]}")"
}

# joining ADDRESS...(ready) -- ADDRESS...(resolved): true while the change from the
# running set is only additions, some resolved address is neither ready nor running
# yet (starting beside them), and the first of them has waited less than JOIN_WAIT.
joining() {
    local -a ready=() resolved=()
    local addr
    while [[ $1 != -- ]]; do ready+=("$1"); shift; done
    shift
    resolved=("$@")
    for addr in "${current[@]}"; do
        [[ " ${ready[*]} " == *" $addr "* ]] || return 1  # a removal: now
    done
    for addr in "${resolved[@]}"; do
        [[ " ${ready[*]} ${current[*]} " == *" $addr "* ]] && continue
        [[ -n $joining_since ]] || joining_since=$SECONDS
        ((SECONDS - joining_since < JOIN_WAIT)) && return 0
        return 1
    done
    return 1
}

watch_upstreams() {
    local -a ready=() resolved=()
    mapfile -t resolved < <(resolve)
    mapfile -t ready < <(ready_addresses "${resolved[@]}")
    if ((${#ready[@]})); then
        ever_ready=1
        if [[ -n $waiting_since ]]; then
            log info "$UPSTREAM_HOST answers $READY_PATH again after $((SECONDS - waiting_since))s"
            waiting_since=""
        fi
        if [[ "${ready[*]}" == "${current[*]}" ]]; then
            joining_since=""
            return 0
        fi
        [[ -n $rendered ]] && joining "${ready[@]}" -- "${resolved[@]}" && return 0
        joining_since=""
        apply "${ready[@]}"
        return 0
    fi
    # None ready. Never an empty upstream: keep the last ready set. Until there has been
    # one (first start), every resolved address; until anything resolves, a placeholder.
    if [[ -n $ever_ready ]]; then
        if [[ -z $waiting_since ]]; then
            waiting_since=$SECONDS
            log warn "no address of $UPSTREAM_HOST answers $READY_PATH: keeping the last set" \
                ",\"servers\":$(json_list "${current[@]}")"
        fi
        return 0
    fi
    [[ -n $waiting_since ]] || waiting_since=$SECONDS
    if [[ -z $rendered || (${#resolved[@]} -gt 0 && "${resolved[*]}" != "${current[*]}") ]]; then
        log warn "no address of $UPSTREAM_HOST answers $READY_PATH yet: using every resolved one until one does" \
            ",\"servers\":$(json_list "${resolved[@]}")"
        apply "${resolved[@]}"
    fi
}

# ── 4. certificate ──────────────────────────────────────────────────────────
cert_hash() { cat -- "$TLS_CERT" "$TLS_KEY" 2>/dev/null | sha256sum; }

watch_certificate() {
    local now summary
    now=$(cert_hash)
    if [[ $now == "$cert_seen" ]]; then
        cert_pending=""
        return 0
    fi
    # Changed: act when it held still for one turn (a renewal writes two files).
    if [[ $now != "$cert_pending" ]]; then
        cert_pending=$now
        return 0
    fi
    cert_seen=$now
    cert_pending=""
    if ! summary=$(nginx-certificate "$TLS_CERT" "$TLS_KEY" "$TLS_DIR" 2>&1); then
        log error "certificate change refused, the previous one keeps serving: $summary" \
            ",\"tls_cert\":\"$(json "$TLS_CERT")\",\"tls_key\":\"$(json "$TLS_KEY")\""
        return 0
    fi
    if reload "certificate change"; then
        log info "certificate reloaded: $summary" ",\"tls_cert\":\"$(json "$TLS_CERT")\""
    fi
}

# ── signals ─────────────────────────────────────────────────────────────────
on_stop() {
    [[ -n $stopping ]] && return 0
    stopping=$1
    log info "SIG$1: graceful stop of nginx (QUIT)"
    [[ -n $nginx_pid ]] && kill -QUIT "$nginx_pid" 2>/dev/null
}
trap '' PIPE  # a write to a dead reader fails (EPIPE) instead of killing PID 1
trap 'on_stop TERM' TERM
trap 'on_stop QUIT' QUIT
trap 'on_stop INT' INT
trap 'reload_requested=1' HUP
trap '[[ -n $nginx_pid ]] && kill -USR1 "$nginx_pid"' USR1

# ── main ────────────────────────────────────────────────────────────────────
start_converter
cert_seen=$(cert_hash)  # the entrypoint installed this pair
watch_upstreams          # the first upstream, before nginx reads it

if ! nginx -t -q -e stderr; then
    log error "nginx -t failed: not starting"
    stop_converter
    exit 78  # EX_CONFIG
fi
[[ -z $stopping ]] || { stop_converter; exit 0; }
nginx -e stderr "$@" 9>&- &
nginx_pid=$!
log info "nginx started" ",\"nginx_pid\":$nginx_pid,\"upstream\":\"$(json "$APP_UPSTREAM")\",\"watch_interval\":\"$UPSTREAM_WATCH_INTERVAL\""

while [[ -z $stopping ]] && kill -0 "$nginx_pid" 2>/dev/null; do
    if ! kill -0 "$converter_pid" 2>/dev/null; then
        exec 2>&9  # the container's own stderr, saved by start_converter
        log error "the error-log converter died: stopping nginx"
        kill -QUIT "$nginx_pid"
        stopping=converter
        break
    fi
    if [[ -n $reload_requested ]]; then
        reload_requested=""
        reload "SIGHUP" && log info "reloaded (SIGHUP)"
    fi
    watch_upstreams
    watch_certificate
    [[ -n $stopping || -n $reload_requested ]] && continue
    sleep "$UPSTREAM_WATCH_INTERVAL" &
    wait $! 2>/dev/null || kill $! 2>/dev/null  # a signal cuts the sleep short
done

# nginx is stopping (we asked) or gone (it died): collect its exit status.
while wait "$nginx_pid"; rc=$?; ((rc > 128)) && kill -0 "$nginx_pid" 2>/dev/null; do :; done
if [[ -n $stopping && $stopping != converter ]]; then
    log info "nginx stopped" ",\"exit_code\":$rc"
else
    log error "nginx exited on its own" ",\"exit_code\":$rc"
    ((rc == 0)) && rc=1
fi
stop_converter
exit "$rc"
