"""Test-time views: each is what its name says, the 8 of D4 are distinct, sets resolve by name."""

import numpy as np
import pytest
import torch

from wbc.errors import WbcError
from wbc.views import D4, VIEWS, apply_views, resolve_views

H = W = 5


def _img() -> torch.Tensor:
    # Distinct values everywhere: no symmetry of the square maps it onto itself.
    return torch.arange(2 * H * W, dtype=torch.float32).reshape(1, 2, H, W)


# The definition of each view, written pixel by pixel (independent of torch.rot90/flip).
FORMULAS = {
    "identity": lambda x, i, j: x[i, j],
    "rot90": lambda x, i, j: x[j, W - 1 - i],
    "rot180": lambda x, i, j: x[H - 1 - i, W - 1 - j],
    "rot270": lambda x, i, j: x[H - 1 - j, i],
    "hflip": lambda x, i, j: x[i, W - 1 - j],
    "vflip": lambda x, i, j: x[H - 1 - i, j],
    "transpose": lambda x, i, j: x[j, i],
    "antitranspose": lambda x, i, j: x[W - 1 - j, H - 1 - i],
}


@pytest.mark.parametrize("name", D4)
def test_view_matches_its_definition(name):
    x = _img()
    out = VIEWS.get(name)(x)
    for c in range(2):
        want = np.array([[FORMULAS[name](x[0, c].numpy(), i, j) for j in range(W)] for i in range(H)])
        np.testing.assert_array_equal(out[0, c].numpy(), want)


def test_rot90_is_counter_clockwise_like_numpy():
    x = _img()
    np.testing.assert_array_equal(VIEWS.get("rot90")(x)[0, 0].numpy(), np.rot90(x[0, 0].numpy()))
    # top-right corner moves to top-left under a counter-clockwise quarter turn
    assert VIEWS.get("rot90")(x)[0, 0, 0, 0] == x[0, 0, 0, W - 1]


def test_default_set_is_the_8_distinct_symmetries():
    names = resolve_views()
    assert names == list(D4) and len(names) == 8
    x = _img()
    outs = [VIEWS.get(n)(x) for n in names]
    for a in range(8):
        for b in range(a + 1, 8):
            assert not torch.equal(outs[a], outs[b]), (names[a], names[b])
    assert sum(torch.equal(o, x) for o in outs) == 1  # the original appears exactly once


def test_d4_is_a_group():
    # closed under composition, and each element has an inverse in the set
    x = _img()
    outs = {n: VIEWS.get(n)(x) for n in D4}
    for a in D4:
        for b in D4:
            comp = VIEWS.get(a)(VIEWS.get(b)(x))
            assert any(torch.equal(comp, o) for o in outs.values()), (a, b)
        assert any(torch.equal(VIEWS.get(b)(VIEWS.get(a)(x)), x) for b in D4)


def test_apply_views_is_view_major():
    x = torch.randn(3, 2, 4, 4)
    out = apply_views(x, ["identity", "hflip"])
    assert out.shape == (6, 2, 4, 4)
    assert torch.equal(out[:3], x) and torch.equal(out[3:], torch.flip(x, (-1,)))


def test_apply_views_channels_last_has_the_same_values():
    x = torch.randn(2, 3, 6, 6)
    a = apply_views(x, list(D4))
    b = apply_views(x, list(D4), torch.channels_last)
    assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)


def test_apply_views_refuses_non_square_for_axis_swaps():
    with pytest.raises(ValueError, match="square"):
        apply_views(torch.zeros(1, 3, 4, 5), ["identity", "rot90"])


def test_resolve_sets_lists_and_errors():
    assert resolve_views("identity") == ["identity"]
    assert resolve_views("rotations") == ["identity", "rot90", "rot180", "rot270"]
    assert resolve_views("hflip, rot90") == ["hflip", "rot90"]
    assert resolve_views(["vflip"]) == ["vflip"]
    with pytest.raises(WbcError, match="unknown view 'rot45'"):
        resolve_views("identity,rot45")
    with pytest.raises(WbcError, match="repeated: identity"):
        resolve_views("identity,hflip,identity")
    with pytest.raises(WbcError, match="no views"):
        resolve_views(" , ")
