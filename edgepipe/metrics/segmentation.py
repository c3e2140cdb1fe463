"""Dense labels ``[N, H, W]``: mean intersection over union."""

from __future__ import annotations

import numpy as np

from edgepipe.metrics._registry import register
from edgepipe.metrics.base import Metric, MetricError, integers, shape

IGNORE_LABEL = 255


class MeanIoU(Metric):
    """Mean over classes of IoU, over every pixel of the split.

    ``outputs[0]`` is scores ``[N, K, H, W]`` (argmax over axis 1) or labels ``[N, H, W]``; target ``"y"``
    is masks ``[N, H, W]`` where pixels labelled below 0 or 255 are ignored. A class counts when it
    appears, on a pixel that is not ignored, in the prediction or in the truth.
    """

    name = "miou"
    higher_is_better = True
    unit = "%"
    targets = ("y",)

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        out = outputs[0]
        if out.ndim == 4:
            pred = out.argmax(1)
        elif out.ndim == 3:
            pred = integers(self.name, "outputs[0] (labels [N, H, W])", out)
        else:
            raise MetricError(f"metric {self.name!r} needs outputs[0] as scores [N, K, H, W] or labels "
                              f"[N, H, W] but it is {shape(out)}: choose the model's metric with --metric, "
                              "or a postprocess")
        y = targets["y"]
        if y.shape != pred.shape:
            raise MetricError(f"metric {self.name!r} needs target 'y' as masks {shape(pred)} (the predictions' "
                              f"shape) but it is {shape(y)}")
        y = integers(self.name, "target 'y'", y)
        valid = (y >= 0) & (y != IGNORE_LABEL)
        p, t = pred[valid], y[valid]
        if t.size == 0:
            raise MetricError(f"metric {self.name!r}: every pixel of target 'y' is ignored (< 0 or "
                              f"{IGNORE_LABEL}); give masks with labelled pixels")
        if p.min() < 0:
            raise MetricError(f"metric {self.name!r}: outputs[0] predicts the label {int(p.min())}; "
                              "predicted labels are class indices 0, 1, 2, ...")
        k = int(max(p.max(), t.max())) + 1
        inter = np.bincount(p[p == t], minlength=k)
        union = np.bincount(p, minlength=k) + np.bincount(t, minlength=k) - inter
        present = union > 0
        return float((inter[present] / union[present]).mean() * 100.0)


register(MeanIoU())
