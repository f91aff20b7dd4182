# The service in a container: `docker build -t sd-server .` then `docker run -p 8000:8000 sd-server` serves the bundled
# demo model; -e SD_DEFAULT_MODEL=<hub id or folder under /models> serves a real one. docs/deploy.md has the rest.
#
# Build arguments (the CUDA image is this file with the first two changed; docs/deploy.md):
#   BASE_IMAGE       a Debian-like image with Python >= 3.11 in apt (debian:bookworm-slim; for CUDA,
#                    nvidia/cuda:12.8.1-base-ubuntu24.04)
#   TORCH_INDEX_URL  where torch comes from: the CPU wheel by default, .../whl/cu128 for CUDA
#   WITH_RAY         true: also requirements-ray.txt, for SD_ENGINE=ray, compose's ray profile and KubeRay
# Optional build inputs in docker/build-extras/ (wheels/, ca-certificates.crt) stay in the build stage: see its README.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180 \
    PIP_FIND_LINKS=/build-extras/wheels PIP_CERT=/build-extras/ca-certificates.crt
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY docker/build-extras/ /build-extras/
# pip trusts the CA bundle given in build-extras, else the system's.
RUN [ -f "$PIP_CERT" ] || cp /etc/ssl/certs/ca-certificates.crt "$PIP_CERT"; python3 -m venv /opt/venv
# torch first, from its own index (or a wheel in build-extras), so that PyPI's multi-GB CUDA build is never pulled;
# each step a layer of its own, so that a changed requirement or WITH_RAY reinstalls only what follows it.
COPY requirements.txt requirements-ray.txt /requirements/
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN torch_pin=$(grep '^torch==' /requirements/requirements.txt) \
    && if ls /build-extras/wheels/torch-* >/dev/null 2>&1; then /opt/venv/bin/pip install -q "$torch_pin"; \
       else /opt/venv/bin/pip install -q "$torch_pin" --index-url "$TORCH_INDEX_URL"; fi
RUN /opt/venv/bin/pip install -q -r /requirements/requirements.txt
ARG WITH_RAY=false
RUN if [ "$WITH_RAY" = true ]; then /opt/venv/bin/pip install -q -r /requirements/requirements-ray.txt; fi

FROM ${BASE_IMAGE} AS service
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-log-init --create-home --home-dir /home/sd sd \
    && mkdir -p /models /data && chown sd:sd /models /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY main.py config.py model_service.py schemas.py alembic.ini ./
COPY sd_server/ sd_server/
COPY models/ models/
COPY docker/entrypoint.sh /usr/local/bin/sd-entrypoint
COPY --chown=sd:sd models/ /models/
# No secrets here: keys, passwords and the session secret come from the environment (compose's .env, a Kubernetes Secret).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SD_DEFAULT_MODEL=demo \
    SD_MODELS_DIR=/models \
    SD_DATA_DIR=/data \
    SD_OUTPUT_DIR=/data/output \
    HF_HOME=/models/huggingface \
    SD_HOST=0.0.0.0 \
    SD_PORT=8000
VOLUME ["/models", "/data"]
USER sd
EXPOSE 8000
# Ready means the default model has loaded: a real checkpoint's first download can take minutes, hence start-period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SD_PORT\"]}/health/ready', timeout=4)"]
# tini is PID 1: it forwards docker stop's SIGTERM to the service (uvicorn's graceful shutdown), reaps children, and
# reports the stop that the service re-raises as SIGTERM (143) as a clean exit (0).
ENTRYPOINT ["/usr/bin/tini", "-e", "143", "--", "sd-entrypoint"]
CMD ["python", "main.py"]
