#!/usr/bin/env bash
# Builds the base image locally from Debian's packages, for machines that cannot pull from a
# container registry: Debian bookworm (minbase) with python3, python3-venv and ca-certificates,
# imported into podman as $1 (default localhost/deploy-base:bookworm). Elsewhere the Containerfiles
# build FROM the public python:3.11-slim-bookworm instead (their BASE build argument).
set -euo pipefail
tag=${1:-localhost/deploy-base:bookworm}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
  bookworm "$out/rootfs.tar" http://deb.debian.org/debian
podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$out/rootfs.tar" "$tag" >/dev/null
echo "$tag: $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
