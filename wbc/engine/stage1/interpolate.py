"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space ensembles of a pretrained and a fine-tuned model.

    theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned

for every backbone tensor, BatchNorm running statistics included (counters such as
`num_batches_tracked` are rounded); the classifier is the fine-tuned model's, since the pretrained
one has no head for these classes. alpha = 1 is the fine-tuned checkpoint, alpha = 0 the pretrained
backbone under the fine-tuned head. Interpolating keeps most of the in-domain accuracy while
recovering much of what fine-tuning cost on other labs' images.

Each output is a normal Stage-1 checkpoint (OUT/alpha-A/fold{K}/best.pt, beside its config.yaml)
that says where it came from under `wise`: extract, crt, evaluate and ensembles use it unchanged.
The pretrained weights are re-created from the fine-tuned run's own `pretrained` setting (hub,
package or a file) unless `pretrained` overrides it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml
from torch import nn

from wbc.backbones import create_backbone, load_checkpoint
from wbc.config import file_sha256
from wbc.engine.stage1.checkpointing import save_atomic
from wbc.errors import WbcError

log = logging.getLogger(__name__)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (timm's get_classifier())."""
    head = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is head)
    return {f"{name}.{k}" for k in head.state_dict()}


def interpolate_state(pretrained: dict, finetuned: dict, alpha: float, head: set[str]) -> dict:
    """Every tensor (1 - alpha) * pretrained + alpha * finetuned; `head` keys from `finetuned`.

    Integer tensors (BatchNorm's num_batches_tracked) are interpolated and rounded, so alpha 0 and 1
    reproduce either side exactly.
    """
    missing = sorted(set(finetuned) - set(pretrained) - head)
    if missing:
        raise WbcError(f"pretrained weights lack {len(missing)} tensors of the fine-tuned model (e.g. {missing[0]})")
    out = {}
    for k, ft in finetuned.items():
        if k in head:
            out[k] = ft.clone()
            continue
        pre = pretrained[k].to(ft.dtype)
        if pre.shape != ft.shape:
            raise WbcError(f"{k}: pretrained {tuple(pre.shape)} vs fine-tuned {tuple(ft.shape)}; another backbone?")
        if ft.is_floating_point():
            out[k] = torch.lerp(pre, ft, alpha) if 0 < alpha < 1 else (ft if alpha == 1 else pre).clone()
        else:
            out[k] = torch.round((1 - alpha) * pre.double() + alpha * ft.double()).to(ft.dtype)
    return out


def check_alphas(alphas: Iterable[float]) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise WbcError("give at least one --alpha between 0 (pretrained) and 1 (fine-tuned)")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise WbcError(f"--alpha {bad[0]:g}: choose values between 0 (pretrained) and 1 (fine-tuned)")
    return alphas


def alpha_dir(out: str | Path, alpha: float) -> Path:
    return Path(out) / f"alpha-{alpha:g}"


def interpolate(checkpoint: str | Path, alphas: Iterable[float], out: str | Path,
                pretrained: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write OUT/alpha-A/fold{K}/best.pt for each alpha; returns their paths."""
    alphas = check_alphas(alphas)
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    source = pretrained or meta["config"].get("pretrained", "none")
    if source == "none":
        raise WbcError(f"{checkpoint} was trained from random init (pretrained: none): nothing to "
                       "interpolate towards; pass --pretrained hub|package|PATH")
    targets = [alpha_dir(out, a) / f"fold{meta['fold']}" / "best.pt" for a in alphas]
    if not overwrite and (done := [t for t in targets if t.exists()]):
        raise WbcError(f"{done[0]} exists; pass --overwrite to replace it")
    crop = int(meta["data_config"]["input_size"][-1])
    pre = create_backbone(meta["timm_name"], len(meta["class_names"]), source, crop=crop).state_dict()
    ft = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    head = classifier_keys(model)
    sha = file_sha256(checkpoint)
    for a, target in zip(alphas, targets):
        ckpt = {**meta, "model": interpolate_state(pre, ft, a, head), "val": None, "complete": True,
                "wise": {"alpha": a, "finetuned": str(checkpoint), "finetuned_sha256": sha,
                         "finetuned_epoch": meta.get("epoch"), "pretrained": source}}
        target.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ckpt, target)
        cfg = {**meta["config"], "wise_alpha": a, "wise_finetuned": str(checkpoint)}
        (target.parent / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        log.info("alpha %g -> %s", a, target)
    return targets
