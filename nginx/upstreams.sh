#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx-upstreams: the app addresses nginx sends requests to, one per line │
# └──────────────────────────────────────────────────────────────────────────┘
# `ip:port` of every server in the running `upstream app`, as the supervisor last
# applied it (rendered, `nginx -t`, reloaded, new workers up). An interface:
#   docker compose exec -T nginx nginx-upstreams
# `make deploy` waits on it. Exit 0; exit 1 (and nothing printed) before the supervisor
# has applied a first set.
set -eu
file=/tmp/nginx/upstreams
[ -r "$file" ] || { echo "nginx-upstreams: no upstream applied yet ($file)" >&2; exit 1; }
exec cat "$file"
