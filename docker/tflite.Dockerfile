# syntax=docker/dockerfile:1
# Runtime image for the ARM boards (raspberry-pi-5, arm64-cpu-int8): LiteRT (ai-edge-litert) only,
# no TensorFlow: the converter runs in CI (`edgepipe toolchain install tflite`), the board only runs.
# Cross-build on x86 with QEMU/binfmt:
#   docker buildx bake -f docker/docker-bake.hcl arm --set arm.args.RELEASE=dist/raspberry-pi-5
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm
ARG LITERT_VERSION=2.3.0
ARG NUMPY_VERSION=2.4.6
ARG RELEASE=dist/raspberry-pi-5
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/edgepipe
COPY pyproject.toml README.md ./
COPY edgepipe ./edgepipe
COPY targets ./targets
RUN pip install "numpy==${NUMPY_VERSION}" "ai-edge-litert==${LITERT_VERSION}" "click==8.*" "rich==14.*" \
    && pip install --no-deps .
COPY ${RELEASE} /release
RUN useradd --create-home --uid 10001 edgepipe
USER 10001
ENTRYPOINT ["edgepipe", "bench", "/release"]
CMD ["--json"]
