#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Alertmanager's entrypoint: the receivers' URLs from the environment      │
# └──────────────────────────────────────────────────────────────────────────┘
# ALERTMANAGER_WEBHOOK_URL (required): where alerts go, an http(s) URL.
# ALERTMANAGER_HEARTBEAT_URL (optional, default: the webhook URL): where the
# always-firing Watchdog goes, e.g. a dead man's switch service.
# Each is validated and written to a file on the tmpfs that alertmanager.yml
# reads (url_file); a bad one stops start-up with exit 78 (EX_CONFIG) and a
# JSON line naming the variable. The value itself is never printed: webhook
# URLs often carry a secret token. POSIX sh: the official image has busybox.
set -eu

fail() {
    printf '{"level":"critical","logger":"alertmanager.entrypoint","event":"%s"}\n' "$1"
    exit 78
}

check_url() {
    case $2 in
        "") fail "$1 is not set: expected the http(s) URL of the webhook that receives alerts" ;;
        *[[:space:][:cntrl:]\"\'\\]*)
            fail "$1 is invalid: expected an http(s) URL without spaces, quotes or backslashes" ;;
        http://?* | https://?*) ;;
        *) fail "$1 is invalid: expected an http:// or https:// URL" ;;
    esac
}

webhook=${ALERTMANAGER_WEBHOOK_URL:-}
heartbeat=${ALERTMANAGER_HEARTBEAT_URL:-$webhook}
check_url ALERTMANAGER_WEBHOOK_URL "$webhook"
check_url ALERTMANAGER_HEARTBEAT_URL "$heartbeat"

umask 077
mkdir -p /tmp/alertmanager
printf '%s' "$webhook" >/tmp/alertmanager/webhook-url
printf '%s' "$heartbeat" >/tmp/alertmanager/heartbeat-url

exec alertmanager "$@"
