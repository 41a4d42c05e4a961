"""Datasets over the HDF5 image store, train augmentations, and the deterministic eval preprocessing.

Geometry (the paper's): stored S x S image -> resize to `resize` -> centre crop `input_size`;
augmentations act on the uint8 crop; mean/std normalisation happens last, batched, on the device
(uint8 batches are 4x cheaper to move than float ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from wbc.log import progress
from wbc.registry import Registry

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]
AUGMENTS: Registry[Callable[..., Transform]] = Registry("augmentation")

_INTERP = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "nearest": TF.InterpolationMode.NEAREST,
}


# ---- deterministic geometry and normalisation ----------------------------------------------------


def resize_crop(x: torch.Tensor, resize: int, crop: Sequence[int] | int, interpolation: str = "bilinear") -> torch.Tensor:
    """x: (B, 3, S, S) uint8 -> (B, 3, h, w) uint8: resize the square to `resize`, centre crop."""
    crop = [crop, crop] if isinstance(crop, int) else list(crop)
    if x.shape[-1] != resize or x.shape[-2] != resize:
        x = TF.resize(x, [resize, resize], interpolation=_INTERP.get(interpolation, _INTERP["bilinear"]), antialias=True)
    return TF.center_crop(x, crop)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """x: (B, 3, H, W) uint8 -> float32 (x/255 - mean) / std, on x's device."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def crop_images(images: np.ndarray | torch.Tensor, data_config: dict) -> torch.Tensor:
    """Stored images (B, S, S, 3) uint8 -> (B, 3, H, W) uint8 centre crops per `data_config`."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    h, w = data_config["input_size"][1:]
    return resize_crop(x, int(data_config["resize"]), [h, w], data_config.get("interpolation", "bilinear"))


def preprocess(
    images: np.ndarray | torch.Tensor, data_config: dict, device: str | torch.device | None = None
) -> torch.Tensor:
    """Eval preprocessing: stored images (B, S, S, 3) uint8 -> (B, 3, H, W) float32 normalised.

    data_config is a Stage-1 checkpoint's: mean, std, input_size [3, H, W], resize (the side the
    S x S image is resized to before the centre crop; 368/224 by default, 263/160 keeps the ratio).
    """
    x = crop_images(images, data_config)
    if device is not None:
        x = x.to(device, non_blocking=True)
    return normalize(x, data_config["mean"], data_config["std"])


# ---- train augmentations (a registry: later issues add `degradations`) --------------------------


class RandomRot90(torch.nn.Module):
    """Rotate by k*90 degrees, k uniform in 0..3: cells have no orientation and no corners are lost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


@AUGMENTS.register("none")
def _no_augment(num_ops: int = 2, magnitude: int = 9) -> Transform:
    return torch.nn.Identity()


@AUGMENTS.register("randaugment")
def _randaugment(num_ops: int = 2, magnitude: int = 9) -> Transform:
    """Flips and 90-degree rotations, then RandAugment (torchvision's, on the uint8 crop)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRot90(),
        v2.RandAugment(num_ops=num_ops, magnitude=magnitude),
    ])


class TensorDegradation(torch.nn.Module):
    """wbc.degrade's random degradation (random kind, severity 1-4) on a (3, H, W) uint8 tensor."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        from wbc.degrade import RandomDegradation

        self.inner = RandomDegradation(p=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = np.ascontiguousarray(self.inner(np.ascontiguousarray(x.permute(1, 2, 0).numpy())))
        if not out.flags.writeable:  # PIL-backed results are read-only: torch warns on each worker
            out = out.copy()
        return torch.from_numpy(out).permute(2, 0, 1)


@AUGMENTS.register("degradations")
def _degradations(num_ops: int = 2, magnitude: int = 9, p: float = 0.5) -> Transform:
    """RandAugment's pipeline, then with probability p one WBCBench-style degradation (noise, blur,
    illumination, JPEG, stain jitter) at a random severity: trains against scanner/stain damage."""
    return v2.Compose([_randaugment(num_ops, magnitude), TensorDegradation(p)])


def train_transform(name: str, **params: Any) -> Transform:
    """The named augmentation (see AUGMENTS.names()), or a comma list of them applied in order
    (`scale,degradations`), acting on a (3, H, W) uint8 tensor."""
    from wbc.augment import compose  # registers `scale`; it imports this module

    return compose(name, **params)


# ---- dataset -------------------------------------------------------------------------------------


class StoreDataset(Dataset):
    """Rows `indices` of an image store as (uint8 crop (3, H, W), label) pairs.

    preload=True decodes and crops every image once into RAM (N * 3 * H * W bytes:
    2,438 crops at 160 px are 187 MB), so epochs and DataLoader workers never touch HDF5 again.
    preload=False reads through the store's per-process handle (large stores).
    """

    def __init__(
        self,
        store: Any,
        indices: Sequence[int],
        data_config: dict,
        transform: Transform | None = None,
        preload: bool = True,
        block: int = 64,
    ):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.data_config = data_config
        self.transform = transform
        self.labels = torch.as_tensor(np.asarray(store.labels)[self.indices].astype(np.int64))
        self.crops: torch.Tensor | None = None
        if preload:
            self.crops = self._preload(block)

    def _preload(self, block: int) -> torch.Tensor:
        h, w = self.data_config["input_size"][1:]
        out = torch.empty((len(self.indices), 3, h, w), dtype=torch.uint8)
        with progress(transient=True) as bar:
            task = bar.add_task("decoding", total=len(self.indices), info="")
            for s in range(0, len(self.indices), block):
                idx = self.indices[s : s + block]
                out[s : s + len(idx)] = crop_images(self.store.images(idx), self.data_config)
                bar.advance(task, len(idx))
        # Not share_memory_(): forked workers share these pages copy-on-write, and a small
        # /dev/shm (Docker's 64 MB default) would not hold them.
        return out

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        if self.crops is not None:
            x = self.crops[j]
        else:
            x = crop_images(self.store.image(self.indices[j])[None], self.data_config)[0]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])
