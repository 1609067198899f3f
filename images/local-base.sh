#!/usr/bin/env bash
# Make a local stand-in for python:3.11-slim-bookworm where no image registry is reachable (CI, these machines):
# Debian bookworm minbase with python3 (3.11), python3-venv and ca-certificates, bootstrapped from the Debian
# mirror that apt uses and imported into the engine at $DOCKER_HOST. Skips the work when the tag already exists.
#
#   images/local-base.sh [TAG]          # default TAG: refine-local/debian-python:3.11-bookworm-1
#
# Then build an image on it: images/build.sh cpu --base TAG ... (see images/README.md).
# Needs root and debootstrap (apt-get install debootstrap). Takes about a minute; the result is about 300 MB.
set -euo pipefail

TAG="${1:-refine-local/debian-python:3.11-bookworm-1}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates

say() { echo "local-base: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "no docker client on PATH"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker engine answers at ${DOCKER_HOST:-the default socket} (start one: .ci/docker-engine.sh start)"
if docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG exists"
    exit 0
fi
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap missing (apt-get install debootstrap)"

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    # The mirror apt already uses on this machine (deb822 .sources, then one-line .list files).
    mirror="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
    [[ -n "$mirror" ]] || mirror="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '$3 == "bookworm" {print $2}' | head -n1 || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
fi

rootfs="$(mktemp -d /tmp/refine-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
say "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
start=$SECONDS
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    die "debootstrap failed"
fi
rm -f "$rootfs.log"
# Nothing of this host in the image: the engine mounts its own resolv.conf/hostname/hosts at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
: >"$rootfs/etc/machine-id"
say "importing as $TAG"
# docker import gives an image without config: set what python:3.11-slim sets (PATH above all, or RUN in a build
# starts with an empty one).
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
say "$TAG ready in $((SECONDS - start))s ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
