# syntax=docker/dockerfile:1
# edgepipe image for the NVIDIA targets, written by `edgepipe docker build` into a self-contained context.
# TensorRT engines are specific to the GPU and TensorRT version, so the image carries the build bundle
# (Q/DQ ONNX + target) and finishes the engine on the device at first start (`edgepipe engine build`,
# edgepipe's sources in /opt/edgepipe/src), then benchmarks it. The base image brings TensorRT and CUDA:
#   Jetson (JetPack 6.1, arm64):  --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
#   datacenter GPU (amd64):       the default below
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/edgepipe/src ORT_DISABLE_TELEMETRY=1
COPY wheels/ /tmp/wheels/
COPY requirements.lock /opt/edgepipe/requirements.lock
RUN python3 -m pip install --no-cache-dir --no-index --disable-pip-version-check \
       --find-links /tmp/wheels --require-hashes -r /opt/edgepipe/requirements.lock \
    && rm -rf /tmp/wheels
COPY src/ /opt/edgepipe/src/
COPY edgepipe-worker.pyz eval.npz context.json /opt/edgepipe/
COPY release/ /release/
ENTRYPOINT ["/bin/sh", "-c", "python3 -m edgepipe engine build /release && exec python3 /opt/edgepipe/edgepipe-worker.pyz --release /release \"$@\"", "--"]
CMD ["--iterations", "200"]
