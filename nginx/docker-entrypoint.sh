#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx entrypoint: certificate, settings, then the supervisor as PID 1    │
# └──────────────────────────────────────────────────────────────────────────┘
# 1. A certificate: the mounted one (TLS_CERT/TLS_KEY) is used as is; when none
#    is there a self-signed one is made (first run, dev, CI). Never overwritten.
#    nginx reads a checked copy of it in /tmp/nginx/tls (nginx-certificate).
# 2. The few environment-dependent values are validated and rendered into
#    /tmp/nginx/settings/*.conf, which the static config includes (the root
#    filesystem is read-only; nginx cannot read the environment itself).
# 3. exec nginx-supervisor (nginx/supervisor.sh): PID 1, nginx its child, the
#    error log as JSON, the upstream following the app's replicas, the
#    certificate followed on change. `nginx -t`/`-T` commands run nginx directly.
# https://nginx.org/en/docs/ngx_core_module.html#include
# https://docs.docker.com/reference/dockerfile/#entrypoint
set -eu

SETTINGS_DIR=/tmp/nginx/settings
TLS_DIR=/tmp/nginx/tls  # the checked copy of TLS_CERT/TLS_KEY that nginx reads

# ── settings (defaults documented in the README / .env.example) ─────────────
SERVER_NAMES=${SERVER_NAMES:-localhost 127.0.0.1}
APP_UPSTREAM=${APP_UPSTREAM:-app:8000}
RATE_LIMIT=${RATE_LIMIT:-20r/s}
RATE_LIMIT_BURST=${RATE_LIMIT_BURST:-40}
RATE_LIMIT_ALLOWLIST=${RATE_LIMIT_ALLOWLIST-127.0.0.1/32}
CLIENT_MAX_BODY_SIZE=${CLIENT_MAX_BODY_SIZE:-1m}
HTTPS_REDIRECT_PORT=${HTTPS_REDIRECT_PORT:-}
TLS_CERT=${TLS_CERT:-/etc/nginx/certs/fullchain.pem}
TLS_KEY=${TLS_KEY:-/etc/nginx/certs/privkey.pem}
TLS_SELF_SIGNED_DAYS=${TLS_SELF_SIGNED_DAYS:-365}
UPSTREAM_WATCH_INTERVAL=${UPSTREAM_WATCH_INTERVAL:-1}

# One JSON object per line, like every other log line of the stack.
json_string() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g'; }
log_line() {
    printf '{"timestamp":"%s","level":"%s","logger":"nginx.entrypoint","event":"%s","pid":%s}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)" "$1" "$(json_string "$2")" "$$" >&2
}
log() { log_line info "$*"; }
die() { log_line error "$*"; exit 64; }

# require NAME VALUE ERE DESCRIPTION: the whole value must match ERE. Values are
# pasted into nginx config, so nothing but the expected characters gets through.
NL='
'
require() {
    case $2 in *"$NL"*) die "$1 must be a single line" ;; esac
    printf '%s\n' "$2" | grep -Eqx -- "$3" \
        || die "$1='$2' is invalid: expected $4"
}

# require_number NAME VALUE MIN MAX DESCRIPTION: a whole number from MIN to MAX,
# without leading zeros (sh arithmetic reads 010 as octal). The bounds are
# within what nginx accepts and computes with (or the protocol's): a value that
# passes here never makes nginx refuse to start (a restart loop) or overflow;
# one that does not is one clear line naming the variable (nginx/check.sh).
require_number() {
    require "$1" "$2" '0|[1-9][0-9]{0,17}' "$5"
    [ "$2" -ge "$3" ] && [ "$2" -le "$4" ] \
        || die "$1='$2' is out of range: expected $3 to $4, $5"
}

bytes() {  # an nginx size (1m, 512k, 2g, 1024) in bytes
    case $1 in
        *[kK]) echo $(( ${1%?} * 1024 )) ;;
        *[mM]) echo $(( ${1%?} * 1048576 )) ;;
        *[gG]) echo $(( ${1%?} * 1073741824 )) ;;
        *) echo "$1" ;;
    esac
}

# ── validation ──────────────────────────────────────────────────────────────
require SERVER_NAMES "$SERVER_NAMES" '[A-Za-z0-9.*_:-]+( +[A-Za-z0-9.*_:-]+)*' \
    "space-separated host names or IP addresses, e.g. 'example.com www.example.com'"
require APP_UPSTREAM "$APP_UPSTREAM" '[A-Za-z0-9._-]+:[1-9][0-9]{0,4}' "host:port, e.g. app:8000"
[ "${APP_UPSTREAM##*:}" -le 65535 ] \
    || die "APP_UPSTREAM='$APP_UPSTREAM' is out of range: expected a port from 1 to 65535, e.g. app:8000"
# nginx keeps the rate in thousandths of a request (rate x 1000) and the burst
# likewise: past these bounds it overflows without a word.
require RATE_LIMIT "$RATE_LIMIT" '[1-9][0-9]{0,17}r/[sm]' "requests per second or minute, e.g. 20r/s or 600r/m"
[ "${RATE_LIMIT%r/?}" -le 1000000000 ] \
    || die "RATE_LIMIT='$RATE_LIMIT' is out of range: expected 1 to 1000000000 requests per second or minute, e.g. 20r/s"
require_number RATE_LIMIT_BURST "$RATE_LIMIT_BURST" 0 1000000000 \
    "a whole number of requests, e.g. 40 (0: no burst)"
require RATE_LIMIT_ALLOWLIST "$RATE_LIMIT_ALLOWLIST" '([0-9A-Fa-f.:/]+([ ,]+[0-9A-Fa-f.:/]+)*)?' \
    "IP addresses or CIDRs separated by spaces or commas (empty: nobody exempt), e.g. '127.0.0.1/32 10.0.0.0/8'"
# At most 1 TiB (nginx takes up to 8 EiB; 0 is the way to say unlimited), so that
# the body budget below is computed without overflow.
require CLIENT_MAX_BODY_SIZE "$CLIENT_MAX_BODY_SIZE" '(0|[1-9][0-9]{0,12})[kKmMgG]?' \
    "a size, e.g. 1m, 512k (0 = unlimited)"
number=${CLIENT_MAX_BODY_SIZE%[kKmMgG]}
[ "$number" -le $(( 1099511627776 / $(bytes "1${CLIENT_MAX_BODY_SIZE#"$number"}") )) ] \
    || die "CLIENT_MAX_BODY_SIZE='$CLIENT_MAX_BODY_SIZE' is out of range: expected at most 1024g (1 TiB), e.g. 1m, 512k (0 = unlimited)"
if [ -n "$HTTPS_REDIRECT_PORT" ]; then
    require_number HTTPS_REDIRECT_PORT "$HTTPS_REDIRECT_PORT" 1 65535 "a port number, or empty for 443"
fi
require TLS_CERT "$TLS_CERT" '/[A-Za-z0-9._/-]+' "an absolute path"
require TLS_KEY "$TLS_KEY" '/[A-Za-z0-9._/-]+' "an absolute path"
require_number TLS_SELF_SIGNED_DAYS "$TLS_SELF_SIGNED_DAYS" 1 36500 "a number of days, e.g. 365"
require UPSTREAM_WATCH_INTERVAL "$UPSTREAM_WATCH_INTERVAL" '(0\.[1-9][0-9]?|[1-9](\.[0-9]{1,2})?)' \
    "seconds between two looks at the app's replicas, 0.1 to 9.99, e.g. 1"

# ── 1. certificate ──────────────────────────────────────────────────────────
# Subject alternative names of the self-signed certificate: localhost,
# 127.0.0.1 and every plain name in SERVER_NAMES (wildcards included).
self_signed_san() {
    san="DNS:localhost,IP:127.0.0.1"
    for name in $SERVER_NAMES; do
        case $name in
            localhost | 127.0.0.1 | _ | *:*) ;;  # already in, catch-all, or IPv6 (skipped)
            *[!0-9.]*) san="$san,DNS:$name" ;;
            *) san="$san,IP:$name" ;;
        esac
    done
    printf '%s' "$san"
}

# unreachable FILE: why uid 101 cannot see FILE although something is there: a
# directory on the way it may not enter, or a symbolic link to a file that is not
# mounted (Let's Encrypt's live/<domain>/*.pem point into ../../archive/).
blocked_dir() {  # the first directory on FILE's path this user may not enter
    path="" rest=${1#/}
    while [ "$rest" != "${rest#*/}" ]; do
        path="$path/${rest%%/*}"
        rest=${rest#*/}
        if [ -d "$path" ] && [ ! -x "$path" ]; then printf '%s' "$path"; return 0; fi
    done
    return 1
}
unreachable() {
    file=$1 hops=0
    while [ "$hops" -lt 8 ]; do
        if dir=$(blocked_dir "$file"); then
            printf '%s: uid %s may not enter %s (mode %s): give it read and search access (README "TLS")' \
                "$1" "$(id -u)" "$dir" "$(stat -c %a "$dir")"
            return 0
        fi
        [ -L "$file" ] || break
        target=$(readlink "$file")
        case $target in /*) file=$target ;; *) file=$(dirname "$file")/$target ;; esac
        hops=$((hops + 1))
    done
    if [ "$hops" -gt 0 ] && [ ! -e "$file" ]; then
        printf '%s is a symbolic link to %s, which is not in the container: mount the directory it points into too (Let'"'"'s Encrypt: all of /etc/letsencrypt, README "TLS")' \
            "$1" "$file"
        return 0
    fi
    return 1
}

ensure_certificate() {
    for file in "$TLS_CERT" "$TLS_KEY"; do
        if [ ! -e "$file" ] && why=$(unreachable "$file"); then die "$why"; fi
    done
    if [ -e "$TLS_CERT" ] && [ -e "$TLS_KEY" ]; then
        if [ ! -r "$TLS_CERT" ] || [ ! -r "$TLS_KEY" ]; then
            die "$TLS_CERT or $TLS_KEY is not readable by uid $(id -u): fix the mounted files' mode"
        fi
        log "using the certificate at $TLS_CERT"
        return 0
    fi
    if [ -e "$TLS_CERT" ] || [ -e "$TLS_KEY" ]; then
        die "only one of $TLS_CERT and $TLS_KEY exists: mount both (or neither for a self-signed one)"
    fi
    for dir in "$(dirname "$TLS_CERT")" "$(dirname "$TLS_KEY")"; do
        if ! mkdir -p "$dir" 2>/dev/null || [ ! -w "$dir" ]; then
            die "no certificate at $TLS_CERT and $dir is not writable: mount a certificate or a writable volume there"
        fi
    done
    san=$(self_signed_san)
    log "no certificate at $TLS_CERT: creating a self-signed one (ECDSA P-256, $TLS_SELF_SIGNED_DAYS days, $san)"
    # Key written with umask 077 (0600, owned by this user); both files appear
    # only once complete, so a crash never leaves half a pair behind.
    (
        umask 077
        openssl req -x509 -new -nodes -sha256 -days "$TLS_SELF_SIGNED_DAYS" \
            -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
            -subj "/CN=$(printf '%s' "$SERVER_NAMES" | cut -d' ' -f1)" \
            -addext "subjectAltName=$san" \
            -addext "basicConstraints=critical,CA:FALSE" \
            -addext "keyUsage=critical,digitalSignature" \
            -addext "extendedKeyUsage=serverAuth" \
            -keyout "$TLS_KEY.tmp" -out "$TLS_CERT.tmp" 2>/dev/null
    ) || die "openssl could not create the self-signed certificate"
    chmod 0644 "$TLS_CERT.tmp"
    mv "$TLS_KEY.tmp" "$TLS_KEY"
    mv "$TLS_CERT.tmp" "$TLS_CERT"
}

# ── 2. settings ─────────────────────────────────────────────────────────────
# shellcheck disable=SC2016  # $host, $request_uri, $rate_limit_key are nginx's variables
render_settings() {
    mkdir -p "$SETTINGS_DIR"

    printf 'server_name %s;\n' "$SERVER_NAMES" >"$SETTINGS_DIR/server-names.conf"
    # The name as given, for `nginx -t`; the supervisor replaces it with the ready
    # addresses before nginx starts, and follows them.
    printf 'server %s;\n' "$APP_UPSTREAM" >"$SETTINGS_DIR/upstream-server.conf"
    printf 'client_max_body_size %s;\n' "$CLIENT_MAX_BODY_SIZE" >"$SETTINGS_DIR/client-max-body-size.conf"
    printf 'ssl_certificate %s/fullchain.pem;\nssl_certificate_key %s/privkey.pem;\n' \
        "$TLS_DIR" "$TLS_DIR" >"$SETTINGS_DIR/tls-certificate.conf"

    printf 'limit_req_zone $rate_limit_key zone=per_client:10m rate=%s;\n' "$RATE_LIMIT" \
        >"$SETTINGS_DIR/rate-limit-zone.conf"
    if [ "$RATE_LIMIT_BURST" -gt 0 ]; then
        printf 'limit_req zone=per_client burst=%s nodelay;\n' "$RATE_LIMIT_BURST"
    else
        printf 'limit_req zone=per_client;\n'  # no burst: strictly the rate
    fi >"$SETTINGS_DIR/rate-limit.conf"
    : >"$SETTINGS_DIR/rate-limit-allowlist.conf"
    for cidr in $(printf '%s' "$RATE_LIMIT_ALLOWLIST" | tr ',' ' '); do
        printf '%s 1;\n' "$cidr" >>"$SETTINGS_DIR/rate-limit-allowlist.conf"
    done

    port_suffix=""
    if [ -n "$HTTPS_REDIRECT_PORT" ] && [ "$HTTPS_REDIRECT_PORT" != 443 ]; then
        port_suffix=":$HTTPS_REDIRECT_PORT"
    fi
    printf 'return 308 https://$host%s$request_uri;\n' "$port_suffix" \
        >"$SETTINGS_DIR/https-redirect.conf"

    log "settings: SERVER_NAMES='$SERVER_NAMES' APP_UPSTREAM=$APP_UPSTREAM" \
        "RATE_LIMIT=$RATE_LIMIT RATE_LIMIT_BURST=$RATE_LIMIT_BURST" \
        "RATE_LIMIT_ALLOWLIST='$RATE_LIMIT_ALLOWLIST' CLIENT_MAX_BODY_SIZE=$CLIENT_MAX_BODY_SIZE" \
        "HTTPS_REDIRECT_PORT=${HTTPS_REDIRECT_PORT:-443} TLS_CERT=$TLS_CERT" \
        "UPSTREAM_WATCH_INTERVAL=$UPSTREAM_WATCH_INTERVAL"
}

# ── per-client limits, body buffering, workers (limits/, nginx.conf) ────────
# One client may have CONNECTION_LIMIT requests in progress at once (HTTP/2:
# each stream counts); more get 429 before their body is read. A request body
# is held in memory, never spooled to /tmp (a tmpfs is memory too, smaller, and
# a full one answered 500): client_body_buffer_size = CLIENT_MAX_BODY_SIZE, as
# long as one client's worst case (CONNECTION_LIMIT x CLIENT_MAX_BODY_SIZE)
# fits in a quarter of the container's memory limit. Beyond that (or with
# CLIENT_MAX_BODY_SIZE=0, unlimited) bodies are streamed to the app as they
# arrive (proxy_request_buffering off): nothing is buffered whole anywhere.
# Workers: one per CPU of the container's quota (not the host's, as `auto`).
# Connection slots: half the memory limit at 64 KiB each (an idle TLS
# connection costs nginx ~52 KiB, measured), split over the workers, at most
# MAX_WORKER_CONNECTIONS each (worker_rlimit_nofile 16384 holds 2 per slot).
CONNECTION_LIMIT=${CONNECTION_LIMIT:-32}
WS_CONNECTION_LIMIT=${WS_CONNECTION_LIMIT:-16}
MAX_WORKER_CONNECTIONS=8000
ASSUMED_MEMORY=536870912  # no memory limit known: plan for 512 MiB (compose's default)

cgroup_memory_limit() {  # bytes, or nothing when unlimited / unknown
    for file in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
        [ -r "$file" ] || continue
        value=$(cat "$file")
        case $value in max | "" | *[!0-9]*) return 0 ;; esac
        [ "$value" -lt 1099511627776 ] && printf '%s' "$value"  # >= 1 TiB: no limit
        return 0
    done
}

cgroup_cpus() {  # whole CPUs of the quota (rounded up), at most the usable CPUs
    cpus=$(nproc)
    quota="" period=""
    if [ -r /sys/fs/cgroup/cpu.max ]; then
        read -r quota period </sys/fs/cgroup/cpu.max
    elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
        period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
    fi
    case $quota in "" | max | -*) ;; *)
        limited=$(( (quota + period - 1) / period ))
        [ "$limited" -ge 1 ] && [ "$limited" -lt "$cpus" ] && cpus=$limited ;;
    esac
    printf '%s' "$cpus"
}

render_limits() {
    # nginx's limit_conn counts in 16 bits: 65535 at most.
    require_number CONNECTION_LIMIT "$CONNECTION_LIMIT" 1 65535 \
        "concurrent requests per client IP, e.g. 32"
    printf 'limit_conn per_client_conn %s;\n' "$CONNECTION_LIMIT" >"$SETTINGS_DIR/connection-limit.conf"
    require_number WS_CONNECTION_LIMIT "$WS_CONNECTION_LIMIT" 1 65535 \
        "open WebSocket sessions per client IP, e.g. 16"
    printf 'limit_conn per_client_ws %s;\n' "$WS_CONNECTION_LIMIT" >"$SETTINGS_DIR/websocket-limit.conf"

    memory=$(cgroup_memory_limit)
    budget=$(( ${memory:-$ASSUMED_MEMORY} / 4 ))
    body=$(bytes "$CLIENT_MAX_BODY_SIZE")
    if [ "$body" -gt 0 ] && [ "$body" -le $(( budget / CONNECTION_LIMIT )) ]; then
        printf 'client_body_buffer_size %s;\nproxy_request_buffering on;\n' "$CLIENT_MAX_BODY_SIZE"
        how="in memory (client_body_buffer_size $CLIENT_MAX_BODY_SIZE)"
    else
        printf 'client_body_buffer_size 64k;\nproxy_request_buffering off;\n'
        how="streamed to the app ($CONNECTION_LIMIT x $CLIENT_MAX_BODY_SIZE > $budget bytes, a quarter of the memory limit)"
    fi >"$SETTINGS_DIR/request-body-buffering.conf"

    workers=$(cgroup_cpus)
    printf 'worker_processes %s;\n' "$workers" >"$SETTINGS_DIR/worker-processes.conf"
    slots=$(( ${memory:-$ASSUMED_MEMORY} / 2 / 65536 / workers ))
    [ "$slots" -gt "$MAX_WORKER_CONNECTIONS" ] && slots=$MAX_WORKER_CONNECTIONS
    [ "$slots" -lt 512 ] && slots=512
    printf 'worker_connections %s;\n' "$slots" >"$SETTINGS_DIR/worker-connections.conf"
    log "limits: CONNECTION_LIMIT=$CONNECTION_LIMIT per client;" \
        "WS_CONNECTION_LIMIT=$WS_CONNECTION_LIMIT WebSocket sessions per client; request bodies $how;" \
        "worker_processes $workers x worker_connections $slots (memory limit ${memory:-none})"
}

# ── HSTS (security/strict-transport-security.conf) ──────────────────────────
# includeSubDomains and preload reach beyond this host and are slow to undo
# (browsers remember for max-age; the preload list ships in browsers): both
# are opt-in. preload needs includeSubDomains and max-age >= 1 year
# (https://hstspreload.org/#deployment-recommendations).
HSTS_MAX_AGE=${HSTS_MAX_AGE:-63072000}
HSTS_INCLUDE_SUBDOMAINS=${HSTS_INCLUDE_SUBDOMAINS:-off}
HSTS_PRELOAD=${HSTS_PRELOAD:-off}

on_off='(on|off|true|false|yes|no|1|0)'
is_on() { case $1 in on | true | yes | 1) return 0 ;; *) return 1 ;; esac; }

render_hsts() {
    require_number HSTS_MAX_AGE "$HSTS_MAX_AGE" 0 999999999 \
        "seconds, e.g. 63072000 (2 years; 0 tells browsers to forget)"
    require HSTS_INCLUDE_SUBDOMAINS "$HSTS_INCLUDE_SUBDOMAINS" "$on_off" "on or off"
    require HSTS_PRELOAD "$HSTS_PRELOAD" "$on_off" "on or off"
    value="max-age=$HSTS_MAX_AGE"
    if is_on "$HSTS_INCLUDE_SUBDOMAINS"; then value="$value; includeSubDomains"; fi
    if is_on "$HSTS_PRELOAD"; then
        is_on "$HSTS_INCLUDE_SUBDOMAINS" && [ "$HSTS_MAX_AGE" -ge 31536000 ] \
            || die "HSTS_PRELOAD=on needs HSTS_INCLUDE_SUBDOMAINS=on and HSTS_MAX_AGE >= 31536000"
        value="$value; preload"
    fi
    printf 'add_header Strict-Transport-Security "%s" always;\n' "$value" >"$SETTINGS_DIR/hsts.conf"
    log "HSTS: $value"
}

# ── TLS key-exchange groups (tls/policy-intermediate.conf) ──────────────────
# Mozilla intermediate: X25519, P-256, P-384; guidelines 5.8 put the hybrid
# X25519MLKEM768 first where the OpenSSL nginx links knows it (3.5+; 3.0 in
# the official image would refuse the name and nginx would not start).
render_tls_groups() {
    groups="X25519:prime256v1:secp384r1"
    if openssl list -tls-groups 2>/dev/null | tr ':' '\n' | grep -qx X25519MLKEM768; then
        groups="X25519MLKEM768:$groups"
    fi
    printf 'ssl_ecdh_curve %s;\n' "$groups" >"$SETTINGS_DIR/tls-groups.conf"
    log "TLS groups: $groups"
}

# ── main ────────────────────────────────────────────────────────────────────
mkdir -p /tmp/nginx || die "/tmp is not writable: mount a tmpfs at /tmp"
ensure_certificate
summary=$(nginx-certificate "$TLS_CERT" "$TLS_KEY" "$TLS_DIR" 2>&1) || die "$summary"
log "certificate: $summary"
render_settings
render_limits
render_hsts
render_tls_groups

if [ "${1:-}" = nginx ]; then
    shift
    case " $* " in
        # A config test (`-e stderr`: nginx opens its error log before reading the
        # config, and the compiled-in path is not writable by this user).
        *" -t "* | *" -T "*) exec nginx -e stderr "$@" ;;
    esac
    export APP_UPSTREAM UPSTREAM_WATCH_INTERVAL TLS_CERT TLS_KEY
    exec nginx-supervisor "$@"
fi

exec "$@"
