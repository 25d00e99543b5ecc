#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Local base images from Debian trixie packages (no registry needed)       │
# └──────────────────────────────────────────────────────────────────────────┘
# This machine (and CI) cannot pull from a registry, so we build look-alikes of the
# official base images with mmdebstrap and `docker import` them:
#
#   localbase/python:trixie          ~ python:3.13-slim                (python3, python3 -m venv)
#   localbase/nginx:trixie           ~ nginx:1.27                      (user nginx 101:101, no default site)
#   localbase/prometheus:trixie      ~ prom/prometheus                 (prometheus, promtool, user nobody)
#   localbase/nginx-exporter:trixie  ~ nginx/nginx-prometheus-exporter (nginx-prometheus-exporter on PATH)
#   localbase/alertmanager:trixie    ~ prom/alertmanager               (alertmanager, amtool, user nobody)
#   localbase/blackbox-exporter:trixie ~ prom/blackbox-exporter        (blackbox_exporter on PATH)
#   localbase/acme:trixie            ~ python:3.13-slim + Debian's lego and openssl
#                                      (what acme/Dockerfile installs on the official image)
#   localbase/pebble:trixie          Debian's pebble + pebble-challtestsrv: the test ACME CA
#                                      of the e2e tests (tests/e2e/acme/), never deployed
#   localbase/swarm-node:trixie      Debian's docker.io: Swarm nodes in containers for the
#                                      multi-node e2e test; built only when named
#
# The same Dockerfiles build on these and on the official images; they are passed as
# build args (PYTHON_IMAGE, NGINX_IMAGE, PROMETHEUS_IMAGE, NGINX_EXPORTER_IMAGE,
# ALERTMANAGER_IMAGE, BLACKBOX_EXPORTER_IMAGE, ACME_BASE_IMAGE).
#
# Cache: every image is also tagged `localbase/<name>:recipe-<hash>`, the hash covering
# its recipe (package list, hooks, image config) and the common build options. When that
# tag exists and `:trixie` points at it, the build is skipped (~1 s for all four).
# Change a recipe and only that image is rebuilt. --force rebuilds anyway (e.g. to pick
# up a Debian point release).
#
# Usage: scripts/base-images.sh [--force] [--jobs N] [name ...]
#        (names: python nginx prometheus nginx-exporter alertmanager blackbox-exporter acme
#         pebble; swarm-node only when named)
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian)
#        DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security)
#        BASE_IMAGES_JOBS (parallel builds, default 2: the work is mostly download + dpkg)
# Docs:  https://manpages.debian.org/trixie/mmdebstrap/mmdebstrap.1.en.html
#        https://docs.docker.com/reference/cli/docker/image/import/
set -euo pipefail

SUITE=trixie
KEEP_RECIPES=4  # cache tags kept per image (ours and the 3 newest others)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
JOBS=${BASE_IMAGES_JOBS:-2}
FORCE=0
ALL_IMAGES=(python nginx prometheus nginx-exporter alertmanager blackbox-exporter acme pebble)

log() { printf '[base-images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ── recipes ──────────────────────────────────────────────────────────────────
# Each recipe_<name> prints, one per line:
#   pkg <debian package>          packages to --include
#   hook <shell command>          mmdebstrap --customize-hook ("$1" is the root dir)
#   change <Dockerfile line>      docker import --change
# Anything in a recipe (or in the common options below) changes the cache hash.

PATH_DEFAULT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

recipe_python() {
    # python:3.13-slim: python3 (+ `python`), venv/ensurepip, CA bundle, C.UTF-8.
    echo "pkg python3"
    echo "pkg python3-venv"
    echo "pkg python-is-python3"
    echo "pkg ca-certificates"
    echo "change ENV PATH=$PATH_DEFAULT"
    echo "change ENV LANG=C.UTF-8"
    echo 'change CMD ["python3"]'
}

recipe_nginx() {
    # nginx:1.27: user/group nginx 101:101, `user nginx;`, conf.d/ and no default
    # site, logs to the container's stdout/stderr, /var/cache/nginx owned by nginx.
    echo "pkg nginx"
    echo "pkg openssl"
    echo "pkg ca-certificates"
    echo 'hook echo "nginx:x:101:" >> "$1/etc/group"'
    echo 'hook echo "nginx:!::" >> "$1/etc/gshadow"'
    echo 'hook echo "nginx:x:101:101:nginx user:/nonexistent:/usr/sbin/nologin" >> "$1/etc/passwd"'
    echo 'hook echo "nginx:!:20000::::::" >> "$1/etc/shadow"'
    echo 'hook rm -f "$1"/etc/nginx/sites-enabled/* "$1"/var/www/html/index.nginx-debian.html'
    echo 'hook sed -i "s/^user www-data;/user nginx;/" "$1/etc/nginx/nginx.conf"'
    echo 'hook mkdir -p "$1/etc/nginx/conf.d" "$1/var/cache/nginx" "$1/var/log/nginx"'
    echo 'hook chown 101:101 "$1/var/cache/nginx"'
    echo 'hook ln -sf /dev/stdout "$1/var/log/nginx/access.log"'
    echo 'hook ln -sf /dev/stderr "$1/var/log/nginx/error.log"'
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change EXPOSE 80'
    # (docker import cannot set STOPSIGNAL: nginx/Dockerfile sets SIGQUIT itself.)
    echo 'change CMD ["nginx", "-g", "daemon off;"]'
}

recipe_prometheus() {
    # prom/prometheus: runs as nobody in /prometheus with the default config.
    echo "pkg prometheus"
    echo "pkg ca-certificates"
    echo 'hook mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"'
    # Debian's packaging keeps the web UI out of the binary's default path; drop the
    # node-exporter-style init bits that a container never uses.
    echo 'hook rm -rf "$1/etc/init.d" "$1/etc/default/prometheus"'
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change USER nobody'
    echo 'change WORKDIR /prometheus'
    echo 'change EXPOSE 9090'
    echo 'change VOLUME ["/prometheus"]'
    echo 'change ENTRYPOINT ["/usr/bin/prometheus"]'
    echo 'change CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
}

recipe_nginx-exporter() {
    # nginx/nginx-prometheus-exporter: the upstream binary name, runs as nobody.
    echo "pkg prometheus-nginx-exporter"
    echo 'hook ln -sf prometheus-nginx-exporter "$1/usr/bin/nginx-prometheus-exporter"'
    echo 'hook rm -rf "$1/etc/init.d" "$1/etc/default/prometheus-nginx-exporter"'
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change USER nobody'
    echo 'change EXPOSE 9113'
    echo 'change ENTRYPOINT ["/usr/bin/nginx-prometheus-exporter"]'
}

recipe_alertmanager() {
    # prom/alertmanager: the upstream binary name (Debian calls it prometheus-alertmanager),
    # amtool, /bin/sh for the entrypoint, runs as nobody with its data in /alertmanager.
    echo "pkg prometheus-alertmanager"
    echo "pkg ca-certificates"
    echo 'hook ln -sf prometheus-alertmanager "$1/usr/bin/alertmanager"'
    echo 'hook mkdir -p "$1/alertmanager" && chown 65534:65534 "$1/alertmanager"'
    echo 'hook rm -rf "$1/etc/init.d" "$1/etc/default/prometheus-alertmanager"'
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change USER nobody'
    echo 'change WORKDIR /alertmanager'
    echo 'change EXPOSE 9093'
    echo 'change VOLUME ["/alertmanager"]'
    echo 'change ENTRYPOINT ["/usr/bin/alertmanager"]'
    echo 'change CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]'
}

recipe_blackbox-exporter() {
    # prom/blackbox-exporter: the upstream binary name, runs as nobody; the config is
    # mounted by docker-compose.yml (monitoring/blackbox/blackbox.yml).
    echo "pkg prometheus-blackbox-exporter"
    echo "pkg ca-certificates"
    echo 'hook ln -sf prometheus-blackbox-exporter "$1/usr/bin/blackbox_exporter"'
    echo 'hook rm -rf "$1/etc/init.d" "$1/etc/default/prometheus-blackbox-exporter"'
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change USER nobody'
    echo 'change EXPOSE 9115'
    echo 'change ENTRYPOINT ["/usr/bin/blackbox_exporter"]'
    echo 'change CMD ["--config.file=/etc/blackbox_exporter/config.yml"]'
}

recipe_acme() {
    # python:3.13-slim plus the two packages acme/Dockerfile installs when they are
    # missing (lego, the ACME client; openssl, to read certificates), so that build
    # needs no package download here.
    recipe_python
    echo "pkg lego"
    echo "pkg openssl"
}

recipe_pebble() {
    # Let's Encrypt's test CA and its DNS/challenge test server, for the e2e tests only:
    # `pebble` and `pebble-challtestsrv` on PATH, run as nobody.
    echo "pkg pebble"
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change USER nobody'
    echo 'change CMD ["pebble", "-h"]'
}

recipe_swarm-node() {
    # A Docker Engine from Debian's docker.io, to run as a Swarm node in a container:
    # the multi-node e2e test (tests/e2e/test_swarm_nodes.py), never deployed. Not in
    # ALL_IMAGES: that test builds it on demand.
    echo "pkg docker.io"
    echo "change ENV PATH=$PATH_DEFAULT"
    echo 'change CMD ["dockerd"]'
}

# ── common mmdebstrap options (part of every image's hash) ──────────────────
# minbase + --include keeps only Essential + what the recipe names; dpkg path
# excludes keep docs, man pages and translations out (copyright files stay); the
# final hooks drop logs and stale state. Apt lists and caches and /tmp are left to
# mmdebstrap's own cleanup, which runs after the hooks: a hook that emptied /tmp removed
# mmdebstrap's apt config, and its `apt-get clean` then ran on the host's apt cache
# (failing whenever the host's apt was busy).
common_mmdebstrap_args() {
    printf '%s\n' \
        --variant=minbase \
        --format=tar \
        '--aptopt=APT::Install-Recommends "false"' \
        '--aptopt=APT::Install-Suggests "false"' \
        '--aptopt=Acquire::Retries "3"' \
        '--dpkgopt=path-exclude=/usr/share/man/*' \
        '--dpkgopt=path-exclude=/usr/share/doc/*' \
        '--dpkgopt=path-include=/usr/share/doc/*/copyright' \
        '--dpkgopt=path-exclude=/usr/share/info/*' \
        '--dpkgopt=path-exclude=/usr/share/locale/*' \
        '--dpkgopt=path-exclude=/usr/share/lintian/*' \
        '--dpkgopt=path-exclude=/usr/share/bug/*' \
        '--customize-hook=rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
        '--customize-hook=find "$1/var/log" -type f -delete' \
        '--customize-hook=rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"; rm -rf "$1"/var/tmp/*'
}

recipe_of() {
    local name=$1
    declare -F "recipe_$name" >/dev/null || die "unknown image '$name' (known: ${ALL_IMAGES[*]})"
    "recipe_$name"
}

recipe_hash() {
    # Hash the recipe's output, the common options, the suite and the mirrors:
    # any change there rebuilds that image.
    local name=$1
    {
        echo "suite $SUITE $MIRROR $SECURITY_MIRROR"
        common_mmdebstrap_args
        recipe_of "$name"
    } | sha256sum | cut -c1-12
}

elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

build_one() {
    local name=$1
    local hash repo tag cache_tag start
    hash=$(recipe_hash "$name")
    repo="localbase/$name"
    tag="$repo:$SUITE"
    cache_tag="$repo:recipe-$hash"
    start=$(date +%s.%N)

    if [[ $FORCE -eq 0 ]]; then
        local cached current
        cached=$(image_id "$cache_tag")
        current=$(image_id "$tag")
        if [[ -n $cached ]]; then
            [[ $cached == "$current" ]] || docker tag "$cache_tag" "$tag"
            printf '%s\tcached\t%s\t%s\n' "$tag" "$(elapsed "$start")" "$hash"
            return 0
        fi
    fi

    local -a args includes changes
    mapfile -t args < <(common_mmdebstrap_args)
    # root: chroot directly; anyone else: user namespaces (needs /etc/subuid). Same output.
    if [[ $(id -u) -eq 0 ]]; then args+=(--mode=root); else args+=(--mode=unshare); fi
    local kind rest
    while IFS=' ' read -r kind rest; do
        case $kind in
            pkg) includes+=("$rest") ;;
            hook) args+=("--customize-hook=$rest") ;;
            change) changes+=(--change "$rest") ;;
            *) die "bad recipe line for $name: $kind $rest" ;;
        esac
    done < <(recipe_of "$name")
    local IFS_old=$IFS
    IFS=,
    args+=("--include=${includes[*]}")
    IFS=$IFS_old

    local logfile="$CACHE_DIR/$name.log"
    log "building $tag (recipe $hash), log: $logfile"
    # mmdebstrap writes the root filesystem as a tar to stdout; docker import reads it
    # from stdin, so nothing is unpacked on the host.
    if ! mmdebstrap "${args[@]}" "$SUITE" - \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" 2>"$logfile" |
        docker import "${changes[@]}" \
            --change "LABEL localbase.recipe=$hash localbase.suite=$SUITE org.opencontainers.image.description=\"localbase/$name from Debian $SUITE packages (scripts/base-images.sh)\"" \
            --message "localbase $name recipe-$hash from Debian $SUITE" \
            - "$cache_tag" >>"$logfile"; then
        tail -n 30 "$logfile" >&2
        # docker import may have tagged what it read before mmdebstrap failed (an empty
        # image): drop it, or the next run would take it for the cached build.
        docker image rm "$cache_tag" >/dev/null 2>&1 || true
        die "building $tag failed (full log: $logfile)"
    fi
    docker tag "$cache_tag" "$tag"
    # Keep the KEEP_RECIPES newest cache tags per image, drop older ones (their layers go
    # with them). Not just ours: other checkouts on this host (a branch behind or ahead)
    # use theirs, and deleting them made each rebuild the other's, minutes every test run.
    local old
    for old in $(docker image ls --format '{{.CreatedAt}}|{{.Repository}}:{{.Tag}}' "$repo" |
        grep ":recipe-" | grep -v ":recipe-$hash$" | sort -r | tail -n +"$KEEP_RECIPES" |
        cut -d'|' -f2 || true); do
        docker image rm "$old" >/dev/null 2>&1 || true
    done
    printf '%s\tbuilt\t%s\t%s\n' "$tag" "$(elapsed "$start")" "$hash"
}

ensure_tools() {
    command -v docker >/dev/null || die "docker is required"
    command -v mmdebstrap >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "mmdebstrap missing and not root: run 'sudo apt-get install mmdebstrap'"
    log "installing mmdebstrap (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mmdebstrap debian-archive-keyring >&2
}

main() {
    local -a names=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --force) FORCE=1 ;;
            --jobs) JOBS=$2; shift ;;
            --hash) recipe_hash "$2"; return 0 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
            -*) die "unknown option $1" ;;
            *) names+=("$1") ;;
        esac
        shift
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${ALL_IMAGES[@]}")
    for n in "${names[@]}"; do recipe_of "$n" >/dev/null; done

    ensure_tools

    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    CACHE_DIR=${BASE_IMAGES_CACHE:-$ROOT/.cache/base-images}
    mkdir -p "$CACHE_DIR"
    [[ -f $ROOT/.cache/.gitignore ]] || echo '*' >"$ROOT/.cache/.gitignore"  # the cache is never committed
    export CACHE_DIR FORCE SUITE MIRROR SECURITY_MIRROR

    local start results rc=0
    start=$(date +%s.%N)
    results=$(mktemp)
    # Builds run $JOBS at a time (2 cores: mmdebstrap is download- and dpkg-bound).
    local -a pids=()
    local n
    for n in "${names[@]}"; do
        while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || rc=1; done
        build_one "$n" >>"$results" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done

    printf '%-34s %-7s %8s  %s\n' IMAGE RESULT SECONDS RECIPE >&2
    sort "$results" | while IFS=$'\t' read -r tag res secs hash; do
        printf '%-34s %-7s %8s  %s  %s\n' "$tag" "$res" "$secs" "$hash" \
            "$(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')" >&2
    done
    printf 'total %s s\n' "$(elapsed "$start")" >&2
    rm -f "$results"
    return $rc
}

main "$@"
