#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx/check.sh: `nginx -t` in the real image, the way production runs it │
# └──────────────────────────────────────────────────────────────────────────┘
# Builds nginx/Dockerfile and runs its entrypoint + `nginx -t` as uid 101 with a
# read-only root filesystem, a /tmp tmpfs, no capabilities and no network (the
# upstream name `app` is pinned to loopback). The entrypoint makes a throw-away
# self-signed certificate in /tmp. Then checks that settings are rendered
# (non-default values) and that a bad value is refused with a clear message.
#   NGINX_IMAGE=localbase/nginx:trixie nginx/check.sh     # build on a local base
#   nginx/check.sh --no-build [IMAGE]                      # test an existing image
# https://nginx.org/en/docs/switches.html
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${NGINX_IMAGE:-nginx:1.27}
image=${NGINX_CHECK_TAG:-nginx-check:local}
build=1
if [[ ${1:-} == --no-build ]]; then
    build=0
    image=${2:-$image}
fi

say() { printf '[nginx/check] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

if [[ $build == 1 ]]; then
    say "building $image from NGINX_IMAGE=$base"
    docker build --quiet -f "$root/nginx/Dockerfile" --build-arg "NGINX_IMAGE=$base" \
        -t "$image" "$root" >/dev/null
fi

# run ENV... -- CMD...: the image as compose runs it, minus the network.
run() {
    local -a env=()
    while [[ $1 != -- ]]; do env+=(-e "$1"); shift; done
    shift
    docker run --rm --read-only --tmpfs /tmp --cap-drop ALL \
        --security-opt no-new-privileges --network none --add-host app:127.0.0.1 \
        -e TLS_CERT=/tmp/check/fullchain.pem -e TLS_KEY=/tmp/check/privkey.pem \
        "${env[@]}" "$image" "$@"
}

say "nginx -t with the defaults"
run -- nginx -t -q || fail "nginx -t failed with the default settings"

say "nginx -T with every setting changed"
out=$(run SERVER_NAMES='example.com www.example.com 10.0.0.5' APP_UPSTREAM=127.0.0.1:9001 \
    RATE_LIMIT=600r/m RATE_LIMIT_BURST=0 RATE_LIMIT_ALLOWLIST='10.0.0.0/8, 192.168.1.7' \
    CLIENT_MAX_BODY_SIZE=10m HTTPS_REDIRECT_PORT=8443 CONNECTION_LIMIT=4 WS_CONNECTION_LIMIT=3 \
    HSTS_MAX_AGE=31536000 HSTS_INCLUDE_SUBDOMAINS=on HSTS_PRELOAD=on -- nginx -T -q 2>&1) \
    || fail "nginx -T failed with non-default settings:"$'\n'"$out"
# shellcheck disable=SC2016  # nginx variables, literally
for want in 'server_name example.com www.example.com 10.0.0.5;' 'server 127.0.0.1:9001;' \
    'rate=600r/m;' 'limit_req zone=per_client;' '10.0.0.0/8 1;' '192.168.1.7 1;' \
    'client_max_body_size 10m;' 'return 308 https://$host:8443$request_uri;' \
    'X25519:prime256v1:secp384r1;' 'limit_conn per_client_conn 4;' 'limit_conn per_client_ws 3;' \
    'client_body_buffer_size 10m;' 'proxy_request_buffering on;' 'worker_processes ' \
    'worker_connections ' \
    'Strict-Transport-Security "max-age=31536000; includeSubDomains; preload" always;'; do
    grep -qF -- "$want" <<<"$out" || fail "the rendered config lacks '$want'"
done

say "bodies too large to buffer per client are streamed, not spooled"
out=$(run CLIENT_MAX_BODY_SIZE=0 -- nginx -T -q 2>&1) || fail "nginx -T failed: $out"
grep -qF 'proxy_request_buffering off;' <<<"$out" || fail "CLIENT_MAX_BODY_SIZE=0 is not streamed"

say "nginx's own 500 is JSON with the request id and the security headers"
# The real config, with /metrics answered 500 by nginx (no request can make
# nginx fail on its own any more: nothing is spooled to /tmp).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'location = /metrics { return 500; }\n' >"$tmp/metrics-blocked.conf"
probe='nginx -e stderr && sleep 1 && printf "GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: check-500\r\nConnection: close\r\n\r\n" \
    | openssl s_client -quiet -connect 127.0.0.1:8443 -servername localhost 2>/dev/null'
out=$(docker run --rm --read-only --tmpfs /tmp --cap-drop ALL --network none \
    --add-host app:127.0.0.1 -e TLS_CERT=/tmp/check/fullchain.pem -e TLS_KEY=/tmp/check/privkey.pem \
    -v "$tmp/metrics-blocked.conf:/etc/nginx/location/metrics-blocked.conf:ro" \
    "$image" sh -c "$probe" 2>&1) || true
for want in 'HTTP/1.1 500' 'Content-Type: application/json' 'X-Request-ID: check-500' \
    'X-Content-Type-Options: nosniff' '{"detail":"internal server error","request_id":"check-500"}'; do
    grep -qF -- "$want" <<<"$out" || fail "nginx's 500 lacks '$want':"$'\n'"$out"
done

say "error-log.awk: nginx's line formats become JSON objects with the core keys"
# The converter in the image (its own awk) on each format nginx writes, checked by
# pattern here; tests/e2e/test_nginx_supervisor.py parses live lines with json.loads.
sample='2026/12/01 11:09:58 [error] 52#52: *20 client intended to send too large body: 67108864 bytes, client: 10.0.0.1, server: localhost, request: "POST /api/orders HTTP/1.1", host: "localhost:8443"
2026/12/01 11:10:00 [warn] 53#53: *22 upstream server temporarily disabled while connecting to upstream, client: 10.0.0.1, server: localhost, request: "GET /a\"b HTTP/1.1", upstream: "http://10.0.0.2:8000/a", host: "localhost"
nginx: [emerg] unknown directive "foo" in /etc/nginx/nginx.conf:1
{"timestamp":"t","level":"info","logger":"nginx.supervisor","event":"as is"}
stray text from some tool'
out=$(printf '%s\n' "$sample" | docker run --rm -i --network none --entrypoint awk "$image" \
    -v tz=+00:00 -f /usr/local/lib/nginx/error-log.awk 2>&1) || fail "error-log.awk failed: $out"
[[ $(wc -l <<<"$out") == 5 ]] || fail "error-log.awk: 5 lines in, not 5 out:"$'\n'"$out"
for want in '{"timestamp":"2026-12-01T11:09:58+00:00","level":"error","logger":"nginx.error","event":"client intended to send too large body: 67108864 bytes","pid":52,"tid":52,"connection":20,"client":"10.0.0.1","server":"localhost","request":"POST /api/orders HTTP/1.1","host":"localhost:8443"}' \
    '"level":"warn","logger":"nginx.error","event":"upstream server temporarily disabled while connecting to upstream"' \
    '"request":"GET /a\\\"b HTTP/1.1","upstream":"http://10.0.0.2:8000/a","host":"localhost"}' \
    '"level":"emerg","logger":"nginx.error","event":"unknown directive \"foo\" in /etc/nginx/nginx.conf:1"}' \
    '{"timestamp":"t","level":"info","logger":"nginx.supervisor","event":"as is"}' \
    '"level":"error","logger":"nginx.stderr","event":"stray text from some tool"}'; do
    grep -qF -- "$want" <<<"$out" || fail "error-log.awk output lacks '$want':"$'\n'"$out"
done

say "a bad setting is refused, naming the variable"
if out=$(run RATE_LIMIT='20r/s; evil' -- nginx -t 2>&1); then
    fail "RATE_LIMIT='20r/s; evil' was accepted"
fi
grep -q 'RATE_LIMIT=' <<<"$out" || fail "the refusal does not name RATE_LIMIT: $out"
if out=$(run WS_CONNECTION_LIMIT=0 -- nginx -t 2>&1); then
    fail "WS_CONNECTION_LIMIT=0 was accepted"
fi
grep -q 'WS_CONNECTION_LIMIT=' <<<"$out" || fail "the refusal does not name WS_CONNECTION_LIMIT: $out"
if out=$(run HSTS_PRELOAD=on -- nginx -t 2>&1); then
    fail "HSTS_PRELOAD=on without includeSubDomains was accepted"
fi
grep -q 'HSTS_PRELOAD=on needs' <<<"$out" || fail "the refusal does not explain HSTS_PRELOAD: $out"
if out=$(run UPSTREAM_WATCH_INTERVAL=0 -- nginx -t 2>&1); then
    fail "UPSTREAM_WATCH_INTERVAL=0 was accepted"
fi
grep -q 'UPSTREAM_WATCH_INTERVAL=' <<<"$out" || fail "the refusal does not name UPSTREAM_WATCH_INTERVAL: $out"

say "a Let's Encrypt layout (live/ links into ../../archive/) mounted as README says"
le="$tmp/letsencrypt"
mkdir -p "$le/archive/example.com" "$le/live/example.com"
openssl req -x509 -new -nodes -days 2 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -subj /CN=example.com -keyout "$le/archive/example.com/privkey1.pem" \
    -out "$le/archive/example.com/fullchain1.pem" 2>/dev/null
chmod -R a+rX "$le"  # README's chgrp 101, without needing root here
for name in fullchain privkey; do
    ln -s "../../archive/example.com/${name}1.pem" "$le/live/example.com/$name.pem"
done
le_run() {  # MOUNT TLS_DIR: nginx -t with the pair at TLS_DIR/{fullchain,privkey}.pem
    docker run --rm --read-only --tmpfs /tmp --cap-drop ALL --network none --add-host app:127.0.0.1 \
        -v "$1" -e "TLS_CERT=$2/fullchain.pem" -e "TLS_KEY=$2/privkey.pem" "$image" nginx -t 2>&1
}
out=$(le_run "$le:/etc/letsencrypt:ro" /etc/letsencrypt/live/example.com) \
    || fail "the README's Let's Encrypt mount does not start:"$'\n'"$out"
grep -qF 'using the certificate at /etc/letsencrypt/live/example.com/fullchain.pem' <<<"$out" \
    || fail "the mounted certificate is not the one used:"$'\n'"$out"
if out=$(le_run "$le/live/example.com:/etc/nginx/certs:ro" /etc/nginx/certs); then
    fail "live/<domain> alone (links pointing nowhere) was accepted"
fi
grep -qF 'is a symbolic link to /etc/nginx/certs/../../archive/example.com/fullchain1.pem, which is not in the container' <<<"$out" \
    || fail "the refusal does not explain the dangling link:"$'\n'"$out"

say "every number at its largest allowed value: nginx takes it"
out=$(run APP_UPSTREAM=127.0.0.1:65535 RATE_LIMIT=1000000000r/s RATE_LIMIT_BURST=1000000000 \
    CLIENT_MAX_BODY_SIZE=1024g HTTPS_REDIRECT_PORT=65535 TLS_SELF_SIGNED_DAYS=36500 \
    CONNECTION_LIMIT=65535 WS_CONNECTION_LIMIT=65535 HSTS_MAX_AGE=999999999 -- nginx -T -q 2>&1) \
    || fail "nginx -T failed with every number at its maximum:"$'\n'"$out"
for want in 'limit_conn per_client_conn 65535;' 'limit_conn per_client_ws 65535;' \
    'rate=1000000000r/s;' 'burst=1000000000 nodelay;' 'client_max_body_size 1024g;' \
    'proxy_request_buffering off;' 'server 127.0.0.1:65535;' 'https://$host:65535$request_uri;'; do
    grep -qF -- "$want" <<<"$out" || fail "the rendered config lacks '$want'"
done

say "every number one past its range (or malformed) is refused at start, naming the variable"
# Each of these once started the entrypoint and then made nginx refuse its config
# (or overflow): a restart loop instead of one line.
for bad in CONNECTION_LIMIT=65536 WS_CONNECTION_LIMIT=65536 CONNECTION_LIMIT=0 \
    APP_UPSTREAM=app:65536 APP_UPSTREAM=app:0 RATE_LIMIT=1000000001r/s RATE_LIMIT_BURST=1000000001 \
    CLIENT_MAX_BODY_SIZE=1025g CLIENT_MAX_BODY_SIZE=08m CLIENT_MAX_BODY_SIZE=99999999999999999999 \
    HTTPS_REDIRECT_PORT=65536 TLS_SELF_SIGNED_DAYS=36501 HSTS_MAX_AGE=1000000000 \
    RATE_LIMIT_BURST=-1; do
    name=${bad%%=*}
    if out=$(run "$bad" -- nginx -t 2>&1); then
        fail "$bad was accepted"
    fi
    grep -q "\"level\":\"error\".*$name='${bad#*=}' is \(out of range\|invalid\): expected" <<<"$out" \
        || fail "the refusal of $bad does not name $name:"$'\n'"$out"
    grep -q 'nginx: \[emerg\]' <<<"$out" && fail "$bad reached nginx:"$'\n'"$out"
done

say "ok ($image)"
