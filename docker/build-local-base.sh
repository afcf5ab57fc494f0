#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim on a machine that reaches Debian's mirror but no
# container registry: debootstrap Debian bookworm (its python3 is 3.11) and import it with buildah.
#
#   docker/build-local-base.sh            # makes localhost/vllm-gateway-base:bookworm once
#   BASE_IMAGE=... MIRROR=... docker/build-local-base.sh
#
# Then: buildah bud --build-arg BASE=localhost/vllm-gateway-base:bookworm -f docker/Dockerfile .
# Idempotent: an existing image is left alone (delete it with `buildah rmi` to rebuild).
# Needs root, debootstrap and buildah (apt-get install debootstrap buildah).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/vllm-gateway-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# python3-venv brings ensurepip, so the Dockerfile's `python3 -m venv` gets a pip of its own;
# ca-certificates lets that pip reach PyPI over TLS.
PACKAGES=${PACKAGES:-python3,python3-venv,python3-pip,ca-certificates}

if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "build-local-base: $BASE_IMAGE exists, nothing to do"
    exit 0
fi
for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { echo "build-local-base: $tool missing" >&2; exit 1; }
done

work=$(mktemp -d /tmp/vllm-gateway-base.XXXXXX)
ctr=
cleanup() {
    if [[ -n $ctr ]]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

rootfs=$work/rootfs
echo "build-local-base: debootstrap $SUITE ($PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# What python:3.11-slim also leaves out: apt's caches and package lists, docs, man pages.
# The host's pip configuration is not copied (debootstrap never does): pip in the image talks
# to plain PyPI, never to a host-only file:// index.
rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs"/root/.cache
# debootstrap copies the host's resolv.conf and hostname; a container gets its own at run time.
: >"$rootfs/etc/resolv.conf"
rm -f "$rootfs/etc/hostname"

tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .
ctr=$(buildah from scratch)
buildah add "$ctr" "$work/rootfs.tar" / >/dev/null   # a local tar archive is unpacked
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label org.opencontainers.image.description="Debian $SUITE minbase with python3 (local base for vllm-gateway)" \
    "$ctr"
buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
ctr=
echo "build-local-base: built $BASE_IMAGE"
buildah images "$BASE_IMAGE"
