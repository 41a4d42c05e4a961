"""Macenko on a batch of images, pure torch, on any device: the same result as torchstain (plus
the clamp and the guards of `wbc.stain`) per image, without a Python loop over images.

Per image b of a (B, H, W, 3) uint8 batch (images of different sizes are padded; `sizes` marks
the real pixels, and padding takes part in nothing):
1. OD = -log((I + 1) / Io) (torchstain's float32 ops, same bits); stained mask = OD >= beta
   in every channel.
2. covariance of the stained ODs (3, 3), batched; eigenvectors of the two largest eigenvalues.
   The 3x3 eigh runs on the CPU (LAPACK, as torchstain on CPU), so eigenvector signs, which
   decide where the angles wrap, are the same on every device.
3. angles phi of the stained ODs in that plane; the alpha / 100 - alpha percentiles with
   torchstain's nearest rank (k = 1 + round(q / 100 * (n - 1)), its `kthvalue`), by `topk`.
4. stain vectors ordered as torchstain orders them (the one with the larger red OD first: H).
5. concentrations C of every pixel on the image's own stain matrix: torchstain solves lstsq per
   image; here one batched pseudo-inverse (float64, 3x2) does it (same least-squares solution).
6. max concentrations: per-image 99th percentile (nearest rank) of C over all pixels.
7. guards (per image, flag only that image): too little stain, near-uniform OD, NaN / zero
   concentrations, H and E (nearly) parallel, NaN output.
8. clamp C at 0, scale by maxC_template / maxC, reconstruct Io * exp(-HE_template C), cap at
   255 and truncate to uint8 (torchstain's `.int()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from wbc.stain import StainParams


@dataclass
class BatchResult:
    """images: (B, H, W, 3) uint8 (the original where not ok; outside `sizes`, undefined); ok: (B,)
    bool; reasons: B strings
    ('' where ok); per image: clamped_fraction, clamped_fraction_stained, stained_pixels (B,),
    stain_matrix (B, 3, 2), max_conc (B, 2) (as `StainNormalizer.normalize_with_info`)."""

    images: torch.Tensor
    ok: torch.Tensor
    reasons: list[str]
    clamped_fraction: torch.Tensor
    clamped_fraction_stained: torch.Tensor
    stained_pixels: torch.Tensor
    stain_matrix: torch.Tensor
    max_conc: torch.Tensor

    def info(self, b: int) -> dict:
        """Image b's info dict, as `StainNormalizer.normalize_with_info` gives it ({} if not ok)."""
        if not bool(self.ok[b]):
            return {}
        return {"clamped_fraction": float(self.clamped_fraction[b]),
                "clamped_fraction_stained": float(self.clamped_fraction_stained[b]),
                "stained_pixels": int(self.stained_pixels[b]),
                "stain_matrix": self.stain_matrix[b].cpu().double().numpy(),
                "max_conc": self.max_conc[b].cpu().double().numpy()}


def kth_smallest(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k-th smallest entries (1-based). x: (R, N) float, entries to ignore set to
    +inf; k: (R, K) long, 1 <= k <= the row's count of others. -> (R, K).

    On the CPU numpy's introselect (`np.partition`) is ~8x faster than torch's topk/kthvalue (0.6
    against 5 ms for 131k values); elsewhere one `topk` per k from whichever end is nearer
    (percentiles near 1 and 99 need ~1% of the pixels). Both give the exact order statistic, as
    torchstain's `kthvalue` does."""
    if x.device.type == "cpu":
        a = x.numpy()
        ks = (k - 1).clamp(0, x.shape[1] - 1).tolist()
        rows = [np.partition(a[i], kk)[kk] for i, kk in enumerate(ks)]
        return torch.from_numpy(np.stack(rows)).to(x.dtype)
    return kth_smallest_topk(x, k)


def kth_smallest_topk(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`kth_smallest` by `topk` (any device; the GPU path, tested on the CPU too)."""
    k = (k - 1).clamp(0, x.shape[1] - 1)
    kept = ~torch.isinf(x) | (x < 0)  # ignored entries are +inf
    cols = []
    for j in range(k.shape[1]):
        kj = k[:, j]
        r = kept.sum(1) - 1 - kj  # the same element's 0-based rank from the top among kept entries
        if int(kj.max()) <= int(r.max()):
            vals = torch.topk(x, int(kj.max()) + 1, dim=1, largest=False).values
            cols.append(vals.gather(1, kj[:, None])[:, 0])
        else:
            vals = torch.topk(x.masked_fill(~kept, -math.inf), int(r.max()) + 1, dim=1, largest=True).values
            cols.append(vals.gather(1, r.clamp_min(0)[:, None])[:, 0])
    return torch.stack(cols, 1)


def nearest_rank(n: torch.Tensor, q: float) -> torch.Tensor:
    """torchstain's percentile index: k = 1 + round(.01 * q * (n - 1)), Python's round (half to
    even, as torch.round), in float64 like Python. n: (R,) long -> (R,) long in [1, max(n, 1)]."""
    m = n.cpu()  # float64 on the CPU: some devices (mps) have none
    k = 1 + torch.round(0.01 * float(q) * (m.double() - 1)).long()
    return torch.minimum(k.clamp(min=1), m.clamp(min=1)).to(n.device)


class BatchMacenko:
    """Normalise batches onto a template's stain matrix (3, 2) and max concentrations (2,).

    Pixels are laid out channel-first, (B, 3, N) as torchstain's (3, N): per-channel and
    per-stain rows are then contiguous (strided (B, N, 3) access made the CPU path ~3x slower)."""

    def __init__(self, stain_matrix, max_conc, params: StainParams | None = None,
                 device: str | torch.device = "cpu"):
        self.params = params = params or StainParams()
        self.device = torch.device(device)
        self.stain_matrix = torch.tensor(np.asarray(stain_matrix, np.float64).reshape(3, 2),
                                         dtype=torch.float32, device=self.device)
        self.max_conc = torch.tensor(np.asarray(max_conc, np.float64).reshape(2),
                                     dtype=torch.float32, device=self.device)
        v = torch.arange(256, dtype=torch.float32)
        stained = -torch.log((v + 1) / params.io) >= params.beta  # the same float32 ops as the OD below
        self._max_stained = int(v[stained].max()) if bool(stained.any()) else -1

    def normalize(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> BatchResult:
        """images: (B, H, W, 3) uint8 on any device; sizes: (B, 2) (h, w) of each image's real
        top-left region (None: all full size). Returns a BatchResult on self.device."""
        x = images.to(self.device)
        b, h, w, _ = x.shape
        p = self.params
        xt = x.reshape(b, h * w, 3).transpose(1, 2).contiguous()  # (B, 3, N) uint8
        od = xt.float().add_(1).div_(p.io).log_().neg_()  # torchstain's -log((I + 1) / Io): same bits
        valid = self._valid(b, h, w, sizes)  # (B, N), or None when nothing is padded
        # OD >= beta in every channel, as an integer test on the values (OD falls as they rise)
        t = self._max_stained
        stained = (xt[:, 0] <= t) & (xt[:, 1] <= t) & (xt[:, 2] <= t)
        if valid is not None:
            stained &= valid
        n = stained.sum(1)
        n_valid = valid.sum(1) if valid is not None else torch.full_like(n, h * w)
        reasons = [""] * b
        for i, k in enumerate(n.tolist()):
            if k < p.min_stained_pixels:
                reasons[i] = f"too little stain ({k} stained pixels < {p.min_stained_pixels})"
        cov = self._covariance(od, stained, n)
        if p.min_od_std > 0:
            spread = torch.sqrt(cov.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(0)).tolist()
            for i in range(b):
                if not reasons[i] and spread[i] < p.min_od_std:
                    reasons[i] = f"near-uniform image (stain OD spread {spread[i]:.3f} < {p.min_od_std})"
        he = self._stain_vectors(od, stained, n, cov)  # (B, 3, 2)
        c = self._concentrations(od, he)  # (B, 2, N)
        del od
        rows = c.reshape(2 * b, h * w)
        if valid is not None:
            rows = rows.masked_fill(~valid.repeat_interleave(2, dim=0), math.inf)
        k99 = nearest_rank(n_valid, 99).repeat_interleave(2)[:, None]
        max_c = kth_smallest(rows, k99).reshape(b, 2).to(self.device)
        self._check_matrices(he, max_c, reasons)
        negative = (c[:, 0] < 0) | (c[:, 1] < 0)
        if valid is not None:
            negative &= valid
        frac = negative.sum(1) / n_valid.clamp_min(1)
        frac_stained = (negative & stained).sum(1) / n.clamp_min(1)
        if p.clamp:
            c.clamp_min_(0)
        # torchstain: Io * exp(-HERef @ (C * maxCRef / maxC)), > 255 -> 255; the scale and the sign
        # folded into one (B, 3, 2) matrix (a pass less; rounding moves by an ulp, not a grey level)
        m = -self.stain_matrix[None] * (self.max_conc / max_c)[:, None, :]
        out = torch.bmm(m, c).exp_().mul_(p.io).clamp_max_(255)  # (B, 3, N)
        for i, bad in enumerate(torch.isnan(out.sum((1, 2))).tolist()):
            if bad and not reasons[i]:
                reasons[i] = "Macenko produced NaN (degenerate concentrations)"
        out = out.to(torch.uint8).transpose(1, 2).reshape(b, h, w, 3)  # truncates, as .int()
        ok = torch.tensor([not r for r in reasons], device=self.device)
        if not all(ok.tolist()):
            out = torch.where(ok[:, None, None, None], out, x)
        return BatchResult(out, ok, reasons, frac, frac_stained, n, he, max_c)

    def _valid(self, b: int, h: int, w: int, sizes: torch.Tensor | None) -> torch.Tensor | None:
        if sizes is None:
            return None
        sizes = torch.as_tensor(sizes).reshape(b, 2)
        if bool((sizes[:, 0] == h).all() and (sizes[:, 1] == w).all()):
            return None
        sizes = sizes.to(self.device)
        rows = torch.arange(h, device=self.device)[None, :, None] < sizes[:, 0, None, None]
        cols = torch.arange(w, device=self.device)[None, None, :] < sizes[:, 1, None, None]
        return (rows & cols).reshape(b, h * w)

    @staticmethod
    def _covariance(od: torch.Tensor, stained: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) covariance of each image's stained ODs (torchstain's `cov`: centred, ddof 1)."""
        m = stained[:, :, None].float()  # (B, N, 1): sums over pixels as matrix products
        mean = torch.bmm(od, m) / n.clamp_min(1)[:, None, None]  # (B, 3, 1)
        xc = od - mean
        return torch.bmm(xc * m.transpose(1, 2), xc.transpose(1, 2)) / (n - 1).clamp_min(1)[:, None, None]

    def _stain_vectors(self, od, stained, n, cov) -> torch.Tensor:
        """(B, 3, 2) stain matrices, columns (H, E) in torchstain's order."""
        b = od.shape[0]
        # Images that will be flagged anyway get a harmless matrix, so eigh never sees NaN.
        usable = (torch.isfinite(cov).all(-1).all(-1) & (n >= 2))[:, None, None]
        safe = torch.where(usable, cov, torch.eye(3, device=cov.device).expand(b, 3, 3))
        _, vecs = torch.linalg.eigh(safe.cpu())
        vecs = vecs[:, :, 1:3].to(self.device)  # (B, 3, 2)
        proj = torch.bmm(vecs.transpose(1, 2), od)  # (B, 2, N)
        phi = torch.atan2(proj[:, 1], proj[:, 0]).masked_fill_(~stained, math.inf)
        ks = torch.stack([nearest_rank(n, self.params.alpha), nearest_rank(n, 100 - self.params.alpha)], 1)
        lo, hi = kth_smallest(phi, ks).to(self.device).T
        v_min = torch.bmm(vecs, torch.stack([torch.cos(lo), torch.sin(lo)], 1)[..., None])  # (B, 3, 1)
        v_max = torch.bmm(vecs, torch.stack([torch.cos(hi), torch.sin(hi)], 1)[..., None])
        first = (v_min[:, 0, 0] > v_max[:, 0, 0])[:, None, None]
        return torch.where(first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))

    @staticmethod
    def _concentrations(od: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
        """(B, 2, N) least-squares concentrations of every pixel on its image's own stain matrix."""
        he64 = torch.nan_to_num(he.cpu().double(), nan=0.0)  # tiny; float64 on the CPU (mps has none)
        pinv = torch.linalg.pinv(he64).float().to(od.device)  # (B, 2, 3)
        return torch.bmm(pinv, od)

    def _check_matrices(self, he: torch.Tensor, max_c: torch.Tensor, reasons: list[str]) -> None:
        """The guards of `wbc.stain._check_matrix`, per image, on images not already flagged."""
        finite = (torch.isfinite(he).flatten(1).all(1) & torch.isfinite(max_c).all(1)
                  & (max_c > 1e-6).all(1)).tolist()
        unit = he / he.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ang = torch.rad2deg(torch.arccos((unit[:, :, 0] * unit[:, :, 1]).sum(1).clamp(-1, 1))).tolist()
        for i in range(he.shape[0]):
            if reasons[i]:
                continue
            if not finite[i]:
                reasons[i] = "Macenko gave a degenerate stain matrix (NaN or zero concentration)"
            elif ang[i] < self.params.min_he_angle_deg:
                reasons[i] = (f"Macenko gave a degenerate stain matrix (H and E {ang[i]:.1f} deg apart "
                              f"< {self.params.min_he_angle_deg})")


def pad_batch(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (H_i, W_i, 3) uint8 -> ((B, H, W, 3) uint8 zero-padded bottom/right, sizes (B, 2))."""
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    batch = np.zeros((len(images), h, w, 3), np.uint8)
    for i, im in enumerate(images):
        batch[i, : im.shape[0], : im.shape[1]] = im
    sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.long)
    return torch.from_numpy(batch), sizes
