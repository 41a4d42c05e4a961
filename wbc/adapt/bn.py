"""BatchNorm re-estimation on the target images (AdaBN, Li et al. 2016), no labels, no gradients.

Every BatchNorm layer's running mean/var is reset and recomputed as the cumulative average
(momentum None) over batches of target images under every view, with the training store's
preprocessing; nothing else changes (weights, biases, affine parameters stay). Each batch is
normalised with its own statistics while the running ones accumulate, as in training, so deeper
layers see inputs as they will once the new statistics are in place.

The result is a new Stage-1 checkpoint (same format, loadable by `load_checkpoint`) with an
`adabn` provenance entry; the source checkpoint is only read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wbc.config import file_sha256
from wbc.errors import WbcError
from wbc.fsutil import atomic_write

log = logging.getLogger(__name__)


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics (timm's BatchNormAct2d is one)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm layer's running stats from `batches` of (B, 3, H, W) normalised
    input (already on the model's device). Returns the number of samples seen; the model is left
    in eval mode. Raises WbcError if the model has no BatchNorm layer."""
    layers = bn_layers(model)
    if not layers:
        raise WbcError("this backbone has no BatchNorm layer: AdaBN does not apply (use --no-bn)")
    saved = [(m, m.momentum) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs by its count
        m.train()  # only BN layers: dropout and stochastic depth stay off
    n = 0
    try:
        for x in batches:
            if len(x) < 2:  # one sample's variance is zero: it would shrink every variance
                continue
            model(x)
            n += len(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    if n == 0:
        raise WbcError("AdaBN saw no batch of two or more images")
    return n


def view_batches(images: np.ndarray, data_config: dict, views: list[str], batch_size: int,
                 device: torch.device, index: np.ndarray | None = None) -> Iterable[torch.Tensor]:
    """Stored-size images (N, S, S, 3) uint8 -> normalised (b*K, 3, H, W) batches, every view,
    each batch the crops of `batch_size` images under all K views (as extraction forwards them).
    index: the rows to use, in order, repeats allowed (a weighted draw); default every row."""
    from wbc.data import crop_images, normalize
    from wbc.views import apply_views

    index = np.arange(len(images)) if index is None else np.asarray(index)
    for a in range(0, len(index), batch_size):
        crops = crop_images(images[index[a: a + batch_size]], data_config).to(device)
        x = normalize(crops, data_config["mean"], data_config["std"])
        yield apply_views(x, views)


def save_adapted(source_ckpt: str | Path, model: nn.Module, out: str | Path, provenance: dict) -> Path:
    """A copy of the source checkpoint with the model's new state and `adabn` provenance; the
    source file is only read. Written atomically (a partial file never has the final name)."""
    src = Path(source_ckpt)
    from wbc.backbones import read_checkpoint

    ckpt = read_checkpoint(src)  # weights_only: a user's file is data, never code
    ckpt["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt.pop("train_state", None)
    ckpt["adabn"] = {"source_checkpoint": str(src), "source_sha256": file_sha256(src), **provenance}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        torch.save(ckpt, f)
    return out
