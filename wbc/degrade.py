"""Named image degradations at severities 0-4, for robustness evaluation and training augmentation.

`degrade(name, image, severity, seed)` takes an (H, W, 3) uint8 RGB image and returns one of the
same shape and dtype. Severity 0 is the identity for every degradation. The seed fixes the random
*direction* of a degradation (noise field, sign of a brightness change, stain jitter draw, JPEG grid
offset); the severity only scales its *magnitude*, so for one seed the distortion grows with the
severity. Randomness comes from `np.random.default_rng([seed, crc32(name)])`: the same
(name, image, severity, seed) always gives the same output, in any process.

Pixel sizes are given at the store's 368 px and scale with `min(H, W) / 368`, so a blur degrades a
224 px crop as much as the 368 px image it came from.

| name | parameter | 1 | 2 | 3 | 4 | seed decides |
|---|---|---|---|---|---|---|
| `none` | - | - | - | - | - | nothing (identity) |
| `gaussian_noise` | noise sigma (grey levels of 255) | 4 | 8 | 16 | 28 | the noise field |
| `gaussian_blur` | blur sigma (px at 368 px) | 0.8 | 1.5 | 2.5 | 4 | sigma x U(0.9, 1.1) |
| `illumination` | brightness shift (fraction of 255) | 0.02 | 0.05 | 0.1 | 0.16 | its sign |
| | contrast factor | 1.05 | 1.15 | 1.3 | 1.5 | up or down (c or 1/c) |
| | gamma | 1.05 | 1.15 | 1.3 | 1.5 | g or 1/g |
| | vignette: darkening at the far corner | 0.05 | 0.12 | 0.22 | 0.35 | centre (+-25% of size) |
| `jpeg` | JPEG quality (PIL, 4:2:0) | 70 | 40 | 20 | 10 | 8x8 grid offset (0-7 px) |
| `stain_jitter` | concentration scale s: alpha ~ U(1-s, 1+s) | 0.05 | 0.1 | 0.2 | 0.3 | alpha, beta per stain |
| | concentration shift s': beta ~ U(-s', s') (OD) | 0.01 | 0.02 | 0.05 | 0.1 | |

`stain_jitter` works in Beer-Lambert optical density, OD = -log((I + 1) / 256): OD is unmixed into
haematoxylin-, eosin-like and residual concentrations with a fixed stain basis (torchstain's
Macenko reference H&E matrix, or the store's template matrix passed as `stain_matrix`), the H and E
concentrations become alpha * c + beta, and the image is rebuilt. The residual is left untouched,
so only the stain mixture changes (Tellez et al. 2018, "H&E jitter").

Clipping to [0, 255] is part of every degradation (a camera saturates too), so Gaussian noise
shifts the mean of near-saturated regions slightly (e.g. white background at severity 4).
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage, special

from wbc.errors import WbcError
from wbc.registry import Registry

# fn(image (H, W, 3) uint8, level index 0..3, rng, **options) -> (H, W, 3) uint8
Degradation = Callable[..., np.ndarray]
DEGRADATIONS: Registry[Degradation] = Registry("degradation")

MAX_SEVERITY = 4
REF_SIZE = 368  # pixel parameters are stated at the store's image size

# Severity tables (index = severity - 1); the module docstring shows the same numbers.
NOISE_SIGMA = (4.0, 8.0, 16.0, 28.0)
BLUR_SIGMA = (0.8, 1.5, 2.5, 4.0)
BRIGHTNESS = (0.02, 0.05, 0.10, 0.16)
CONTRAST = (1.05, 1.15, 1.3, 1.5)
GAMMA = (1.05, 1.15, 1.3, 1.5)
VIGNETTE = (0.05, 0.12, 0.22, 0.35)
JPEG_QUALITY = (70, 40, 20, 10)
STAIN_SCALE = (0.05, 0.10, 0.20, 0.30)
STAIN_SHIFT = (0.01, 0.02, 0.05, 0.10)

# torchstain's Macenko reference H&E matrix (columns: haematoxylin, eosin; unit OD vectors).
HE_REFERENCE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])

# OD of every uint8 value, so unmixing is a table lookup instead of a log per pixel.
_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0).astype(np.float32)
# Standard normal quantiles at 65536 evenly spaced probabilities (see gaussian_noise).
_NORMAL_LUT = special.ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _scale(image: np.ndarray) -> float:
    return min(image.shape[:2]) / REF_SIZE


@DEGRADATIONS.register("none")
def _none(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return image.copy()


@DEGRADATIONS.register("gaussian_noise")
def _gaussian_noise(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    # Normal quantiles looked up by uniform 16-bit ints: ~2.5x faster than standard_normal and
    # indistinguishable at this use (65536 levels, tails cut at 4.3 sigma).
    noise = _NORMAL_LUT[rng.integers(0, 65536, size=image.shape, dtype=np.uint16)]
    return _to_uint8(image + NOISE_SIGMA[level] * noise)


@DEGRADATIONS.register("gaussian_blur")
def _gaussian_blur(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sigma = BLUR_SIGMA[level] * _scale(image) * rng.uniform(0.9, 1.1)
    out = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
    return _to_uint8(out)


@DEGRADATIONS.register("illumination")
def _illumination(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    # Draw every random choice first, in a fixed order, so severities share one direction.
    sign_b, sign_c, sign_g = rng.choice([-1.0, 1.0], size=3)
    centre = rng.uniform(0.25, 0.75, size=2)
    # Gamma, contrast (about each channel's mean) and brightness act per grey level: compute
    # them on a (3, 256) table and index it once, instead of doing float maths per pixel.
    lut = (np.arange(256, dtype=np.float64) / 255.0) ** (GAMMA[level] ** sign_g)
    hist = np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)])
    mean = (hist @ lut / hist[0].sum())[:, None]  # (3, 1) channel means after gamma
    luts = (lut - mean) * CONTRAST[level] ** sign_c + mean + sign_b * BRIGHTNESS[level]
    luts = luts.astype(np.float32)
    x = np.empty(image.shape, np.float32)
    for c in range(3):
        x[..., c] = luts[c][image[..., c]]
    h, w = image.shape[:2]
    dy = np.arange(h) - centre[0] * (h - 1)
    dx = np.arange(w) - centre[1] * (w - 1)
    r2 = dy[:, None] ** 2 + dx[None, :] ** 2
    # 255 x gain, 1 at the centre and 1 - v at the farthest corner; float32 keeps x float32.
    gain = (255.0 * (1.0 - VIGNETTE[level] * r2 / max(r2.max(), 1e-12))).astype(np.float32)
    x *= gain[..., None]
    return _to_uint8(x)


@DEGRADATIONS.register("jpeg")
def _jpeg(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    # A crop of a compressed frame is rarely aligned with the 8x8 JPEG grid: shift it.
    oy, ox = (int(v) for v in rng.integers(0, 8, size=2))
    padded = np.pad(image, ((oy, 0), (ox, 0), (0, 0)), mode="reflect")
    buf = io.BytesIO()
    Image.fromarray(padded).save(buf, format="JPEG", quality=JPEG_QUALITY[level])
    buf.seek(0)
    decoded = np.asarray(Image.open(buf).convert("RGB"))
    return np.ascontiguousarray(decoded[oy:, ox:])


def stain_basis(stain_matrix: np.ndarray | None = None) -> np.ndarray:
    """(3, 3) rows = unit OD vectors of haematoxylin, eosin and their cross product (residual).

    stain_matrix: (3, 2) columns H, E (e.g. the store's provenance `HE`); default HE_REFERENCE.
    """
    he = HE_REFERENCE if stain_matrix is None else np.asarray(stain_matrix, dtype=np.float64)
    if he.shape != (3, 2):
        raise ValueError(f"stain_matrix must be (3, 2) (columns H, E), got {he.shape}")
    h, e = (v / np.linalg.norm(v) for v in he.T)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


@DEGRADATIONS.register("stain_jitter")
def _stain_jitter(
    image: np.ndarray,
    level: int,
    rng: np.random.Generator,
    stain_matrix: np.ndarray | None = None,
) -> np.ndarray:
    alpha = 1.0 + STAIN_SCALE[level] * rng.uniform(-1.0, 1.0, size=2)
    beta = STAIN_SHIFT[level] * rng.uniform(-1.0, 1.0, size=2)
    m = stain_basis(stain_matrix)  # OD = C @ m, C = OD @ inv(m)
    minv = np.linalg.inv(m)
    # c_he' = alpha * c_he + beta is linear in OD: OD' = OD @ a + b with a 3x3 a. Then
    # exp(-OD'_k) = exp(-b_k) * prod_j exp(-a_jk OD_j): each factor is a 256-entry table per
    # (input j, output k), so the pixel work is 9 table lookups (no per-pixel log, exp or BLAS).
    a = np.eye(3) + minv[:, :2] @ np.diag(alpha - 1.0) @ m[:2]
    b = beta @ m[:2]
    tables = np.exp(-_OD_LUT.astype(np.float64)[None, :, None] * a[:, None, :])  # (j, v, k)
    tables[0] *= 256.0 * np.exp(-b)
    tables = np.ascontiguousarray(tables.transpose(2, 0, 1), dtype=np.float32)  # (k, j, v)
    planes = [image[..., j] for j in range(3)]
    out = np.empty(image.shape, np.float32)
    for k in range(3):
        p = tables[k, 0][planes[0]]
        p *= tables[k, 1][planes[1]]
        p *= tables[k, 2][planes[2]]
        out[..., k] = p
    return _to_uint8(out - 1.0)  # I = 256 exp(-OD) - 1


def names() -> list[str]:
    """Registered degradation names (including `none`)."""
    return DEGRADATIONS.names()


def _rng(name: str, seed: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng([int(seed) % 2**63, zlib.crc32(name.encode())])


def _check(name: str, image: np.ndarray, severity: int) -> Degradation:
    fn = DEGRADATIONS.get(name)
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= MAX_SEVERITY:
        raise WbcError(f"severity must be an integer 0..{MAX_SEVERITY}, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return fn


def degrade(name: str, image: np.ndarray, severity: int, seed: int, **options) -> np.ndarray:
    """Apply degradation `name` at `severity` (0 = identity) with a reproducible `seed`.

    image: (H, W, 3) uint8 RGB. Returns a new (H, W, 3) uint8 array. `options` go to the
    degradation (only `stain_jitter` takes one: `stain_matrix`, (3, 2)). Unknown names raise
    WbcError listing the registered ones.
    """
    fn = _check(name, image, severity)
    if severity == 0:
        return image.copy()
    return fn(image, int(severity) - 1, _rng(name, seed), **options)


def degrade_batch(
    name: str, images: np.ndarray, severity: int, seeds: Sequence[int], **options
) -> np.ndarray:
    """`degrade` over a batch: images (B, H, W, 3) uint8, seeds (B,) -> (B, H, W, 3) uint8.

    Image i gets exactly `degrade(name, images[i], severity, seeds[i])`, so a batch is reproducible
    from per-image seeds (e.g. the image's row in the store) whatever the batch composition.
    """
    seeds = np.asarray(seeds)
    if images.ndim != 4 or seeds.shape != (len(images),):
        raise ValueError(
            f"images (B, H, W, 3) and seeds (B,) expected, got {images.shape}, {seeds.shape}"
        )
    out = np.empty_like(images)
    for i, (img, seed) in enumerate(zip(images, seeds)):
        out[i] = degrade(name, img, severity, int(seed), **options)
    return out


def random_degradation(
    image: np.ndarray, rng: np.random.Generator, choices: Sequence[str] | None = None
) -> np.ndarray:
    """A uniformly chosen degradation (never `none`) at a uniform severity 1-4.

    image: (H, W, 3) uint8. rng draws the name, the severity and the degradation's seed.
    choices restricts the names (default: every registered one except `none`).
    """
    pool = [n for n in (choices or names()) if n != "none"]
    for n in pool:
        DEGRADATIONS.get(n)  # fail early with the list of names
    if not pool:
        raise WbcError("no degradation to choose from; give at least one name other than 'none'")
    name = pool[int(rng.integers(len(pool)))]
    severity = int(rng.integers(1, MAX_SEVERITY + 1))
    return degrade(name, image, severity, int(rng.integers(2**63)))


class RandomDegradation:
    """Training transform: with probability p, `random_degradation` on a PIL image or uint8 array.

    Draws from Python's `random` module on purpose: torch's DataLoader reseeds it in every
    worker (numpy's global generator is not reseeded, so workers would repeat each other's draws),
    which keeps runs reproducible under `torch.manual_seed` and distinct across workers.
    """

    def __init__(self, p: float = 0.5, choices: Sequence[str] | None = None):
        self.p = p
        self.choices = list(choices) if choices else None
        for n in self.choices or []:
            DEGRADATIONS.get(n)

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        rng = np.random.default_rng(random.getrandbits(63))
        arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else img
        out = random_degradation(arr, rng, self.choices)
        return Image.fromarray(out) if isinstance(img, Image.Image) else out

    def __repr__(self) -> str:
        return f"RandomDegradation(p={self.p}, choices={self.choices or 'all'})"


def _fmt(values) -> str:
    return " | ".join(f"{v:g}" for v in values)


def describe() -> str:
    """The severity table (markdown), the same as in the module docstring: for README and reports."""
    rows = [
        "| name | parameter | 1 | 2 | 3 | 4 | seed decides |",
        "|---|---|---|---|---|---|---|",
        "| `none` | - | - | - | - | - | nothing (identity) |",
        f"| `gaussian_noise` | noise sigma (grey levels of 255) | {_fmt(NOISE_SIGMA)} | the noise field |",
        f"| `gaussian_blur` | blur sigma (px at 368 px) | {_fmt(BLUR_SIGMA)} | sigma x U(0.9, 1.1) |",
        f"| `illumination` | brightness shift (fraction of 255) | {_fmt(BRIGHTNESS)} | its sign |",
        f"| | contrast factor | {_fmt(CONTRAST)} | up or down (c or 1/c) |",
        f"| | gamma | {_fmt(GAMMA)} | g or 1/g |",
        f"| | vignette: darkening at the far corner | {_fmt(VIGNETTE)} | centre (+-25% of size) |",
        f"| `jpeg` | JPEG quality (PIL, 4:2:0) | {_fmt(JPEG_QUALITY)} | 8x8 grid offset (0-7 px) |",
        f"| `stain_jitter` | concentration scale s: alpha ~ U(1-s, 1+s) | {_fmt(STAIN_SCALE)} "
        + "| alpha, beta per stain |",
        f"| | concentration shift s': beta ~ U(-s', s') (OD) | {_fmt(STAIN_SHIFT)} | |",
    ]
    return "\n".join(rows) + "\n"
