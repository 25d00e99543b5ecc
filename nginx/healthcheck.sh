#!/bin/bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx-healthcheck: GET /nginx-health on :8080, healthy on 204            │
# └──────────────────────────────────────────────────────────────────────────┘
# Neither the official nginx image nor its Debian look-alike is guaranteed to
# have curl or wget; bash (Essential in Debian) is in both, and its /dev/tcp
# speaks enough HTTP/1.0 for one status line. No extra package, no TLS cost.
# https://www.gnu.org/software/bash/manual/bash.html#Redirections
# https://docs.docker.com/reference/dockerfile/#healthcheck
set -eu

port=${NGINX_HEALTH_PORT:-8080}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /nginx-health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
IFS=' ' read -r -t 3 _proto status _reason <&3 || exit 1
[ "$status" = 204 ] || { echo "nginx-health answered '${status:-nothing}'" >&2; exit 1; }
