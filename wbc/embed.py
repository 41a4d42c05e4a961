"""Embedding images with a frozen Stage-1 backbone under K views: the one forward shared by
`wbc extract` (whole stores, into a cache), `wbc predict`, `wbc adapt` and `wbc robustness`.

Stored images are cropped with the Stage-1 eval geometry (`wbc.data.crop_images`), normalised,
expanded into the named views (`wbc.views`, view-major) and embedded; logits come from the
backbone's own classifier on those embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from wbc.backbones import embed, logits_from_embeddings
from wbc.data import crop_images, normalize
from wbc.views import apply_views


def forward_views(model, crops, dc, views, amp, channels_last):
    """crops: (B, 3, h, w) uint8 on the device -> embeddings (B, K, D), logits (B, K, C) float32."""
    k = len(views)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = apply_views(normalize(crops, dc["mean"], dc["std"]), views, fmt)  # (K*B, 3, h, w), view-major
    with torch.autocast(crops.device.type, dtype=amp) if amp else contextlib.nullcontext():
        e = embed(model, x)
        z = logits_from_embeddings(model, e)
    b = x.shape[0] // k
    return e.float().reshape(k, b, -1).transpose(0, 1), z.float().reshape(k, b, -1).transpose(0, 1)


def embed_block(model, crops, dc, views, bs, amp, device, channels_last):
    """crops: (M, 3, h, w) uint8 -> features (M, K, D) float16, logits (M, K, C) float32 (numpy)."""
    feats, logits = [], []
    for s in range(0, len(crops), bs):
        x = crops[s: s + bs].to(device, non_blocking=True)
        e, z = forward_views(model, x, dc, views, amp, channels_last)
        feats.append(e.to(torch.float16))
        logits.append(z)
    # one device->host copy per block: the GPU keeps running ahead while the writer stores it
    return torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu().numpy()


@torch.inference_mode()
def embed_views(model, images: np.ndarray, data_config: dict, views: Sequence[str],
                device: str | torch.device = "cpu", amp: torch.dtype | None = None,
                channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stored images (B, S, S, 3) uint8 -> (embeddings (B, K, D), Stage-1 logits (B, K, C)) float32.

    The same crop, normalisation, views and forward as `extract` (for `wbc predict`); the cache
    holds these embeddings rounded to float16.
    """
    crops = crop_images(images, data_config).to(device)
    e, z = forward_views(model, crops, data_config, list(views), amp, channels_last)
    return e.cpu().numpy(), z.cpu().numpy()
