#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ A Swarm node in a container: Debian's dockerd (localbase/swarm-node)     │
# └──────────────────────────────────────────────────────────────────────────┘
# For tests/e2e/test_swarm_nodes.py only. The container gets every capability
# but CAP_SYS_RESOURCE (missing from the bounding set of the machine we test
# on, so `--privileged` is refused there), no seccomp or AppArmor profile, and
# read-only /sys and cgroup mounts from Docker: they are made writable here, in
# the container's own mount namespace, so the inner dockerd can make its
# containers' cgroups below this container's. The engine API listens on :2375
# without TLS, on the test's own bridge network only.
# https://docs.docker.com/engine/daemon/
set -eu
mount -o remount,rw /sys
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    # cgroup v2: a private namespace; move our processes to a child cgroup so the
    # controllers can be delegated to the inner containers' cgroups.
    mount -o remount,rw /sys/fs/cgroup
    mkdir -p /sys/fs/cgroup/node
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/node/cgroup.procs 2>/dev/null || true
    sed 's/\([a-z]*\)/+\1/g' /sys/fs/cgroup/cgroup.controllers >/sys/fs/cgroup/cgroup.subtree_control
else
    for hierarchy in /sys/fs/cgroup/*; do
        mount -o remount,bind,rw "$hierarchy"
    done
fi
exec dockerd --host unix:///var/run/docker.sock --host tcp://0.0.0.0:2375 --tls=false "$@"
