#!/usr/bin/env bash
# Start the service, or run its tests, in a virtual environment that this script creates and fills.
#   ./start.sh          serve the configured model (SD_DEFAULT_MODEL, SD_USER_MODELS, ...)
#   ./start.sh --demo   serve the bundled demo model (models/demo: a tiny model trained here that draws shapes)
#   ./start.sh --ray    batches run on Ray Serve replicas (SD_ENGINE=ray; installs requirements-ray.txt on first use);
#                       with --demo, on the demo model. SD_RAY_ADDRESS joins a running cluster, else a local Ray starts
#   ./start.sh --docker build the image (docker/build.sh) and run it on port SD_PORT (8000), its models and data in
#                       the volumes sd-models and sd-data; it serves the demo model unless SD_DEFAULT_MODEL says otherwise
#   ./start.sh --test   run the test suite (installing Chromium and newman for the browser and Postman tests
#                       where it can): the unit and service tiers on a Python that cannot import torch or Ray, then the
#                       integration and system tiers; further arguments go to pytest (paths, -m or -k: one run of them)
# Environment: PYTHON (default python3), SD_VENV (default .venv), SD_TORCH_INDEX_URL (install torch
# from this index first, e.g. https://download.pytorch.org/whl/cu128 or .../whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${SD_VENV:-.venv}

install_requirements() {  # $1: a requirements file; skipped when the same files were installed before
  local stamp
  stamp="$VENV/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$1")"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  [ -f "$stamp" ] && return
  if [ -n "${SD_TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/python" -m pip install -q "$(grep '^torch==' requirements.txt)" --index-url "$SD_TORCH_INDEX_URL"
  fi
  echo "installing $1 into $VENV ..."
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$1"
  touch "$stamp"
}

apt_install() {  # Debian packages, where this is root on a Debian-like system; refreshes the package lists once if needed
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || return 1
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }; } >/dev/null 2>&1
}

install_test_tools() {  # a real browser, Postman's runner and a Docker engine for the system tests; without them those tests skip, saying why
  if ! command -v chromedriver >/dev/null; then
    echo "installing Debian's chromium and chromium-driver (browser tests) ..."
    apt_install chromium chromium-driver || echo "could not install chromium: the browser tests will be skipped"
  fi
  if ! command -v dockerd >/dev/null; then
    echo "installing Debian's docker.io, docker-compose and debootstrap (the container tests) ..."
    apt_install docker.io docker-compose debootstrap || echo "could not install docker.io: the container tests will be skipped"
  fi
  if [ ! -x .tools/node_modules/.bin/newman ] && command -v npm >/dev/null; then
    echo "installing newman into .tools (the Postman collection test) ..."
    npm install --prefix .tools newman@6 --no-audit --no-fund --loglevel=error >/dev/null 2>&1 \
      || echo "could not install newman: the Postman collection test will be skipped"
  fi
}

case "${1:-}" in
  --test)
    shift
    install_requirements requirements-dev.txt
    install_test_tools
    for argument in "$@"; do  # a selection of tests: one pytest run of exactly that
      case "$argument" in -m*|-k*|--lf|--ff|--sw|[!-]*) exec "$VENV/bin/python" -m pytest "$@" ;; esac
    done
    status=0
    PYTHONPATH="$PWD/tests/torch_free${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest "$@" tests/unit tests/service || status=$?
    "$VENV/bin/python" -m pytest "$@" tests/integration tests/system || status=$?
    exit "$status"
    ;;
  --docker)
    shift
    [ $# -eq 0 ] || { echo "usage: ./start.sh --docker (settings as SD_ variables in .env or the environment)" >&2 && exit 2; }
    image=${SERVER_IMAGE:-sd-server:latest}
    SERVER_IMAGE=$image docker/build.sh
    settings=()
    [ -f .env ] && settings+=(--env-file .env)
    [ -n "${SD_DEFAULT_MODEL:-}" ] && settings+=(-e SD_DEFAULT_MODEL)
    exec docker run --rm -p "${SD_PORT:-8000}:8000" -v sd-models:/models -v sd-data:/data --stop-timeout 90 "${settings[@]}" "$image"
    ;;
  ""|--demo|--ray)
    demo=false ray=false
    for argument in "$@"; do
      case "$argument" in
        --demo) demo=true ;;
        --ray) ray=true ;;
        *) echo "usage: ./start.sh [--demo] [--ray] | --docker | --test [pytest arguments]" >&2 && exit 2 ;;
      esac
    done
    install_requirements requirements.txt
    if $ray; then
      install_requirements requirements-ray.txt
      export SD_ENGINE=ray
    fi
    if $demo; then
      models_dir=${SD_MODELS_DIR:-models}
      if [ ! -f "$models_dir/demo/model_index.json" ]; then  # SD_MODELS_DIR elsewhere: bring the demo model along
        mkdir -p "$models_dir" && cp -r models/demo "$models_dir/demo"
      fi
      export SD_DEFAULT_MODEL=demo
    fi
    exec "$VENV/bin/python" main.py
    ;;
  *)
    echo "usage: ./start.sh [--demo] [--ray] | --docker | --test [pytest arguments]" >&2
    exit 2
    ;;
esac
