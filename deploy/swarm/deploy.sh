#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Deploy (or update) the stack on a Swarm manager, certificate versioned   │
# └──────────────────────────────────────────────────────────────────────────┘
# Swarm configs and secrets cannot change in place, so the certificate and key
# get names that carry a hash of their content (TLS_VERSION): a new certificate
# is a new config/secret pair and a rolling update of nginx. Old pairs of this
# stack are removed once nothing uses them. The images must exist on every node
# (or in a registry the nodes reach): `docker compose build app nginx`, then
# push; a stack cannot build.
#
# Usage: deploy/swarm/deploy.sh [STACK_NAME]     (default: asgi-stack)
# Env:   TLS_CERT_FILE, TLS_KEY_FILE  the PEM chain and key nginx serves (required)
#        APP_IMAGE, NGINX_IMAGE_NAME, APP_VERSION, and every setting docker-compose.yml
#        reads (.env.example), passed to the services by name (deploy/swarm/stack.yml).
# https://docs.docker.com/engine/swarm/configs/  https://docs.docker.com/engine/swarm/secrets/
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STACK_NAME=${1:-${STACK_NAME:-asgi-stack}}
export STACK_NAME

log() { printf '{"logger":"swarm.deploy","stack":"%s","event":"%s"}\n' "$STACK_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $STACK_NAME =~ ^[a-z0-9][a-z0-9_-]{0,40}$ ]] \
    || die "STACK_NAME='$STACK_NAME' is invalid: expected lower-case letters, digits, - or _"
state=$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}')
[[ $state == "active true" ]] || die "this engine is not a Swarm manager (state: $state): docker swarm init"
for var in TLS_CERT_FILE TLS_KEY_FILE; do
    [[ -n ${!var:-} ]] || die "$var is not set: the PEM file nginx serves"
    [[ -r ${!var} ]] || die "$var='${!var}' is not a readable file"
done
grep -q "BEGIN CERTIFICATE" "$TLS_CERT_FILE" || die "TLS_CERT_FILE='$TLS_CERT_FILE' holds no PEM certificate"
grep -q "PRIVATE KEY" "$TLS_KEY_FILE" || die "TLS_KEY_FILE='$TLS_KEY_FILE' holds no PEM private key"

app_image=${APP_IMAGE:-asgi-stack/app}:${APP_VERSION:-dev}
nginx_image=${NGINX_IMAGE_NAME:-asgi-stack/nginx}:${APP_VERSION:-dev}
for image in "$app_image" "$nginx_image"; do
    docker image inspect "$image" >/dev/null 2>&1 \
        || log "warning: $image is not on this node: every node must pull it from a registry"
done

# As docker-compose.yml: redirects from :80 name the port clients use for HTTPS.
export HTTPS_REDIRECT_PORT=${HTTPS_REDIRECT_PORT:-${HTTPS_PORT:-443}}

TLS_VERSION=$(cat "$TLS_CERT_FILE" "$TLS_KEY_FILE" | sha256sum | cut -c1-12)
export TLS_VERSION
log "deploying $app_image and $nginx_image, certificate version $TLS_VERSION"
docker stack deploy --prune --resolve-image never -c "$here/stack.yml" "$STACK_NAME" >&2

# Earlier certificate versions of this stack: removed when no service uses them any more
# (Docker refuses while one does; the next deploy tries again).
for kind in config secret; do
    docker "$kind" ls --filter "label=com.docker.stack.namespace=$STACK_NAME" --format '{{.Name}}' \
        | { grep -v "_$TLS_VERSION\$" || true; } \
        | while read -r old; do
            docker "$kind" rm "$old" >/dev/null 2>&1 && log "removed $kind $old" || true
        done
done
log "deployed"
