# Cross-builds of the per-target runtime images. Build context: the repository root.
#   docker buildx bake -f docker/docker-bake.hcl                 # every family
#   docker buildx bake -f docker/docker-bake.hcl arm --set arm.args.RELEASE=dist/raspberry-pi-5
# The release directory (RELEASE) must exist first: `edgepipe build --target T --out dist/`.

variable "REGISTRY" {
  default = "edgepipe"
}

variable "TAG" {
  default = "latest"
}

group "default" {
  targets = ["cpu", "intel", "arm", "nvidia-gpu", "jetson"]
}

target "_common" {
  context = "."
  labels = {
    "org.opencontainers.image.source" = "edgepipe"
  }
}

target "cpu" {
  inherits   = ["_common"]
  dockerfile = "docker/onnxruntime.Dockerfile"
  platforms  = ["linux/amd64", "linux/arm64"]
  args       = { RELEASE = "dist/cpu-int8" }
  tags       = ["${REGISTRY}/cpu:${TAG}"]
}

target "intel" {
  inherits   = ["_common"]
  dockerfile = "docker/openvino.Dockerfile"
  platforms  = ["linux/amd64"]
  args       = { RELEASE = "dist/intel-cpu-int8" }
  tags       = ["${REGISTRY}/intel-cpu:${TAG}"]
}

target "arm" {
  inherits   = ["_common"]
  dockerfile = "docker/tflite.Dockerfile"
  platforms  = ["linux/arm64"]
  args       = { RELEASE = "dist/raspberry-pi-5" }
  tags       = ["${REGISTRY}/arm64-tflite:${TAG}"]
}

target "nvidia-gpu" {
  inherits   = ["_common"]
  dockerfile = "docker/tensorrt.Dockerfile"
  platforms  = ["linux/amd64"]
  args       = { RELEASE = "dist/nvidia-gpu-int8", BASE_IMAGE = "nvcr.io/nvidia/tensorrt:25.10-py3" }
  tags       = ["${REGISTRY}/nvidia-gpu:${TAG}"]
}

target "jetson" {
  inherits   = ["_common"]
  dockerfile = "docker/tensorrt.Dockerfile"
  platforms  = ["linux/arm64"]
  args       = { RELEASE = "dist/jetson-orin-nano-int8", BASE_IMAGE = "nvcr.io/nvidia/l4t-jetpack:r36.4.0" }
  tags       = ["${REGISTRY}/jetson:${TAG}"]
}
