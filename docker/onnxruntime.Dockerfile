# syntax=docker/dockerfile:1
# Runtime image for the generic CPU targets (cpu-fp32, cpu-int8): onnxruntime and the edgepipe harness.
# No torch: the image only runs and measures a release; building happens in CI.
#   docker buildx bake -f docker/docker-bake.hcl cpu --set cpu.args.RELEASE=dist/cpu-int8
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm
ARG ONNXRUNTIME_VERSION=1.32.0
ARG NUMPY_VERSION=2.4.6
ARG RELEASE=dist/cpu-int8
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/edgepipe
COPY pyproject.toml README.md ./
COPY edgepipe ./edgepipe
COPY targets ./targets
RUN pip install "numpy==${NUMPY_VERSION}" "onnxruntime==${ONNXRUNTIME_VERSION}" "click==8.*" "rich==14.*" \
    && pip install --no-deps .
COPY ${RELEASE} /release
RUN useradd --create-home --uid 10001 edgepipe
USER 10001
ENTRYPOINT ["edgepipe", "bench", "/release"]
CMD ["--json"]
