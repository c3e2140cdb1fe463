# syntax=docker/dockerfile:1
# edgepipe runtime image for one release (onnxruntime, OpenVINO or LiteRT), written by `edgepipe docker
# build` into a self-contained context: release/, wheels/ (the image platform's wheels, downloaded on the
# host), requirements.lock (every wheel pinned by version and sha256), the bench worker (one zip of
# edgepipe's pure-Python modules: no torch, no edgepipe install) and eval.npz (the release's test split).
# It builds offline: no index, no TLS inside the build.
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t edgepipe/cpu:1.0 CONTEXT
# BASE_IMAGE: any Debian-like image of the platform whose python3 is the lock's CPython and has venv.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
COPY wheels/ /tmp/wheels/
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-index --disable-pip-version-check \
       --find-links /tmp/wheels --require-hashes -r /tmp/requirements.lock

FROM ${BASE_IMAGE}
ARG FAMILY=onnxruntime
LABEL org.opencontainers.image.title="edgepipe runtime (${FAMILY})" \
      org.opencontainers.image.description="Benchmarks the release in /release and prints one JSON line"
ENV PYTHONDONTWRITEBYTECODE=1 ORT_DISABLE_TELEMETRY=1
COPY --from=install /opt/venv /opt/venv
COPY edgepipe-worker.pyz eval.npz requirements.lock context.json /opt/edgepipe/
COPY release/ /release/
USER 10001
ENTRYPOINT ["/opt/venv/bin/python", "/opt/edgepipe/edgepipe-worker.pyz", "--release", "/release"]
# bench only; `edgepipe docker run IMAGE --verify` adds --eval /opt/edgepipe/eval.npz
CMD ["--iterations", "200"]
