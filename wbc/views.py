"""Named test-time views: the 8 symmetries of the square (dihedral group D4), and named sets of them.

A blood cell has no canonical orientation, so every element of D4 is label-preserving, and the 8
are pairwise distinct (a public implementation of this method counted the original twice). Views
act on the last two axes of a tensor (..., H, W), so they run on the device, on a batch that was
decoded and normalised once; they commute with per-channel normalisation.

Index conventions (out = view(x), x of size H x W, i = row, j = column; square inputs for the
ones that swap axes):
    identity       out[i, j] = x[i, j]
    rot90          out[i, j] = x[j, W-1-i]          counter-clockwise, like np.rot90(x)
    rot180         out[i, j] = x[H-1-i, W-1-j]
    rot270         out[i, j] = x[H-1-j, i]          clockwise
    hflip          out[i, j] = x[i, W-1-j]          mirror left <-> right
    vflip          out[i, j] = x[H-1-i, j]          mirror top <-> bottom
    transpose      out[i, j] = x[j, i]              mirror on the main diagonal
    antitranspose  out[i, j] = x[W-1-j, H-1-i]      mirror on the anti-diagonal
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from wbc.errors import WbcError
from wbc.registry import Registry

View = Callable[[torch.Tensor], torch.Tensor]

VIEWS: Registry[View] = Registry("view")
VIEW_SETS: Registry[Callable[[], tuple[str, ...]]] = Registry("view set")

_HW = (-2, -1)


@VIEWS.register("identity")
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@VIEWS.register("rot90")
def rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, _HW)


@VIEWS.register("rot180")
def rot180(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 2, _HW)


@VIEWS.register("rot270")
def rot270(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 3, _HW)


@VIEWS.register("hflip")
def hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, (-1,))


@VIEWS.register("vflip")
def vflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, (-2,))


@VIEWS.register("transpose")
def transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


@VIEWS.register("antitranspose")
def antitranspose(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, (-2, -1)).transpose(-2, -1)


# View sets: the default first. A set is a function so the registry stays one of callables.
D4 = ("identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose")
VIEW_SETS.register("d4")(lambda: D4)  # all 8 symmetries of the square (the default)
VIEW_SETS.register("identity")(lambda: ("identity",))  # no test-time augmentation
VIEW_SETS.register("rotations")(lambda: ("identity", "rot90", "rot180", "rot270"))  # C4
VIEW_SETS.register("flips")(lambda: ("identity", "hflip", "vflip", "rot180"))  # Klein four-group

DEFAULT_VIEWS = "d4"


def resolve_views(spec: str | Sequence[str] = DEFAULT_VIEWS) -> list[str]:
    """A view-set name ('d4'), a comma-separated list of view names, or a list -> view names.

    Duplicates are refused: a repeated view is the bug this module exists to prevent.
    """
    if isinstance(spec, str):
        if spec in VIEW_SETS:
            return list(VIEW_SETS.get(spec)())
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s) for s in spec]
    if not names:
        raise WbcError(f"no views given; choose a set ({', '.join(VIEW_SETS.names())}) "
                       f"or views ({', '.join(VIEWS.names())})")
    for n in names:
        if n not in VIEWS:
            raise WbcError(f"unknown view {n!r}; choose a set ({', '.join(VIEW_SETS.names())}) "
                           f"or comma-separated views ({', '.join(VIEWS.names())})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WbcError(f"views repeated: {', '.join(dup)}; each view must appear once")
    return names


def apply_views(
    x: torch.Tensor, names: Sequence[str], memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """x: (B, C, H, W) -> (K*B, C, H, W), view-major (rows k*B..(k+1)*B-1 are view k).

    Each view is copied once, straight into the output in `memory_format` (channels_last for
    the backbone saves a second full copy). Views that swap H and W need square inputs.
    """
    if x.shape[-1] != x.shape[-2] and any(
        n in ("rot90", "rot270", "transpose", "antitranspose") for n in names
    ):
        raise ValueError(f"views {list(names)} need square images, got {tuple(x.shape[-2:])}")
    b = x.shape[0]
    out = torch.empty((len(names) * b, *x.shape[1:]), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    for k, n in enumerate(names):
        out[k * b: (k + 1) * b].copy_(VIEWS.get(n)(x))
    return out
