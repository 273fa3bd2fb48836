#!/usr/bin/env bash
# `make test-docker`: the image built and run for real, on this machine, with a Docker daemon of
# our own. No registry is reachable here, so the base image is made from Debian's packages
# (debootstrap of this machine's release, cached between runs) and every image is built locally.
#
# The daemon: no bridge, no firewall rules, its own data root, exec root, pidfile and socket in a
# temporary folder; every build and container uses the host's network, so all traffic stays on
# loopback. Whatever happens (pass, fail, SIGTERM from CI's timeout) the trap removes the
# containers, stops the daemon by its pid, unmounts what it left and deletes the folder.
#
# Usage: tests/docker/run.sh [PYTHON]   (a Python with the test extras; make passes the venv's)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
DOCKERD=${DOCKERD:-$(command -v dockerd || echo /usr/sbin/dockerd)}
# Debian's CLI matches Debian's daemon (20.10); a newer CLI elsewhere on PATH needs buildx for
# BuildKit builds.
DOCKER=${DOCKER:-$([ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker)}
RELEASE=$(. /etc/os-release && echo "$VERSION_CODENAME")
ARCH=$(dpkg --print-architecture)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/batchproxy
# Bump the suffix when the package list changes, so an old cached base is not reused.
BASE_TAR=$CACHE/base-$RELEASE-$ARCH-v1.tar
BASE_PACKAGES=python3,python3-venv,passwd,ca-certificates

WORK=$(mktemp -d /tmp/batchproxy-docker.XXXXXX)
DOCKERD_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    # Containers first, so that no shim outlives the daemon.
    ids=$("$DOCKER" ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  # Overlay and shm mounts the daemon may have left under its roots, deepest first.
  awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# A machine that cannot run this test says why; CI (.ci/run) names a file for the reason
# and then skips this step rather than failing.
cannot() {
  echo "test-docker: $1" >&2
  [ -z "${TEST_DOCKER_SKIP_FILE:-}" ] || echo "$1" >"$TEST_DOCKER_SKIP_FILE"
  exit 3
}
need() { command -v "$1" >/dev/null || cannot "$1 is missing ($2)"; }
need debootstrap "apt-get install debootstrap"
need docker-compose "apt-get install docker-compose"
[ -x "$DOCKERD" ] || cannot "no dockerd (apt-get install docker.io)"
[ -x "$PY" ] || { echo "test-docker: no Python at $PY" >&2; exit 3; }

# -- the base image's root file system, made once per machine and release --------------------
if [ ! -s "$BASE_TAR" ]; then
  echo "test-docker: making the $RELEASE base with debootstrap (cached in $BASE_TAR)"
  mkdir -p "$CACHE"
  rootfs=$WORK/rootfs
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$RELEASE" "$rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # The same apt settings as this machine's (a mirror whose Release files may be older than
  # their Valid-Until), so the builds' apt-get works wherever this machine's does.
  cp /etc/apt/apt.conf.d/99artifact-registry "$rootfs/etc/apt/apt.conf.d/" 2>/dev/null || true
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.part" .
  mv "$BASE_TAR.part" "$BASE_TAR"
  rm -rf "$rootfs"
else
  echo "test-docker: cached base $BASE_TAR"
fi

# -- our own daemon ---------------------------------------------------------------------------
mkdir -p "$WORK/data" "$WORK/exec"
# The data root in memory where the kernel allows it: builds write many small files, and the
# folder goes in one unmount instead of a long rm -rf. (Pages are used only as written.)
mount -t tmpfs -o size=12g,mode=0711 batchproxy-docker "$WORK/data" 2>/dev/null || true
"$DOCKERD" --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --host "unix://$WORK/docker.sock" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$WORK/docker.sock
for _ in $(seq 1 60); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || break
  sleep 0.5
done
if ! "$DOCKER" version >/dev/null 2>&1; then
  echo "test-docker: dockerd did not start; its log ends:" >&2
  tail -15 "$WORK/dockerd.log" >&2
  # CI (.ci/run) names a file for the reason, and then skips this step rather than failing.
  if [ -n "${TEST_DOCKER_SKIP_FILE:-}" ]; then
    reason=$(grep -m1 -iE 'level=(fatal|error)' "$WORK/dockerd.log" || tail -1 "$WORK/dockerd.log")
    echo "dockerd could not start here: ${reason:-it exited and logged nothing}" \
      >"$TEST_DOCKER_SKIP_FILE"
  fi
  exit 3
fi

BASE_IMAGE=batchproxy-base:$RELEASE
"$DOCKER" import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
# The build stage's base: the same with the compiler and Python's headers, saved after the
# first run, so later runs skip that apt-get.
BUILD_TAR=$CACHE/build-base-$RELEASE-$ARCH-v1.tar
BUILD_IMAGE=batchproxy-build-base:$RELEASE
if [ -s "$BUILD_TAR" ] && "$DOCKER" load -q -i "$BUILD_TAR" >/dev/null; then
  echo "test-docker: cached build base $BUILD_TAR"
else
  printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends %s && %s\n' \
    "$BASE_IMAGE" "build-essential python3-dev" "rm -rf /var/lib/apt/lists/*" |
    DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host -t "$BUILD_IMAGE" - >/dev/null
  "$DOCKER" save -o "$BUILD_TAR.part" "$BUILD_IMAGE"
  mv "$BUILD_TAR.part" "$BUILD_TAR"
fi
export BATCHPROXY_DOCKER_TEST=1 BATCHPROXY_DOCKER_BASE=$BASE_IMAGE BATCHPROXY_DOCKER=$DOCKER \
  BATCHPROXY_DOCKER_WORK=$WORK BATCHPROXY_DOCKER_BUILD_BASE=$BUILD_IMAGE
"$PY" -m pytest tests/docker -p no:cacheprovider -v -rA
# The image's size and largest layers (README, "Deploying").
"$DOCKER" image ls batchproxy
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' batchproxy:0.1.0 | cut -c1-150
