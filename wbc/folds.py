"""Fold codes shared by the image store, the feature cache and every stage, and the one parser of
--fold / --folds options (kept import-light: no sklearn, h5py or zarr).

Codes: TEST (-1) held-out test, 0..F-1 CV folds, UNUSED (-2) unlabelled rows kept for prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

from wbc.errors import WbcError

TEST, UNUSED = -1, -2


def parse_fold_list(text: str | int, option: str = "--folds", hint: str = "") -> list[int]:
    """'0,1' -> [0, 1]: the fold indices a --fold/--folds option names; a one-line WbcError otherwise."""
    try:
        folds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        folds = []
    if not folds or min(folds) < 0:
        raise WbcError(f"{option} must be a fold index or a comma list such as 0,1{hint}; got {text!r}")
    return folds


def resolve_folds(fold: str | int | Sequence[int], available: Sequence[int], where: str,
                  option: str = "--fold") -> list[int]:
    """The folds a --fold option names among `available` (the CV folds of `where`, a path):
    'all' = every one; an index or '2,0' = those, in order, without repeats; WbcError otherwise."""
    available = [int(k) for k in available]
    if str(fold) == "all":
        if not available:
            raise WbcError(f"{where} has no CV folds (every row is test or unused); run `wbc split` "
                           "on the image store (and re-extract a cache)")
        return available
    text = fold if isinstance(fold, str | int) else ",".join(map(str, fold))
    folds = parse_fold_list(text, option, " (or 'all')")
    bad = [k for k in folds if k not in available]
    if bad:
        raise WbcError(f"fold {bad[0]} out of range: {where} has CV folds "
                       f"{', '.join(map(str, available)) or 'none'} (or use {option} all)")
    return list(dict.fromkeys(folds))
