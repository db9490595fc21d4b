#!/usr/bin/env bash
# Builds the `ballast` Docker image FROM scratch (no registry, no base image): a rootfs with
# the stripped release binary, the shared libraries it links (taken from this machine),
# /etc/passwd and /etc/group naming the unprivileged user 10001, and a default config; then
# `docker build` with docker/Dockerfile. The same image runs the demo replica of the
# compose blueprint (`ballast demo-backend`).
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
chmod 1777 "$root/tmp"
# The release profile keeps line tables for profiling; the image does not need them.
objcopy --strip-debug target/release/ballast "$root/usr/local/bin/ballast"
# The dynamic loader and every library the binary needs, at the same paths.
for lib in $(ldd target/release/ballast | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/sbin/nologin\nballast:x:10001:10001:ballast:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nballast:x:10001:\n' >"$root/etc/group"
cp docker/ballast.toml "$root/etc/ballast/ballast.toml"
# ACME's default storage, owned by the image's user (Dockerfile: COPY --chown), so that a
# named volume mounted there starts out writable (docker/compose.acme.yml).
mkdir -p "$ctx/state/acme"
chmod 700 "$ctx/state/acme"
cp docker/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
