# syntax=docker/dockerfile:1
# Image for the NVIDIA targets. TensorRT engines are specific to the GPU and TensorRT version, so the image
# carries the build bundle (Q/DQ ONNX + target) and finishes the engine on the device at first start
# (`edgepipe engine build`), caching it in /release/engine (mount a volume there to keep it).
#   Jetson (JetPack 6.1, TensorRT 10.3, arm64):  docker buildx bake -f docker/docker-bake.hcl jetson \
#                                 --set jetson.args.RELEASE=dist/jetson-orin-nano-int8
#   Datacenter GPU (amd64):     docker buildx bake -f docker/docker-bake.hcl nvidia-gpu \
#                                 --set nvidia-gpu.args.RELEASE=dist/nvidia-gpu-int8
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${BASE_IMAGE}
ARG NUMPY_VERSION=1.26.4
ARG RELEASE=dist/nvidia-gpu-int8
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/edgepipe
COPY pyproject.toml README.md ./
COPY edgepipe ./edgepipe
COPY targets ./targets
RUN python3 -m pip install "numpy==${NUMPY_VERSION}" "onnx==1.*" "click==8.*" "rich==14.*" "cuda-python==12.*" \
    && python3 -m pip install --no-deps .
COPY ${RELEASE} /release
ENTRYPOINT ["/bin/sh", "-c", "edgepipe engine build /release && edgepipe bench /release --json"]
