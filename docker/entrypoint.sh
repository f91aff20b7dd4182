#!/bin/sh
# The container's entry point (after tini): bring the bundled demo model into a models volume that lacks it, as
# ./start.sh --demo does, then run the command (python main.py) as this process, so that it gets docker stop's SIGTERM.
set -eu
if [ "${SD_DEFAULT_MODEL:-}" = demo ] && [ ! -f "$SD_MODELS_DIR/demo/model_index.json" ]; then
  mkdir -p "$SD_MODELS_DIR" && cp -r /app/models/demo "$SD_MODELS_DIR/demo"
fi
exec "$@"
