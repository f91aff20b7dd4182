#!/usr/bin/env bash
# Build the service's image: docker/build.sh [docker build arguments, e.g. --build-arg WITH_RAY=true].
# Tags $SERVER_IMAGE (default sd-server:latest). Before building, it
#   - copies the host's pip inputs into docker/build-extras (the CA bundle of PIP_CERT or pip.conf's cert, the wheels in
#     the folders of PIP_FIND_LINKS or find-links), so that a build behind a TLS-inspecting proxy or without a torch
#     index works as pip does here;
#   - makes debian:bookworm-slim from Debian's mirror with debootstrap when no registry can be reached to pull it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SERVER_IMAGE:-sd-server:latest}
BASE_IMAGE=debian:bookworm-slim
EXTRAS=docker/build-extras

for argument in "$@"; do
  case "$argument" in BASE_IMAGE=*) BASE_IMAGE=${argument#BASE_IMAGE=} ;; esac
done

pip_setting() {  # $1: pip's environment variable, $2: its pip.conf key; the value the host's pip uses, or nothing
  local value=${!1:-}
  [ -n "$value" ] || value=$(python3 -m pip config list 2>/dev/null | sed -n "s/^$2='\(.*\)'\$/\1/p" | tail -1)
  echo "$value"
}

fill_build_extras() {
  mkdir -p "$EXTRAS/wheels"
  local cert folder wheel
  cert=$(pip_setting PIP_CERT global.cert)
  if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" "$EXTRAS/ca-certificates.crt"; fi
  for folder in $(pip_setting PIP_FIND_LINKS global.find-links); do
    for wheel in "${folder#file://}"/*.whl; do
      [ -f "$wheel" ] && [ ! -f "$EXTRAS/wheels/$(basename "$wheel")" ] || continue
      ln "$wheel" "$EXTRAS/wheels/" 2>/dev/null || cp "$wheel" "$EXTRAS/wheels/"
    done
  done
}

make_local_base_image() {  # Debian's minimal bookworm as debian:bookworm-slim: about a minute
  local root
  root=$(mktemp -d)
  echo "no $BASE_IMAGE to pull: making it with debootstrap ..."
  debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

ensure_base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return
  docker pull -q "$BASE_IMAGE" >/dev/null 2>&1 && return
  if [ "$BASE_IMAGE" = debian:bookworm-slim ] && command -v debootstrap >/dev/null; then
    make_local_base_image
  else
    echo "cannot pull $BASE_IMAGE, and cannot make it here (debootstrap makes only debian:bookworm-slim)" >&2
    exit 1
  fi
}

fill_build_extras
ensure_base_image
# The host's network: the build's pip and apt reach what the host reaches (a proxy, a mirror on localhost).
exec docker build --network host --tag "$IMAGE" "$@" .
