"""Grad-CAM (Selvaraju et al. 2017) on a Stage-1 backbone's last feature map, for report galleries.

For a target class c, the map is ReLU(sum_k w_k A_k) with A (K, h, w) the backbone's last feature
map (`model.forward_features`) and w_k = mean over h, w of d logit_c / d A_k; upsampled bilinearly
to the input crop and scaled to [0, 1] per image. The logit is the Stage-2 head's when one is given
(the classifier the report scores: pooled embedding -> head), else the Stage-1 classifier's.

When the embedding is the map's global average and the logit a linear function of it (timm's CNNs:
pool -> linear), d logit_c / d A_k = W_ck / (h w) everywhere, so Grad-CAM is CAM (Zhou et al.
2016), ReLU(sum_k W_ck A_k) up to a scale the [0, 1] scaling removes: no backward pass. `grad_cam`
takes that path when a probe shows the embedding is the spatial mean, and autograd otherwise.
Only gallery cells get a map (a capped number): it is the one backbone pass a report makes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wbc.errors import WbcError


def _nchw(feats: torch.Tensor, num_features: int | None) -> torch.Tensor:
    """timm CNNs give (B, C, h, w); Swin-style models give (B, h, w, C): return (B, C, h, w)."""
    if feats.ndim != 4:
        raise WbcError(f"Grad-CAM needs a spatial feature map (B, C, h, w); this backbone gives "
                       f"{tuple(feats.shape)} (a token sequence?)")
    if num_features and feats.shape[1] != num_features and feats.shape[-1] == num_features:
        return feats.permute(0, 3, 1, 2)
    return feats


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | np.ndarray,
             head: tuple[torch.Tensor, torch.Tensor] | None = None, allow_cam: bool = True) -> np.ndarray:
    """Grad-CAM maps. x: (B, 3, H, W) float32 normalised; target: (B,) class indices;
    head: optional (weight (C, D), bias (C,)) applied to the pooled embedding; allow_cam=False
    forces the autograd path (tests compare the two).

    Returns (B, H, W) float32 in [0, 1] (an all-zero map where the gradient gives no positive evidence).
    """
    model.eval()
    target = torch.as_tensor(np.asarray(target), dtype=torch.long, device=x.device)
    with torch.inference_mode():
        raw = model.forward_features(x)
        nchw = _nchw(raw, getattr(model, "num_features", None))
        readout = _linear_readout(model, nchw, nchw is not raw, head) if allow_cam else None
        if readout is not None:
            cam = torch.einsum("bk,bkhw->bhw", readout[target].to(nchw), nchw)[:, None]
            return _finish(cam, x.shape[-2:])
    # Grad-CAM needs d logit / d map only: the backbone below the map ran without a graph.
    swapped = nchw is not raw
    nchw = nchw.clone().float().requires_grad_(True)  # a normal tensor: autograd refuses inference tensors
    with torch.enable_grad():
        emb = model.forward_head(nchw.permute(0, 2, 3, 1) if swapped else nchw, pre_logits=True)
        logits = emb @ head[0].t().to(emb) + head[1].to(emb) if head is not None else model.get_classifier()(emb)
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, nchw)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return _finish((weights * nchw.detach()).sum(1, keepdim=True), x.shape[-2:])


def _linear_readout(model, nchw: torch.Tensor, swapped: bool, head) -> torch.Tensor | None:
    """The logits' weights W (C, K) when logits = W mean_hw(A) + b, else None.

    A probe decides: on a random map (negative values too) the embedding must equal the map's
    spatial mean, which rules out a norm, an activation or attention pooling after the map.
    """
    g = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *nchw.shape[1:]), generator=g).to(nchw)
    emb = model.forward_head(probe.permute(0, 2, 3, 1) if swapped else probe, pre_logits=True)
    mean = probe.mean((2, 3))
    if emb.shape != mean.shape or not torch.allclose(emb.float(), mean.float(), rtol=1e-4, atol=1e-5):
        return None
    if head is not None:
        return torch.as_tensor(head[0])
    clf = model.get_classifier()
    return clf.weight if isinstance(clf, torch.nn.Linear) else None


def _finish(cam: torch.Tensor, size) -> np.ndarray:
    """(B, 1, h, w) raw map -> ReLU, bilinear to `size`, scaled to peak 1: (B, H, W) float32."""
    cam = F.interpolate(F.relu(cam.float()), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """image: (H, W, 3) uint8, cam: (H, W) in [0, 1] -> (H, W, 3) uint8 with a jet-like colour map."""
    c = np.clip(cam, 0, 1)[..., None]
    # A small jet ramp (blue -> cyan -> yellow -> red) without importing matplotlib.
    r = np.clip(1.5 - np.abs(4 * c - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * c - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * c - 1), 0, 1)
    heat = np.concatenate([r, g, b], -1) * 255
    a = alpha * (0.25 + 0.75 * c)  # weak evidence stays see-through
    return np.clip((1 - a) * image + a * heat, 0, 255).astype(np.uint8)


def backbone_cams(checkpoint, images: np.ndarray, target: np.ndarray, head_path=None,
                  device: str = "cpu", batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of a Stage-1 checkpoint (and optional Stage-2 head) on stored images.

    images: (B, S, S, 3) uint8 as stored; target: (B,). Returns (crops (B, h, w, 3) uint8, the
    identity view the backbone saw, and maps (B, h, w) float32 in [0, 1]). On a 2-core CPU, lite0 at
    crop 160 ran 72 cells in 2.4 s as batches of 8 and 4.6 s as one batch of 72 (cache misses), and
    channels_last beat NCHW at every batch size: hence batches of 16, channels last.
    """
    from wbc.backbones import load_checkpoint
    from wbc.data import crop_images, normalize
    from wbc.device import resolve_device

    device = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device)
    head = None
    if head_path is not None:
        from wbc.heads import load_head

        head = load_head(head_path).effective()
    dc = meta["data_config"]
    crops = crop_images(images, dc)
    model = model.to(memory_format=torch.channels_last)
    maps = []
    for s in range(0, len(crops), batch_size):
        x = normalize(crops[s: s + batch_size].to(device), dc["mean"], dc["std"])
        x = x.contiguous(memory_format=torch.channels_last)
        maps.append(grad_cam(model, x, np.asarray(target)[s: s + batch_size], head))
    h, w = crops.shape[-2:]
    cams = np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32)
    return crops.permute(0, 2, 3, 1).numpy(), cams
