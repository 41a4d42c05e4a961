"""Scale augmentation, and `--augment` as a comma list of wbc.data.AUGMENTS names.

Cells from another microscope or crop pipeline appear at another scale (JTSC's are about 1.6x
wider in the frame than PBC's; tools/cell_scale.py). `scale` rescales the crop's content about its
centre with `wbc.sources.zoom_image`, the same within-frame rescale as `--zoom` of predict and
external evaluation: zooming out pads with the median colour of the border (the slide
background), zooming in crops the centre. The factor is log-uniform in [1/max, max], so shrinking
and enlarging by the same ratio are equally likely and factor 1 sits in the middle.

A comma list composes its parts in the order given, each on the previous one's output:
`scale,randaugment` rescales, then flips/rotates/RandAugments; `scale,degradations` adds the
WBCBench-style damage (stain jitter, blur, noise, illumination, JPEG) at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from wbc.data import AUGMENTS, Transform
from wbc.errors import WbcError
from wbc.sources import zoom_image

MAX_SCALE = 1.6  # covers the 1.6x JTSC/PBC cell-size ratio measured by tools/cell_scale.py


def scale_crop(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x: (3, H, W) uint8 -> (3, H, W) uint8 with its content magnified `factor`x about the centre."""
    if factor == 1.0:
        return x
    hwc = np.ascontiguousarray(x.permute(1, 2, 0).numpy())
    out = zoom_image(hwc, factor)  # may be a read-only view (PIL): torch wants a writable array
    return torch.from_numpy(out if out.flags.writeable else out.copy()).permute(2, 0, 1)


class RandomScale(torch.nn.Module):
    """Rescale the crop's content by a log-uniform factor in [1/max_scale, max_scale] (torch RNG,
    so a DataLoader worker's seed and wbc's per-epoch seeding make it reproducible)."""

    def __init__(self, max_scale: float = MAX_SCALE):
        super().__init__()
        if max_scale < 1.0:
            raise WbcError(f"scale augmentation needs max_scale >= 1; got {max_scale}")
        self.log_max = math.log(max_scale)

    def factor(self) -> float:
        return math.exp((2.0 * float(torch.rand(())) - 1.0) * self.log_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_crop(x, self.factor())


@AUGMENTS.register("scale")
def _scale(num_ops: int = 2, magnitude: int = 9, max_scale: float = MAX_SCALE) -> Transform:
    """The cell rescaled within its frame, factor log-uniform in [1/1.6, 1.6] (nothing else)."""
    return RandomScale(max_scale)


def parse_augment(spec: str) -> list[str]:
    """'scale,degradations' -> ['scale', 'degradations']; unknown or empty names fail in one line."""
    names = [s.strip() for s in str(spec).split(",")]
    if not names or any(not n for n in names):
        raise WbcError(f"--augment {spec!r}: give names separated by commas, e.g. scale,randaugment")
    for n in names:
        if n not in AUGMENTS:
            raise WbcError(f"--augment {spec!r}: unknown augmentation {n!r}; choose from "
                           f"{', '.join(AUGMENTS.names())} (or a comma list of them)")
    # `degradations` runs RandAugment itself: listing both would apply it twice (four ops, not two)
    runs = [m for n in names for m in (("randaugment", "degradations") if n == "degradations" else (n,))]
    twice = sorted({m for m in runs if runs.count(m) > 1 and m != "none"})
    if twice:
        raise WbcError(f"--augment {spec!r} applies {' and '.join(twice)} twice (degradations includes "
                       f"randaugment); e.g. scale,degradations or degradations")
    return names


def compose(spec: str, **params: Any) -> Transform:
    """The transform of a comma list: each named augmentation in turn on a (3, H, W) uint8 tensor."""
    parts = [AUGMENTS.get(n)(**params) for n in parse_augment(spec)]
    return parts[0] if len(parts) == 1 else v2.Compose(parts)
