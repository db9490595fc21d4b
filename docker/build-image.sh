#!/usr/bin/env bash
# Builds the `ballast` Docker image from scratch (no registry, no base image): a rootfs with
# the release binary, the shared libraries it links (from this machine), and a default
# config, then `docker build` with docker/Dockerfile.
#
#   bash docker/build-image.sh [TAG]        # default tag: ballast:latest
#   docker run --rm -p 8080:8080 ballast:latest demo --bind 0.0.0.0:8080
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-ballast:latest}
cargo build --release --quiet
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ballast" "$root/tmp"
cp target/release/ballast "$root/usr/local/bin/"
# The dynamic loader and every library the binary needs, at the same paths.
for lib in $(ldd target/release/ballast | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp docker/ballast.toml "$root/etc/ballast/ballast.toml"
cp docker/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$tag" "$ctx"
echo "built $tag"
