# syntax=docker/dockerfile:1
# Runtime image for the Intel CPU targets (intel-cpu-*): OpenVINO runtime and the edgepipe harness.
#   docker buildx bake -f docker/docker-bake.hcl intel --set intel.args.RELEASE=dist/intel-cpu-int8
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm
ARG OPENVINO_VERSION=2026.4.1
ARG NUMPY_VERSION=2.4.6
ARG RELEASE=dist/intel-cpu-int8
# edgepipe opts out of OpenVINO telemetry; the image does too.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 OPENVINO_TELEMETRY_DISABLE=1
WORKDIR /opt/edgepipe
COPY pyproject.toml README.md ./
COPY edgepipe ./edgepipe
COPY targets ./targets
RUN pip install "numpy==${NUMPY_VERSION}" "openvino==${OPENVINO_VERSION}" "click==8.*" "rich==14.*" \
    && pip install --no-deps .
COPY ${RELEASE} /release
RUN useradd --create-home --uid 10001 edgepipe
USER 10001
ENTRYPOINT ["edgepipe", "bench", "/release"]
CMD ["--json"]
