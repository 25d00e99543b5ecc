#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx entrypoint: certificate, settings, config test, then nginx as PID 1 │
# └──────────────────────────────────────────────────────────────────────────┘
# 1. A certificate: the mounted one (TLS_CERT/TLS_KEY) is used as is; when none
#    is there a self-signed one is made (first run, dev, CI). Never overwritten.
# 2. The few environment-dependent values are validated and rendered into
#    /tmp/nginx/settings/*.conf, which the static config includes (the root
#    filesystem is read-only; nginx cannot read the environment itself).
# 3. `nginx -t`, then exec: nginx becomes PID 1 and gets the stop signal.
# https://nginx.org/en/docs/ngx_core_module.html#include
# https://docs.docker.com/reference/dockerfile/#entrypoint
set -eu

SETTINGS_DIR=/tmp/nginx/settings

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

# ── validation ──────────────────────────────────────────────────────────────
require SERVER_NAMES "$SERVER_NAMES" '[A-Za-z0-9.*_:-]+( +[A-Za-z0-9.*_:-]+)*' \
    "space-separated host names or IP addresses, e.g. 'example.com www.example.com'"
require APP_UPSTREAM "$APP_UPSTREAM" '[A-Za-z0-9._-]+:[0-9]{1,5}' "host:port, e.g. app:8000"
require RATE_LIMIT "$RATE_LIMIT" '[1-9][0-9]*r/[sm]' "requests per second or minute, e.g. 20r/s or 600r/m"
require RATE_LIMIT_BURST "$RATE_LIMIT_BURST" '[0-9]{1,9}' "a whole number of requests, e.g. 40 (0: no burst)"
require RATE_LIMIT_ALLOWLIST "$RATE_LIMIT_ALLOWLIST" '([0-9A-Fa-f.:/]+([ ,]+[0-9A-Fa-f.:/]+)*)?' \
    "IP addresses or CIDRs separated by spaces or commas (empty: nobody exempt), e.g. '127.0.0.1/32 10.0.0.0/8'"
require CLIENT_MAX_BODY_SIZE "$CLIENT_MAX_BODY_SIZE" '[0-9]+[kKmMgG]?' "a size, e.g. 1m, 512k (0 = unlimited)"
require HTTPS_REDIRECT_PORT "$HTTPS_REDIRECT_PORT" '([1-9][0-9]{0,4})?' "a port number, or empty for 443"
require TLS_CERT "$TLS_CERT" '/[A-Za-z0-9._/-]+' "an absolute path"
require TLS_KEY "$TLS_KEY" '/[A-Za-z0-9._/-]+' "an absolute path"
require TLS_SELF_SIGNED_DAYS "$TLS_SELF_SIGNED_DAYS" '[1-9][0-9]*' "a number of days"

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

ensure_certificate() {
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
    printf 'server %s;\n' "$APP_UPSTREAM" >"$SETTINGS_DIR/upstream-server.conf"
    printf 'client_max_body_size %s;\n' "$CLIENT_MAX_BODY_SIZE" >"$SETTINGS_DIR/client-max-body-size.conf"
    printf 'ssl_certificate %s;\nssl_certificate_key %s;\n' "$TLS_CERT" "$TLS_KEY" \
        >"$SETTINGS_DIR/tls-certificate.conf"

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
        "HTTPS_REDIRECT_PORT=${HTTPS_REDIRECT_PORT:-443} TLS_CERT=$TLS_CERT"
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
render_settings
render_tls_groups

if [ "${1:-}" = nginx ]; then
    # Fail here, with nginx's own message, rather than restart-looping later.
    # `-e stderr`: nginx opens its error log before reading the config, and
    # the compiled-in path is not writable by this user.
    case " $* " in
        *" -t "* | *" -T "*) ;;  # the command is a config test already
        *) nginx -t -q -e stderr ;;
    esac
    shift
    exec nginx -e stderr "$@"
fi

exec "$@"
